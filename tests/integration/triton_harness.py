"""A real Triton Inference Server for tests, started the way `deepseek-operator local up` starts it.

Reuse it from any test module::

    from triton_harness import local_triton, tiny_resource

    with local_triton(tiny_resource(cache_dir, "m"), cache_dir) as server:
        server.http_port, server.grpc_port, server.metrics_port   # loopback, free ports

``local_triton`` runs the local mode's own code path (the builder's build into
``cache_dir``, ``write_repository(runtime="local")``, tritonserver from
nvidia-pytriton) on free ports and stops the server on exit.  ``serve_engines``
serves several already-built engines from one repository (one server, many
models).  Nothing here is mocked.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from deepseek_model_repository import write_repository
from deepseek_model_repository.probe import ping
from deepseek_model_repository.repository import ModelNames
from deepseek_model_repository.serving.limits import process_died
from deepseek_local import local
from deepseek_operator import api

EXAMPLE = local.EXAMPLES_DIR / local.DEFAULT_EXAMPLE
#: The longest a test's client waits for one answer (gRPC's deadline): a request still unanswered then is a hang (a
#: server that ended without answering it), which fails the test with a ServingError that says so instead of holding
#: its worker until pytest's timeout.
CLIENT_TIMEOUT_S = 120.0


def tiny_model(cache_dir: Path, arch: str = "deepseek_v3", task: str = "text-generation") -> Path:
    """The builder's tiny random-weight checkpoint, written once per cache directory."""
    model_dir = Path(cache_dir) / "tiny-models" / f"{arch}-{task}"
    local.ensure_tiny_model(model_dir, arch, task)
    return model_dir


