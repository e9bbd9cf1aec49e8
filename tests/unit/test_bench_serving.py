"""The serving bench's arithmetic: what counts as a token in the window, TTFT, ITL, short requests, the workload."""

import importlib.util
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[2] / "bench" / "serving" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serving_run", RUN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_tokens_per_s_counts_only_tokens_that_arrived_within_the_window(bench):
    streamed = bench.Record(max_tokens=4, start=0.0, end=2.5)
    for t in (0.5, 1.0, 1.5, 2.5):  # the last one after the deadline
        streamed.piece(t)
    plain_in = bench.Record(max_tokens=3, start=0.1, end=1.9, tokens=3, unary=True)
    plain_late = bench.Record(max_tokens=5, start=1.0, end=2.2, tokens=5, unary=True)
    window = bench.Window([streamed, plain_in, plain_late], start=0.0, deadline=2.0)
    assert window.tokens_per_s == pytest.approx((3 + 3) / 2.0)


def test_the_window_opens_after_the_load_settled(bench):
    """Tokens and requests of the settling second do not count; the count from idle is kept beside for contrast."""
    ramp = bench.Record(max_tokens=2, start=0.0, end=1.2)  # sent while settling, ends within the window
    ramp.piece(0.5)
    ramp.piece(1.2)
    plain_early = bench.Record(max_tokens=4, start=0.0, end=0.9, tokens=4, unary=True)  # done before the window
    plain_in = bench.Record(max_tokens=6, start=0.9, end=2.5, tokens=6, unary=True)  # in flight at the opening
    streamed = bench.Record(max_tokens=2, start=1.5, end=2.0)
    streamed.piece(1.6)
    streamed.piece(2.0)
    window = bench.Window([ramp, plain_early, plain_in, streamed], start=1.0, deadline=3.0, began=0.0)
    assert window.tokens_per_s == pytest.approx((1 + 6 + 2) / 2.0)
    assert window.tokens_per_s_from_idle == pytest.approx((2 + 4 + 2) / 2.0)  # [0, 2]: plain_in ends after it
    assert window.measured() == [streamed]
    row = bench.summarize([window])
    assert row["requests"] == 1 and row["ttft_p50_ms"] == pytest.approx(100.0)
    assert row["tokens_per_s_from_idle"] == pytest.approx(4.0)


def test_summary_of_ttft_itl_and_short_requests(bench):
    short = bench.Record(max_tokens=bench.SHORT_MAX_TOKENS, start=0.0, end=0.4)
    for t in (0.1, 0.2, 0.4):
        short.piece(t)
    long = bench.Record(max_tokens=bench.SHORT_MAX_TOKENS + 1, start=0.0, end=1.0)
    for t in (0.3, 1.0):
        long.piece(t)
    failed = bench.Record(max_tokens=8, start=0.0, error="boom")
    row = bench.summarize([bench.Window([short, long, failed], 0.0, 10.0)])
    assert row["requests"] == 2 and row["errors"] == 1 and row["first_error"] == "boom"
    assert row["ttft_p50_ms"] == pytest.approx(200.0)  # first pieces at 0.1 and 0.3
    assert row["itl_p50_ms"] == pytest.approx(200.0)  # gaps 0.1, 0.2, 0.7
    assert row["tpot_p50_ms"] == pytest.approx(425.0)  # per request: 0.15 and 0.7
    assert row["short_requests"] == 1 and row["short_p50_ms"] == pytest.approx(400.0)
    assert row["tokens"] == 5


def test_tokens_per_s_is_the_median_over_rounds(bench):
    def window(tokens):
        record = bench.Record(max_tokens=tokens, start=0.0, end=0.5)
        for i in range(tokens):
            record.piece(0.5)
        return bench.Window([record], 0.0, 1.0)

    assert bench.summarize([window(10), window(1000), window(30)])["tokens_per_s"] == 30.0


