"""The lifetime of a decoupled BLS call's responses in the Python backend of Triton 2.51, on a real Triton.

Two small models stand in for the relay and the scheduler model: ``caller`` hands each plain request to a thread,
which makes a decoupled BLS call to ``echo`` (whose one response carries 2,000 strings) and answers; a watcher asks
every request in flight whether its client went away, as the relay's does. Where the caller drops its response
iterator as a ``for`` loop does, the stub's own reference is the last one, dropped on its stub-to-parent thread
without the GIL, and the stub dies within moments; through ``serving.triton.decoupled_responses`` it serves on, and
the iterators it holds are let go as the questions come back.
"""

import concurrent.futures
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from deepseek_local import local

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "in" data_type: TYPE_STRING dims: [ 1, 1 ] } ]
output [ { name: "out" data_type: TYPE_STRING dims: [ 1, -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

ECHO = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            words = np.array([[b"w%d" % i for i in range(2000)]], dtype=np.object_)
            request.get_response_sender().send(pb_utils.InferenceResponse([pb_utils.Tensor("out", words)]),
                                               flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""

CALLER_CONFIG = """
name: "caller"
backend: "python"
max_batch_size: 0
input [ { name: "in" data_type: TYPE_STRING dims: [ 1, 1 ] } ]
output [ { name: "held" data_type: TYPE_INT64 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "mode" value: { string_value: "%s" } }
"""

CALLER = """
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from deepseek_model_repository.serving import triton


class TritonPythonModel:
    def initialize(self, args):
        triton.dump_threads_on_signal()
        self.mode = json.loads(args["model_config"])["parameters"]["mode"]["string_value"]
        self.pool = ThreadPoolExecutor(64)
        self.inflight, self.lock = {}, threading.Lock()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while True:
            with self.lock:
                entries = list(self.inflight.values())
            for entry in entries:
                with entry["lock"]:
                    if not entry["answered"]:
                        entry["gone"]()
            time.sleep(0.005)

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._call, request.get_response_sender())
        return None

    def _call(self, sender):
        entry = {"gone": triton.client_gone(sender), "lock": threading.Lock(), "answered": False}
        with self.lock:
            self.inflight[id(entry)] = entry
        call = pb_utils.InferenceRequest(model_name="echo", requested_output_names=["out"],
                                         inputs=[pb_utils.Tensor("in", np.array([[b"x"]], dtype=np.object_))])
        if self.mode == "held":
            responses = triton.decoupled_responses(call)
        else:
            responses = [response for response in call.exec(decoupled=True)]
        assert responses[-1].output_tensors()[0].as_numpy().shape == (1, 2000)
        del responses
        with self.lock:
            del self.inflight[id(entry)]
        held = np.array([len(triton._HELD.iterators)], dtype=np.int64)
        with entry["lock"]:
            entry["answered"] = True
        sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("held", held)]),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""

CLIENTS = 8


def serve(mode: str, cache_dir):
    repo = cache_dir / f"bls-{mode}" / "repository"
    for name, config, source in (("echo", ECHO_CONFIG, ECHO), ("caller", CALLER_CONFIG % mode, CALLER)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config)
        (repo / name / "1" / "model.py").write_text(source)
    return local.serve_repository(f"bls-{mode}", repo, cache_dir, models=["echo", "caller"], http_port=0,
                                  grpc_port=0, metrics_port=0)


def hammer(server, seconds: float):
    """CLIENTS closed loops of plain requests for ``seconds``, or until the caller's stub dies (its server is then
    stopped, so that the requests it held fail at once): (answers, the most iterators held at an answer, the first
    error)."""
    until = time.monotonic() + seconds
    log = Path(server.log)

    def watch():
        while time.monotonic() < until:
            if "Fatal Python error" in log.read_text(errors="replace"):
                local.stop_group(server.pgid, timeout=1)
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def loop(_):
        client = grpcclient.InferenceServerClient(server.endpoints["grpc"])
        words = grpcclient.InferInput("in", [1, 1], "BYTES")
        words.set_data_from_numpy(np.array([[b"x"]], dtype=np.object_))
        answers, most = 0, 0
        try:
            while time.monotonic() < until:
                result = client.infer("caller", [words], client_timeout=5)  # a dead stub's requests get no answer
                answers, most = answers + 1, max(most, int(result.as_numpy("held")[0]))
        except Exception as exc:  # noqa: BLE001 - the caller reads what failed
            return answers, most, str(exc)
        finally:
            client.close()
        return answers, most, None

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(loop, range(CLIENTS)))
    errors = [error for *_, error in results if error]
    return sum(r[0] for r in results), max(r[1] for r in results), errors[0] if errors else None


def test_a_stub_that_drops_its_bls_iterators_dies(tmp_path):
    """The Triton bug itself (python_backend r24.10; it holds the GIL there from r24.12). Should this fail, the
    Triton in use no longer has it, and ``decoupled_responses`` could hand back the iterator's responses at once."""
    server = serve("dropped", tmp_path)
    try:
        answers, _, error = hammer(server, 20)
    finally:
        local.down_name("bls-dropped", tmp_path)
    assert error is not None, answers
    assert "Fatal Python error: Segmentation fault" in Path(server.log).read_text(errors="replace"), error


def test_a_stub_that_holds_its_bls_iterators_until_a_question_came_back_serves_on(tmp_path):
    server = serve("held", tmp_path)
    try:
        answers, most_held, error = hammer(server, 4)
        log = Path(server.log).read_text(errors="replace")
    finally:
        local.down_name("bls-held", tmp_path)
    assert error is None, error
    assert "Fatal Python error" not in log
    assert answers > 500  # some ten times what the dropping stub serves before it dies, here
    # Let go as the watcher's questions come back: a few per request in flight, not one per request served.
    assert most_held < 4 * CLIENTS, (most_held, answers)
