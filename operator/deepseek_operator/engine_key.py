"""The operator's side of the engine key: the engine inputs a DeepSeekModel spec names.

The key function itself, and the toolchain it covers, live in the shared contract
(``deepseek_contract.engine``); the builder computes the same key from its CLI arguments.
"""

from __future__ import annotations

from deepseek_contract.engine import EngineInputs, default_toolchain, engine_key, gpu_type_for


def inputs_from_spec(spec) -> EngineInputs:
    """The operator's view of the engine inputs of a validated DeepSeekModelSpec."""
    adapter = spec.model.adapter
    return EngineInputs(
        source=spec.model.source,
        revision=spec.model.revision,
        task=spec.model.task,
        backend=spec.engine.backend,
        precision=spec.engine.precision,
        max_batch_size=spec.engine.max_batch_size,
        max_sequence_length=spec.engine.max_sequence_length,
        adapter_source=adapter.source if adapter else None,
        adapter_revision=adapter.revision if adapter else None,
        gpu_type=gpu_type_for(spec.serving.gpus_per_replica, spec.serving.node_selector),
        toolchain=default_toolchain(spec.engine.backend, spec.engine.precision),
    )


def spec_key(spec) -> str:
    """The operator's key for a DeepSeekModelSpec (names the cache ref the build Job writes)."""
    return engine_key(inputs_from_spec(spec))