def tiny_resource(
    cache_dir: Path,
    name: str,
    *,
    task: str = "text-generation",
    arch: str = "deepseek_v3",
    adapter: Optional[Path] = None,
    spec_overrides: Optional[dict[str, Any]] = None,
) -> api.DeepSeekModel:
    """The local-tiny example CR, renamed, for ``task``, pointing at the tiny checkpoint (and an adapter)."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw = copy.deepcopy(raw)
    raw["metadata"]["name"] = name
    raw["spec"]["model"]["task"] = task
    raw["spec"]["model"]["source"] = f"file://{tiny_model(cache_dir, arch, task).resolve()}"
    if adapter is not None:
        raw["spec"]["model"]["adapter"] = {"source": f"file://{Path(adapter).resolve()}"}
    for section, values in (spec_overrides or {}).items():
        raw["spec"].setdefault(section, {}).update(values)
    return api.parse_resource(raw)


@contextmanager
def local_triton(resource: api.DeepSeekModel, cache_dir: Path) -> Iterator[local.LocalServer]:
    """`local up` for ``resource`` on free loopback ports; `local down` afterwards."""
    server = local.up_resource(resource, Path(cache_dir), http_port=0, grpc_port=0, metrics_port=0, echo=lambda _: None)
    repo = Path(server.repository)
    watch = StubWatch(server, [d.name for d in sorted(repo.iterdir()) if (repo / ModelNames.of(d.name).stream).is_dir()],
                      cache_dir).start()
    try:
        yield server
    finally:
        watch.stop()
        local.down_name(resource.name, Path(cache_dir))


def build(resource: api.DeepSeekModel, cache_dir: Path) -> Path:
    """The engine directory for ``resource`` (the local mode's build: the builder, through the cache)."""
    return local.build_engine(resource, Path(cache_dir), echo=lambda _: None)


#: Seconds between two pings of a served text-generation model's processes (``StubWatch``).
STUB_WATCH_S = 2.0


class StubWatch:
    """Pings each text-generation model of a test's Triton (``deepseek_model_repository.probe``) every
    :data:`STUB_WATCH_S`; when one's Python process has died, says so on stderr (in the test's captured output) and
    stops the server.  Triton holds the requests of a dead stub unanswered, so each of the test's calls would wait for
    its own timeout, or pytest's (which kills the worker and loses its report); with the server gone they fail at
    once, and the log says why."""

    def __init__(self, server: local.LocalServer, models: list[str], cache_dir: Path):
        self.server, self.models, self.cache_dir = server, models, Path(cache_dir)
        self.died: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stub-watch", daemon=True)

    def start(self) -> "StubWatch":
        if self.models:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(STUB_WATCH_S):
            for model in self.models:
                error = ping("127.0.0.1", self.server.http_port, model, CLIENT_TIMEOUT_S)
                if error and process_died(error) and not self._stop.is_set():
                    self.died = f"model {model}'s process died ({error}); its log: {self.server.log}"
                    print(f"triton_harness: {self.died}: stopping the server, so that the requests it holds fail",
                          file=sys.stderr, flush=True)
                    local.down_name(self.server.name, self.cache_dir)
                    return


@contextmanager
def serve_engines(
    engines: dict[str, Path], cache_dir: Path, server_name: str = "harness",
    model_options: Optional[dict[str, dict[str, Any]]] = None, exit_timeout_s: int = local.EXIT_TIMEOUT_S,
    watch_stubs: bool = True, **repository_options: Any
) -> Iterator[local.LocalServer]:
    """One Triton serving several engines: ``{model name: engine dir}``; options go to write_repository, and
    ``model_options`` adds options for one model name; ``exit_timeout_s``: how long it drains when told to stop;
    ``watch_stubs``: stop the server when a text-generation model's process dies (``StubWatch``)."""
    repo = local.state_dir(Path(cache_dir)) / server_name / "repository"
    models, generating = [], []
    for name, engine_dir in engines.items():
        options = {**repository_options, **(model_options or {}).get(name, {})}
        write_repository(engine_dir, repo, name, runtime="local", **options)
        names = ModelNames.of(name)
        models += [m for m in (names.engine, names.stream, names.client) if (repo / m).is_dir()]
        if (repo / names.stream).is_dir():
            generating.append(names.client)
    server = local.serve_repository(server_name, repo, Path(cache_dir), models=models, http_port=0, grpc_port=0,
                                    metrics_port=0, exit_timeout_s=exit_timeout_s)
    watch = StubWatch(server, generating if watch_stubs else [], cache_dir).start()
    try:
        yield server
    finally:
        watch.stop()
        local.down_name(server_name, Path(cache_dir))


def model_stats(server: local.LocalServer, model: str) -> dict[str, Any]:
    """Triton's /v2/models/<model>/stats for the model's single version."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/models/{model}/stats", timeout=10) as r:
        return json.load(r)["model_stats"][0]


def metrics_text(server: local.LocalServer) -> str:
    """The Prometheus text the metrics port serves."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def scheduler_metric(server: local.LocalServer, name: str, model: str, **labels: str) -> float:
    """One ``deepseek_scheduler_<name>{model="<model>",...}`` sample (0 when not published yet); ``labels`` are the
    series' other labels (``phase``, ``le``), which Triton writes in sorted order."""
    pairs = ",".join(f'{key}="{value}"' for key, value in sorted({**labels, "model": model}.items()))
    prefix = f"deepseek_scheduler_{name}{{{pairs}}} "
    for line in metrics_text(server).splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def settled_scheduler_metric(server: local.LocalServer, name: str, model: str, quiet_s: float = 0.3,
                             timeout: float = 10.0, **labels: str) -> float:
    """:func:`scheduler_metric` once it has stopped changing for ``quiet_s``.

    The scheduler publishes its metrics in batches, at most every ``PUBLISH_INTERVAL_S`` and once it has been idle
    for ``IDLE_PUBLISH_S`` (``deepseek_model_repository.serving.metrics``), so a value read the moment a response
    arrives may lag.
    """
    deadline = time.monotonic() + timeout
    value, since = scheduler_metric(server, name, model, **labels), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = scheduler_metric(server, name, model, **labels)
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return value


def generate_or_error(server: local.LocalServer, model: str, prompt: str, max_tokens: int, stream: bool = False):
    """The completion over gRPC (plain or streamed), or the ServingError the server answered with."""
    from deepseek_model_repository.client import GenerationClient, ServingError

    client = GenerationClient(server.endpoints["grpc"], model, client_timeout_s=CLIENT_TIMEOUT_S)
    try:
        if stream:
            return "".join(client.stream(prompt, max_tokens=max_tokens))
        return client.generate(prompt, max_tokens=max_tokens)
    except ServingError as exc:
        return exc
    finally:
        client.close()