def test_every_system_sees_the_same_requests(bench):
    workload = bench.Workload()
    once, again = workload.requests(3), bench.Workload().requests(3)
    assert [next(once) for _ in range(50)] == [next(again) for _ in range(50)]
    requests = [r for c in range(32) for r, _ in zip(workload.requests(c), range(40))]
    lengths = [max_tokens for _, max_tokens in requests]
    assert min(lengths) >= bench.MAX_TOKENS_RANGE[0] and max(lengths) <= bench.MAX_TOKENS_RANGE[1]
    share = sum(1 for n in lengths if n <= bench.SHORT_MAX_TOKENS) / len(lengths)
    assert 0.2 < share < 0.4
    assert workload.prompts() == bench.Workload().prompts()


def test_a_paced_piece_counts_its_tokens_and_gives_no_inter_token_latency(bench):
    paced = bench.Record(max_tokens=9, start=0.0, end=1.0, paced=True)
    for t, n in ((0.1, 1), (0.5, 4), (1.0, 4)):
        paced.piece(t, n)
    window = bench.Window([paced], start=0.0, deadline=0.6)
    assert window.tokens_per_s == pytest.approx(5 / 0.6)  # the piece at 1.0 arrived after the deadline
    row = bench.summarize([bench.Window([paced], 0.0, 10.0)])
    assert row["tokens"] == 9 and row["itl_p50_ms"] is None
    assert row["ttft_p50_ms"] == pytest.approx(100.0)
    assert row["tpot_p50_ms"] == pytest.approx(900.0 / 8)


def test_the_cache_write_bench_runs_and_writes_its_results(tmp_path):
    import json
    import subprocess

    out = tmp_path / "cache_write.json"
    subprocess.run([sys.executable, str(RUN.parent / "cache_write.py"), "--repeats", "1", "--capacity", "8", "--output", str(out)],
                   check=True, capture_output=True, timeout=300)
    results = json.loads(out.read_text())["results"]
    assert {(r["layers"], r["tensors"]) for r in results} >= {(2, "numpy (cpu)"), (28, "torch (cpu)")}
    assert all(r["indexed_ms"] > 0 and r["row_by_row_ms"] > 0 for r in results)



