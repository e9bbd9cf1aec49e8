"""How the local mode and the Triton pod's watch (``deepseek_model_repository.supervise``) tell a model load that
Triton lost from one that is slow, from Triton's log alone."""

import io
import subprocess

import pytest

from deepseek_local.local import LocalError, LostInitialization, wait_ready
from deepseek_model_repository.serving.processes import (STARVED_ABORT, announce_initialized, initialized_models,
                                                         load_event, lost_initializations)


def announced(model: str, instance: str) -> str:
    out = io.StringIO()
    announce_initialized({"model_name": model, "model_instance_name": instance}, stream=out)
    return out.getvalue()


def test_the_announcement_names_the_model_and_is_read_back():
    log = announced("tiny-qwen2_stream", "tiny-qwen2_stream_0_0") + announced("tiny-qwen2", "tiny-qwen2_0_0")
    assert initialized_models("I1207 loading: x:1\n" + log) == {"tiny-qwen2", "tiny-qwen2_stream"}
    assert initialized_models("nothing announced here\n") == set()


def test_a_model_is_lost_only_once_its_grace_has_passed_without_triton_loading_it():
    seen: dict[str, float] = {}
    log = announced("a", "a_0_0") + announced("b", "b_0_0")
    assert lost_initializations(log, seen, now=100.0, grace_s=20) == []
    assert seen == {"a": 100.0, "b": 100.0}
    assert lost_initializations(log, seen, now=119.0, grace_s=20) == []
    loaded = log + "I1207 model_lifecycle.cc:839] \"successfully loaded 'b'\"\n"
    assert lost_initializations(loaded, seen, now=121.0, grace_s=20) == ["a"]
    failed = loaded + "E1207 model_lifecycle.cc:642] \"failed to load 'a' version 1: Internal: ...\"\n"
    assert lost_initializations(failed, seen, now=121.0, grace_s=20) == []
    # The pod's watch keeps only the lines that tell this, and they tell the same.
    kept = "".join(line for line in failed.splitlines(keepends=True) if load_event(line))
    assert lost_initializations(kept, dict(seen), now=121.0, grace_s=20) == []
    assert not load_event("I1207 model_lifecycle.cc:839] \"successfully unloaded 'b' version 1\"\n")


def test_the_grace_counts_from_when_the_announcement_was_first_seen():
    seen: dict[str, float] = {}
    assert lost_initializations("", seen, now=0.0, grace_s=20) == []
    log = announced("late", "late_0_0")
    assert lost_initializations(log, seen, now=50.0, grace_s=20) == []
    assert lost_initializations(log, seen, now=71.0, grace_s=20) == ["late"]


@pytest.mark.parametrize("ends, error", [(f"terminate called after throwing an instance of '{STARVED_ABORT}'",
                                          LostInitialization),
                                         ("E1207 model_repository_manager.cc] failed to load 'slow'", LocalError)])
def test_a_server_that_aborted_on_the_health_lock_counts_as_lost_and_any_other_exit_does_not(tmp_path, ends, error):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs: the server exited
    log = tmp_path / "tritonserver.log"
    log.write_text("I1207 loading: slow:1\n" + ends + "\n")
    with pytest.raises(LocalError) as raised:
        wait_ready(gone.pid, 1, ["slow"], log, timeout=5)
    assert type(raised.value) is error