def test_the_gpu_bench_checks_itself_on_the_cpu_and_writes_its_results(tmp_path):
    """bench/serving/gpu.py on the tiny Qwen2 in fp32 on the CPU (what ``--device cpu`` is for): every measurement is
    there, the cache stayed where it was allocated, and both systems made tokens."""
    import json
    import subprocess

    out = tmp_path / "serving_gpu.json"
    done = subprocess.run([sys.executable, str(RUN.parent / "gpu.py"), "--device", "cpu", "--dtype", "float32",
                           "--shapes", "tiny-qwen2", "--concurrency", "2", "--seconds", "0.5", "--warmup", "0.2",
                           "--step-repeats", "1", "--work", str(tmp_path / "work"), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shape = json.loads(out.read_text())["shapes"]["tiny-qwen2"]
    assert shape["cache_allocated_once"] and shape["cache_device"] == "cpu"
    for key in ("in_place_ms", "in_place_queued_ms", "host_round_trip_ms", "transformers_ms"):
        assert set(shape["step"][key]) == {"50", "2000"} and min(shape["step"][key].values()) > 0
    assert shape["step"]["cache_bytes_round_trip"]["2000"] > shape["step"]["cache_bytes_round_trip"]["50"]
    level = shape["load"]["2"]
    assert level["in_flight"]["tokens_per_s"] > 0 and level["in_flight"]["errors"] == 0
    assert level["run_to_completion"]["tokens_per_s"] > 0 and level["run_to_completion"]["requests"] >= 2
    assert "tiny-qwen2" in done.stdout and "run to completion" in done.stdout


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda(), reason="a CUDA GPU is visible: the bench would run on it")
def test_the_gpu_bench_without_a_gpu_says_how_to_check_it_instead(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, str(RUN.parent / "gpu.py"), "--output", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--device cpu" in done.stderr and not (tmp_path / "x.json").exists()

def test_the_engine_timing_of_a_round_from_the_schedulers_series(bench):
    """The served scheduler's engine_step_seconds _sum/_count by phase, differenced over a round, give the mean step
    times and the share of the round's wall time spent in the engine."""
    def text(prefill, decode):
        return "\n".join([
            "# TYPE deepseek_scheduler_engine_step_seconds_sum counter",
            f'deepseek_scheduler_engine_step_seconds_sum{{model="m",phase="prefill"}} {prefill[0]}',
            f'deepseek_scheduler_engine_step_seconds_count{{model="m",phase="prefill"}} {prefill[1]}',
            f'deepseek_scheduler_engine_step_seconds_sum{{model="m",phase="decode"}} {decode[0]}',
            f'deepseek_scheduler_engine_step_seconds_count{{model="m",phase="decode"}} {decode[1]}',
            'deepseek_scheduler_engine_step_seconds_bucket{le="+Inf",model="m",phase="decode"} 999',
            f'deepseek_scheduler_engine_step_seconds_sum{{model="other",phase="decode"}} 50',
        ])

    before = bench.engine_totals(text((1.0, 10), (2.0, 100)), "m")
    assert before == {"prefill": [1.0, 10.0], "decode": [2.0, 100.0]}
    delta = bench.engine_delta(before, bench.engine_totals(text((1.2, 12), (2.6, 160)), "m"))
    record = bench.Record(max_tokens=4, start=0.5, end=2.0)
    window = bench.Window([record], start=1.0, deadline=2.0, began=0.0, engine=delta)
    summary = window.engine_summary()
    assert summary["prefill_ms"] == pytest.approx(100.0) and summary["decode_step_ms"] == pytest.approx(10.0)
    assert summary["busy"] == pytest.approx(0.8 / 2.0)  # 0.2 + 0.6 s of engine over 2 s from the first client
    assert bench.Window([record], 1.0, 2.0, engine={}).engine_summary() is None  # no scheduler (the previous path)
    row = bench.summarize([window])
    assert row["engine_decode_step_ms"] == pytest.approx(10.0) and row["engine_busy"] == pytest.approx(0.4)


def test_the_bare_loops_engine_time_sums_each_phase(bench):
    engine = bench.EngineTime()
    for phase, seconds in (("prefill", 0.01), ("decode", 0.002), ("decode", 0.004)):
        engine.engine_step(phase, seconds)
    engine.gauges(0, 0, 0.0), engine.tokens(3), engine.publish()
    assert engine.totals == {"prefill": [0.01, 1], "decode": [pytest.approx(0.006), 2]}


def test_a_negative_settle_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--settle", "-1"])
    assert "--settle -1.0: the seconds of load before each window must be 0 or more" in capsys.readouterr().err


def test_each_rounds_cpu_is_counted_by_the_role_of_each_process(bench, tmp_path):
    """Real processes: a child of this one that spins, started as a Python-backend stub of model ``sched`` is (its
    script ``<model>/<version>/model.py``), is counted as the scheduler; an idle one of another model is not."""
    import os
    import subprocess
    import time

    def stub(model, code):
        script = tmp_path / model / "1" / "model.py"
        script.parent.mkdir(parents=True)
        script.write_text(code)
        return subprocess.Popen([sys.executable, str(script)])

    busy = stub("sched", "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
                         "time.sleep(30)\n")
    idle = stub("relay", "import time\ntime.sleep(30)\n")
    try:
        deadline = time.monotonic() + 10
        while {bench.stub_model(busy.pid), bench.stub_model(idle.pid)} != {"sched", "relay"}:  # until both exec'd
            assert time.monotonic() < deadline, "the stubs never started"
            time.sleep(0.01)
        assert bench.stub_model(busy.pid) == "sched" and bench.stub_model(idle.pid) == "relay"
        assert {busy.pid, idle.pid} <= set(bench.children(os.getpid()))
        before = bench.cpu_by_role(os.getpid(), "sched", "relay")
        time.sleep(1.5)
        delta = bench.cpu_delta(before, bench.cpu_by_role(os.getpid(), "sched", "relay"))
        assert set(delta) == set(bench.CPU_ROLES)
        assert 0.3 < delta["scheduler"] < 1.2, delta  # the spin's 0.6 s (less what ran before the first read)
        assert delta["relay"] < 0.1 and delta["other models"] == 0.0
        assert "relay" not in bench.cpu_by_role(os.getpid(), "sched", None)  # streams: no relay
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()
    assert bench.cpu_seconds(busy.pid) == 0.0  # a process gone counts nothing


def test_cores_by_role_are_cpu_seconds_over_the_rounds_wall_time(bench):
    records = [bench.Record(max_tokens=4, start=0.5, end=2.0)]
    window = bench.Window(records, start=1.0, deadline=2.0, began=0.0,
                          cpu={"scheduler": 3.0, "client": 0.5})
    assert window.cpu_cores() == {"scheduler": pytest.approx(1.5), "client": pytest.approx(0.25)}
    other = bench.Window(records, start=1.0, deadline=2.0, began=0.0, cpu={"scheduler": 2.0, "client": 0.5})
    third = bench.Window(records, start=1.0, deadline=2.0, began=0.0, cpu={"scheduler": 3.4, "client": 0.1})
    row = bench.summarize([window, other, third])
    assert row["cpu_cores"] == {"client": 0.25, "scheduler": 1.5}  # medians over rounds
    assert bench.summarize([bench.Window(records, 1.0, 2.0)])["cpu_cores"] is None


def _row(system, tokens_per_s, cpu_cores=None, decode_ms=None):
    return {"model": "qwen2", "system": system, "concurrency": 32, "tokens_per_s": tokens_per_s,
            "ttft_p50_ms": 12.0, "ttft_p99_ms": 40.0, "itl_p50_ms": None, "itl_p99_ms": None, "short_p50_ms": 73.5,
            "cpu_cores": cpu_cores, "engine_decode_step_ms": decode_ms, "engine_prefill_ms": 3.0,
            "engine_busy": 0.8}


def test_the_markdown_report_puts_each_process_and_the_cpu_per_token_in_its_tables(bench):
    """The README's tables: the engine timing against the bare loop's, each role's cores with the CPU per 1k tokens
    (all roles' cores over tokens/s), the decode-step table and the targets."""
    result = {
        "rows": [_row("bare", 5000.0, {bench.BARE_ROLE: 1.9}, decode_ms=4.0),
                 _row("inflight-unary", 4000.0, {"scheduler": 1.6, "tritonserver": 0.2, "client": 0.2},
                      decode_ms=5.0)],
        "decode_step": {"rows": 16, "qwen2": {"inflight_runner_ms": {"50": 4.0, "2000": 4.4}}},
        "targets": [{"target": "tokens/s vs bare", "model": "qwen2", "concurrency": 32, "value": 0.8, "pass": False}],
    }
    text = bench.markdown_report(result)
    lines = text.splitlines()
    assert "| qwen2 | inflight-unary | 32 | 4,000 | 12.0 | 40.0 | - | - | 73.5 |" in lines
    assert "| qwen2 | inflight-unary | 32 | 5.00 ms | x1.25 | 3.00 ms | 0.80 |" in lines
    header = next(line for line in lines if "CPU ms per 1k tokens" in line)
    # Only the roles some row measured have a column (no relay here), and a row's roles it has not are "-".
    assert header == ("| model | system | clients | bare loop | scheduler | tritonserver | client"
                      " | all | CPU ms per 1k tokens |")
    # 2.0 cores over 4,000 tokens/s is 0.5 ms a token: 500 ms per 1k tokens.
    assert "| qwen2 | inflight-unary | 32 | - | 1.60 | 0.20 | 0.20 | 2.00 | 500 |" in lines
    assert "| qwen2 | bare | 32 | 1.90 | - | - | - | 1.90 | 380 |" in lines
    assert "| qwen2 in-flight runner | 4.00 ms | 4.40 ms | x1.10 |" in lines
    assert "| tokens/s vs bare | qwen2 | 32 | 0.80 | **fail** |" in lines


def test_the_markdown_report_reads_the_committed_results(bench):
    """The results file the README quotes still renders: every measured row is in the first table."""
    import json

    results = RUN.parents[1] / "results" / "serving.json"
    if not results.exists():
        pytest.skip(f"{results} is written by `make bench`")
    result = json.loads(results.read_text())
    text = bench.markdown_report(result)
    for r in result["rows"]:
        assert f"| {r['model']} | {r['system']} | {r['concurrency']} |" in text
