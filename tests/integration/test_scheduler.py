"""The scheduler in one process, on the ONNX Runtime and PyTorch runners, against transformers' greedy decoding.

No server: sequences are submitted from threads as Triton's execute would, with mixed prompt
lengths and max_tokens, more of them than there are slots, some joining while others decode.
"""

from __future__ import annotations

import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deepseek_model_repository.serving.runners import (KvCache, LayerShape, RunnerError, TorchRunner, available_cpus,
                                                       engine_threads, open_runner)
from deepseek_model_repository.serving.scheduler import (CANCELLED, DECODE, FAILED, PREFILL, NoMetrics, Sampling,
                                                         Scheduler, Sequence)
from triton_harness import build, tiny_model, tiny_resource

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

SLOTS = 3
CAPACITY = 64


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def hf_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def greedy(model, prompt: list[int], max_tokens: int, eos: int = 1) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)
    ids = out[0, len(prompt):].tolist()
    return ids[:-1] if ids and ids[-1] == eos else ids


def run_all(scheduler: Scheduler, jobs: list[tuple[list[int], int]], stagger: float = 0.002) -> list[list[int]]:
    """Submit every job from its own thread (staggered so some join mid-decode); wait for all."""
    results: list = [None] * len(jobs)
    done = threading.Semaphore(0)

    def finisher(index):
        def on_finish(seq, error):
            results[index] = error or list(seq.generated)
            done.release()
        return on_finish

    threads = []
    for i, (prompt, max_tokens) in enumerate(jobs):
        seq = Sequence(prompt, Sampling(max_tokens=max_tokens), on_finish=finisher(i))
        threads.append(threading.Thread(target=scheduler.submit, args=(seq,)))
        threads[-1].start()
        threading.Event().wait(stagger * (i % 4))
    for _ in jobs:
        assert done.acquire(timeout=120)
    return results


def run_to_their_end(scheduler: Scheduler, seqs: list[Sequence]) -> None:
    """Start ``scheduler``, submit ``seqs`` at once, wait for every one to finish, and stop it."""
    done = threading.Semaphore(0)
    scheduler.start()
    try:
        for seq in seqs:
            seq.on_finish = lambda s, e: done.release()
            scheduler.submit(seq)
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        scheduler.stop()


def run_queued(scheduler: Scheduler, seqs: list[Sequence]) -> None:
    """Queue ``seqs`` before ``scheduler``'s loop starts (so that one iteration admits them all), run it until every
    one has finished (each's own ``on_finish`` still called), and stop it."""
    done = threading.Semaphore(0)
    for seq in seqs:
        seq.on_finish = lambda s, e, finish=seq.on_finish: (finish(s, e), done.release())
        scheduler.submit(seq)
    scheduler.start()
    try:
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        scheduler.stop()


def mixed_jobs(seed: int, n: int = 10) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, 2000) for _ in range(rng.randint(1, 14))], rng.randint(1, 18)) for _ in range(n)]


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2", "llama"])
@pytest.mark.parametrize("runtime", ["onnxruntime", "pytorch"])
def test_mixed_sequences_on_few_slots_equal_transformers_alone(cache_dir, arch, runtime):
    import json

    model = hf_model(tiny_model(cache_dir, arch))
    if runtime == "pytorch":
        runner = TorchRunner(model, SLOTS, CAPACITY)
    else:
        engine = build(tiny_resource(cache_dir, f"sched-{arch.replace('_', '-')}", arch=arch), cache_dir)
        runner = open_runner(engine, json.loads((engine / "model-info.json").read_text()), SLOTS, CAPACITY)
    jobs = mixed_jobs(len(arch))
    expected = [greedy(model, prompt, max_tokens) for prompt, max_tokens in jobs]
    # The whole prompts in one prefill, then prompts prefilled 4 tokens an iteration (up to 4 chunks each, joining
    # the cache at every fill level while other rows decode).
    for chunk in (None, 4):
        prefills = PrefillCount()
        scheduler = Scheduler(runner, eos_ids=[1], max_prefill_tokens=chunk, metrics=prefills).start()
        try:
            got = run_all(scheduler, jobs)
        finally:
            scheduler.stop()
        assert got == expected, f"prefill chunk {chunk}"
        assert scheduler.steps < sum(len(g) for g in got), "sequences should share decode steps"
        assert not scheduler.running and not scheduler.waiting and not scheduler.prefilling
        assert int(runner.cache.lengths.sum()) == 0, "finished sequences leave their slots"
        if chunk:
            assert prefills.calls >= sum(-(-len(p) // chunk) for p, _ in jobs) / SLOTS


class PrefillCount(NoMetrics):
    def __init__(self):
        self.calls = 0

    def engine_step(self, phase, seconds):
        self.calls += phase == PREFILL


def test_available_cpus_is_the_affinity_capped_by_the_cgroup_quota(tmp_path):
    """A pod's CPU limit is a cgroup quota, not an affinity: the engine counts by the smaller."""
    import os

    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path / "none") == (affinity, False)  # no cgroup files: the affinity
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert available_cpus(v2) == (affinity, False)
    (v2 / "cpu.max").write_text(f"{100000 * (affinity + 4)} 100000\n")  # a limit above the CPUs seen
    assert available_cpus(v2) == (affinity, False)
    (v2 / "cpu.max").write_text("50000 100000\n")  # half a CPU is still one thread
    assert available_cpus(v2) == ((1, True) if affinity > 1 else (1, False))
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(v1.parent) == (affinity, False)
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    assert available_cpus(v1.parent)[0] == 1


def test_engine_threads_follow_the_request_then_the_cpu_limit_then_onnx_runtime(cache_dir, tmp_path):
    import json
    import os

    limited = tmp_path / "limited"
    limited.mkdir()
    (limited / "cpu.max").write_text("50000 100000\n")
    assert engine_threads(5, tmp_path / "none") == 5
    assert engine_threads(0, tmp_path / "none") is None  # no limit: ONNX Runtime's default
    if len(os.sched_getaffinity(0)) > 1:
        assert engine_threads(0, limited) == 1  # a limit of half a CPU: one thread, not one per core
    with pytest.raises(RunnerError, match="engine threads -1 must be 0"):
        engine_threads(-1)
    engine = build(tiny_resource(cache_dir, "sched-threads"), cache_dir)
    info = json.loads((engine / "model-info.json").read_text())
    runner = open_runner(engine, info, SLOTS, CAPACITY, threads=3)
    assert runner.session.get_session_options().intra_op_num_threads == 3
    if engine_threads(0) is None:
        runner = open_runner(engine, info, SLOTS, CAPACITY)
        assert runner.session.get_session_options().intra_op_num_threads == 0  # left to ONNX Runtime


def test_the_cache_is_allocated_once_and_written_in_place(cache_dir):
    """The cache arrays keep their buffers through admissions, steps and compaction; only lengths change."""
    import json

    engine = build(tiny_resource(cache_dir, "sched-inplace"), cache_dir)
    runner = open_runner(engine, json.loads((engine / "model-info.json").read_text()), SLOTS, CAPACITY)
    buffers = [t.__array_interface__["data"][0] for layer in runner.cache.layers for t in layer]
    scheduler = Scheduler(runner, eos_ids=[1]).start()
    try:
        run_all(scheduler, mixed_jobs(7, n=8))
    finally:
        scheduler.stop()
    assert buffers == [t.__array_interface__["data"][0] for layer in runner.cache.layers for t in layer]
    # What the runner binds for a step's rows is ONNX Runtime's view of those very bytes, not a copy of them.
    for start, stop in ((0, SLOTS), (1, SLOTS), (0, 1)):
        for view in runner.cache.rows(start, stop):
            bound = runner.ort.OrtValue.ortvalue_from_numpy(view)
            assert bound.data_ptr() == view.__array_interface__["data"][0] and bound.shape() == list(view.shape)


@pytest.mark.parametrize("tensors", ["numpy", "torch"])
def test_kv_cache_write_stores_each_rows_new_positions_after_its_own(tensors):
    """Rows of different lengths, each getting a different number of new positions (a prefill), then one each."""
    import torch

    cache = KvCache([LayerShape(2, 4, 1, 3)] * 2, slots=4, capacity=8, dtype=np.float32 if tensors == "numpy"
                    else torch.float32, torch_tensors=tensors == "torch")
    as_array = (lambda t: t) if tensors == "numpy" else (lambda t: t.numpy())
    rng = np.random.default_rng(0)
    want = [[np.zeros(t.shape, np.float32) for t in layer] for layer in cache.layers]
    cache.lengths[:] = [0, 3, 1, 2]
    for counts, width in (([2, 0, 4], 4), ([1, 1, 1], 1)):
        start = 1
        new = [rng.standard_normal((3, t.shape[1], width, t.shape[3])).astype(np.float32)
               for layer in cache.layers for t in layer]
        for i, layer in enumerate(want):
            for j, tensor in enumerate(layer):
                for r, n in enumerate(counts):
                    at = int(cache.lengths[start + r])
                    tensor[start + r, :, at:at + n] = new[2 * i + j][r, :, :n]
        cache.write(start, counts, new if tensors == "numpy" else [torch.from_numpy(a) for a in new])
    assert cache.lengths.tolist() == [0, 6, 2, 7]
    for got, expected in zip(cache.rows(0, 4), [t for layer in want for t in layer]):
        np.testing.assert_array_equal(as_array(got), expected)



@pytest.mark.parametrize("tensors", ["numpy", "torch"])
def test_kv_cache_write_index_taken_before_the_step_gives_the_same_cache(tensors):
    """A runner takes the write index before the engine runs (on a GPU, while the device is idle): the same
    positions as an index taken at the write."""
    import torch

    rng = np.random.default_rng(2)
    dtype = np.float32 if tensors == "numpy" else torch.float32
    early, late = (KvCache([LayerShape(2, 4, 1, 3)] * 2, slots=4, capacity=8, dtype=dtype,
                           torch_tensors=tensors == "torch") for _ in range(2))
    for cache in (early, late):
        cache.lengths[:] = [1, 0, 2, 3]
    counts = [3, 1, 2]
    new = [rng.standard_normal((3, t.shape[1], 3, t.shape[3])).astype(np.float32)
           for layer in early.layers for t in layer]
    new = new if tensors == "numpy" else [torch.from_numpy(a) for a in new]
    index = early.write_index(1, counts)
    assert tuple(index.shape) == (4, sum(counts))
    early.write(1, counts, new, index)
    late.write(1, counts, new)
    assert early.lengths.tolist() == late.lengths.tolist() == [1, 3, 3, 5]
    for a, b in zip(early.rows(0, 4), late.rows(0, 4)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_inputs_reach_the_device_as_views_of_one_copy():
    from deepseek_model_repository.serving.runners import feeds_on_device

    feeds = {"input_ids": np.arange(6, dtype=np.int64).reshape(2, 3), "position_ids": np.ones((2, 3), np.int64),
             "token_mask": np.array([[1, 1, 0], [1, 0, 0]], np.int64), "cache_lengths": np.array([4, 7], np.int64)}
    got = feeds_on_device(feeds, "cpu")
    assert list(got) == list(feeds)
    assert len({t.untyped_storage().data_ptr() for t in got.values()}) == 1, "one buffer, one copy"
    for name, array in feeds.items():
        assert tuple(got[name].shape) == array.shape
        np.testing.assert_array_equal(got[name].numpy(), array)
        # each where TensorRT takes an address (torch's allocator aligns the buffer itself to 512 bytes on a GPU)
        assert (got[name].data_ptr() - got[name].untyped_storage().data_ptr()) % 256 == 0, name


def test_a_tensorrt_plan_is_refused_on_another_gpu_architecture_and_a_cache_slot_must_fill_whole_256_bytes():
    """The TensorRT runner's checks before it loads a plan (the runner itself needs a GPU and TensorRT: tests/gpu):
    the GPU that built the plan (model-info.json's ``gpu``) against this one, and each slot's bytes, since a slot's
    rows are bound by address."""
    import torch

    from deepseek_model_repository.serving.runners import _check_plan_gpu, _check_row_alignment

    h100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    _check_plan_gpu(h100, "NVIDIA H100 PCIe", (9, 0))
    _check_plan_gpu(None, "NVIDIA A100-SXM4-80GB", (8, 0))  # an engine that recorded none: TensorRT decides
    with pytest.raises(RunnerError, match=r"built on NVIDIA H100 80GB HBM3 \(compute capability 9.0\) and this GPU "
                                          r"is NVIDIA A100-SXM4-80GB \(8.0\).*serving.nodeSelector nvidia.com/gpu.product"):
        _check_plan_gpu(h100, "NVIDIA A100-SXM4-80GB", (8, 0))
    shape = LayerShape(key_heads=1, key_dim=64, value_heads=1, value_dim=64)
    _check_row_alignment(KvCache([shape], 2, 128, torch.float16, torch_tensors=True))
    with pytest.raises(RunnerError, match="takes 12928 bytes, not a multiple of 256.*multiple of 128"):
        _check_row_alignment(KvCache([shape], 2, 101, torch.float16, torch_tensors=True))

def test_step_logits_give_the_same_tokens_from_numpy_and_from_torch():
    import torch

    from deepseek_model_repository.serving.runners import StepLogits

    data = np.random.default_rng(1).standard_normal((3, 50)).astype(np.float32)
    data[2, [7, 9]] = 10.0  # a tie: the first index, as np.argmax
    host, device = StepLogits(data), StepLogits(torch.from_numpy(data.copy()))
    assert host.argmax().tolist() == device.argmax().tolist() == [int(np.argmax(r)) for r in data]
    assert device.argmax()[2] == 7
    np.testing.assert_array_equal(device.row(1), data[1])
    np.testing.assert_array_equal(device.numpy(), host.numpy())


def test_step_logits_mark_a_row_that_holds_a_nan_from_numpy_and_from_torch():
    """A row with a NaN anywhere has no token to choose (numpy and torch both take NaN for the largest value, which
    would choose the NaN's index as a token): it is NAN_ROW, greedy or sampled; the other rows are unchanged."""
    import torch

    from deepseek_model_repository.serving.runners import NAN_ROW, StepLogits
    from deepseek_model_repository.serving.sampling import pick

    data = np.random.default_rng(2).standard_normal((3, 50)).astype(np.float32)
    want = [int(np.argmax(r)) for r in data]
    data[1, 31] = np.nan
    for logits in (StepLogits(data), StepLogits(torch.from_numpy(data.copy())), StepLogits(torch.from_numpy(
            data.astype(np.float16)))):
        assert logits.argmax().tolist() == [want[0], NAN_ROW, want[2]]
    sampled = Sequence([5], Sampling(max_tokens=1, temperature=1.0, top_k=5, seed=0))
    assert pick(data[1], sampled) == NAN_ROW and pick(data[0], sampled) >= 0


@pytest.mark.parametrize("chunk", [None, 2], ids=["whole-prefill", "chunked-prefill"])
def test_a_sequence_whose_logits_turn_nan_fails_by_name_and_leaves_its_slot_clean_for_the_next(cache_dir, chunk):
    """An engine that overflows (here a tiny Qwen2 whose embedding of one token is NaN, so a prompt with that token
    fills its cache rows and logits with NaN) fails that sequence, greedy or sampled, with an error that says what to
    change, instead of choosing token 0 again and again; the others in the batch go on, and the sequences that
    take its slot afterwards equal transformers': a NaN left in the slot's unused positions would reach them through
    their attention's masked positions.  Prefilled in chunks, the NaN is caught at the chunk where it enters the
    cache (no token comes of that chunk), before the slot can be moved, left or copied from."""
    import torch

    model = hf_model(tiny_model(cache_dir, "qwen2"))
    clean = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    want = [greedy(model, p, 8) for p in clean]
    poison = 77
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    ended: dict = {}

    def answer(label):
        return lambda s, e: ended.update({label: (s.outcome, e, list(s.generated))})

    seqs = [Sequence([5, 6, poison, 7, 8, 9], Sampling(max_tokens=8), on_finish=answer("greedy")),
            Sequence(clean[0], Sampling(max_tokens=8), on_finish=answer(0)),
            Sequence([poison, 8], Sampling(max_tokens=8, temperature=1.0, seed=1), on_finish=answer("sampled")),
            Sequence(clean[1], Sampling(max_tokens=8), on_finish=answer(1)),
            Sequence(clean[2], Sampling(max_tokens=8), on_finish=answer(2))]
    runner = TorchRunner(model, 2, CAPACITY)
    run_queued(Scheduler(runner, eos_ids=[1], max_prefill_tokens=chunk), seqs)
    # Chunked, the sampled prompt's 2 tokens may be split too (the budget the others leave), caught at either chunk.
    where = {"greedy": r"after 4 of its prompt's 6 tokens" if chunk else r"for token 1 of this completion",
             "sampled": r"(after 1 of its prompt's 2 tokens|for token 1 of this completion)"}
    for label in ("greedy", "sampled"):
        outcome, error, generated = ended[label]
        assert outcome == FAILED and generated == []
        assert re.search(f"logits {where[label]} hold NaN", error) and "engine.precision" in error, error
    assert [ended[i][:2] for i in range(3)] == [("length", None)] * 3
    assert [ended[i][2] for i in range(3)] == want
    assert not any(bool(torch.isnan(t).any()) for layer in runner.cache.layers for t in layer)


def test_sampled_and_greedy_sequences_decode_together_on_the_torch_runner(cache_dir):
    """Greedy rows take the step's argmax where the logits are; a sampling row copies its own row: top_k 1 is
    greedy, and a seed gives the same tokens again."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    runner = TorchRunner(model, 3, CAPACITY)
    scheduler = Scheduler(runner, eos_ids=[1]).start()
    prompt = [5, 6, 7, 8]
    samplings = [Sampling(max_tokens=10), Sampling(max_tokens=10, temperature=1.5, top_k=1),
                 Sampling(max_tokens=10, temperature=1.0, seed=3), Sampling(max_tokens=10, temperature=1.0, seed=3)]
    done = threading.Semaphore(0)
    sequences = [Sequence(prompt, s, on_finish=lambda seq, error: done.release()) for s in samplings]
    try:
        for seq in sequences:
            scheduler.submit(seq)
        for _ in sequences:
            assert done.acquire(timeout=60)
    finally:
        scheduler.stop()
    want = greedy(model, prompt, 10)
    assert sequences[0].generated == sequences[1].generated == want
    assert sequences[2].generated == sequences[3].generated


def test_kv_cache_move_keeps_only_the_valid_positions():
    cache = KvCache([LayerShape(2, 4, 1, 3)], slots=3, capacity=8, dtype=np.float32)
    key, value = cache.layers[0]
    cache.write(2, [5], [np.ones((1, 2, 5, 4), np.float32), np.full((1, 1, 5, 3), 2, np.float32)])
    cache.move(2, 0)
    assert cache.lengths.tolist() == [5, 0, 0]
    assert key[0, :, :5].min() == 1 and value[0, :, :5].min() == 2
    cache.move(0, 0)  # onto itself: nothing changes
    assert cache.lengths.tolist() == [5, 0, 0] and key[0, :, :5].min() == 1


def test_a_sequence_that_ends_moves_at_most_one_other_sequences_cache(cache_dir):
    """Four sequences decode; the one in slot 0 ends first. The one in the last slot takes its slot, and the other
    two stay where they are (the running ones are not all shifted down one slot, each a copy of its cache); every
    completion is still transformers'."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    jobs = [([5, 6, 7], 2), ([8, 9, 10, 11], 12), ([12, 13], 12), ([14, 15, 16, 17, 18], 12)]
    slots: list[list[int]] = [[] for _ in jobs]
    seqs = [Sequence(prompt, Sampling(max_tokens=n), on_token=lambda seq, token, i=i: slots[i].append(seq.slot))
            for i, (prompt, n) in enumerate(jobs)]
    run_queued(Scheduler(TorchRunner(model, len(jobs), CAPACITY), eos_ids=[]), seqs)
    assert [seq.generated for seq in seqs] == [greedy(model, prompt, n, eos=-1) for prompt, n in jobs]
    assert [s[0] for s in slots] == [0, 1, 2, 3]
    assert slots[1] == [1] * 12 and slots[2] == [2] * 12
    assert slots[3][:2] == [3, 3] and set(slots[3][2:]) == {0}


def test_a_long_prompt_is_prefilled_a_chunk_an_iteration_while_the_running_sequence_decodes(cache_dir):
    """A 40-token prompt with a budget of 8 prompt tokens an iteration: 5 chunks, and the running sequence makes a
    token after each of the first 4, before the long prompt's first token. Both completions are transformers'."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    events: list = []

    class Events(NoMetrics):
        def admitted(self, queue_seconds, prompt_tokens):
            events.append(("admitted", prompt_tokens))

        def engine_step(self, phase, seconds):
            events.append(phase)

    scheduler = Scheduler(TorchRunner(model, 2, CAPACITY), eos_ids=[1], max_prefill_tokens=8,
                          metrics=Events()).start()
    started, finished = threading.Event(), threading.Semaphore(0)
    long_prompt = [3 + (i * 37) % 1900 for i in range(40)]

    def on_token(name):
        def record(seq, token):
            events.append(name)
            if name == "running" and len(seq.generated) == 2:
                started.set()
        return record

    running = Sequence([5, 6, 7], Sampling(max_tokens=30), on_token=on_token("running"),
                       on_finish=lambda s, e: finished.release())
    joining = Sequence(long_prompt, Sampling(max_tokens=6), on_token=on_token("joining"),
                       on_finish=lambda s, e: finished.release())
    try:
        scheduler.submit(running)
        assert started.wait(60)
        scheduler.submit(joining)
        assert finished.acquire(timeout=60) and finished.acquire(timeout=60)
    finally:
        scheduler.stop()
    assert list(running.generated) == greedy(model, [5, 6, 7], 30) and len(running.generated) > 12
    assert list(joining.generated) == greedy(model, long_prompt, 6)
    window = events[events.index(("admitted", 40)):events.index("joining")]
    assert window.count(PREFILL) == 5 and window.count("running") == 4, window
    assert window[1:] == [PREFILL, DECODE, "running"] * 4 + [PREFILL]


def test_a_prompt_whose_timeout_passes_while_it_is_prefilled_leaves_its_slot(cache_dir):
    """A prompt prefilled a token an iteration, whose timeout passes half way: it ends with an error naming how much
    of it was prefilled, its slot is emptied, and the sequence that decodes beside it is not disturbed."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    runner = TorchRunner(model, 2, 256)
    scheduler = Scheduler(runner, eos_ids=[1], max_prefill_tokens=1, client_poll_s=0.005).start()
    ended: dict = {}
    done = threading.Semaphore(0)

    def finish(name):
        return lambda seq, error: (ended.update({name: error}), done.release())

    slow = Sequence([3 + i for i in range(250)], Sampling(max_tokens=4), on_finish=finish("slow"), timeout_s=0.1,
                    on_token=lambda s, t: pytest.fail("a prompt whose timeout passed made a token"))
    beside = Sequence([8, 9], Sampling(max_tokens=20), on_finish=finish("beside"))
    try:
        scheduler.submit(beside)
        scheduler.submit(slow)
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        scheduler.stop()
    assert 0 < slow.prefilled < 250 and not slow.generated
    assert f"after {slow.prefilled} of its prompt's 250 tokens were prefilled" in ended["slow"]
    assert ended["beside"] is None and list(beside.generated) == greedy(model, [8, 9], 20)
    assert int(runner.cache.lengths.sum()) == 0 and not scheduler.prefilling


def test_a_prefill_budget_below_one_token_is_refused(cache_dir):
    runner = TorchRunner(hf_model(tiny_model(cache_dir, "qwen2")), 1, 8)
    with pytest.raises(ValueError, match="prefill chunk of 0 tokens: it must be at least 1"):
        Scheduler(runner, eos_ids=[1], max_prefill_tokens=0)


def test_a_sequence_cannot_outgrow_the_cache(cache_dir):
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    runner = TorchRunner(model, 1, 8)
    with pytest.raises(RunnerError, match="capacity of 8"):
        runner.step(0, np.ones((1, 9), np.int64), np.ones((1, 9), np.int64))
    scheduler = Scheduler(runner, eos_ids=[1])
    with pytest.raises(ValueError, match="cache holds 8"):
        scheduler.submit(Sequence(list(range(3, 11)), Sampling(max_tokens=4)))
    # A sequence that fills its slot ends there, with what fitted.
    scheduler.start()
    try:
        [got] = run_all(scheduler, [([5, 6, 7, 8, 9, 10], 50)])
    finally:
        scheduler.stop()
    assert len(got) == 2


def test_a_cancelled_sequence_leaves_and_the_others_go_on(cache_dir):
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    runner = TorchRunner(model, 2, CAPACITY)
    scheduler = Scheduler(runner, eos_ids=[1]).start()
    gone = threading.Event()
    finished = threading.Event()
    cancelled = Sequence([5, 6, 7], Sampling(max_tokens=60), on_token=lambda s, t: gone.set(),
                         cancelled=gone.is_set)
    other: dict = {}
    survivor = Sequence([8, 9], Sampling(max_tokens=12),
                        on_finish=lambda s, e: (other.update(tokens=list(s.generated), error=e), finished.set()))
    try:
        scheduler.submit(cancelled)
        scheduler.submit(survivor)
        assert finished.wait(60)
    finally:
        scheduler.stop()
    assert cancelled.finished and len(cancelled.generated) < 60
    assert other == {"tokens": greedy(model, [8, 9], 12), "error": None}


def test_a_request_whose_timeout_passes_is_answered_with_an_error_running_or_queued_and_the_next_one_runs(cache_dir):
    """Triton's per-request timeout bounds a sequence: a running one ends at the next step with an error naming its
    tokens, a queued one leaves the queue at once with an error naming the busy slots; the slot goes to the next."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    runner = TorchRunner(model, 1, CAPACITY)

    class Outcomes(NoMetrics):
        def __init__(self):
            self.seen = []

        def ended(self, outcome):
            self.seen.append(outcome)

    outcomes = Outcomes()
    scheduler = Scheduler(runner, eos_ids=[1], client_poll_s=0.005, metrics=outcomes).start()
    ended: dict = {}

    def finish(name):
        return lambda seq, error: ended.update({name: (time.monotonic(), len(seq.generated), error)})

    # The running one takes 10 ms a token (a slow engine), so its 60 tokens would take 600 ms.
    running = Sequence([5, 6, 7], Sampling(max_tokens=60), on_token=lambda s, t: time.sleep(0.01),
                       on_finish=finish("running"), timeout_s=0.15)
    queued = Sequence([8, 9], Sampling(max_tokens=5), on_finish=finish("queued"), timeout_s=0.05)
    after = Sequence([8, 9], Sampling(max_tokens=12), on_finish=finish("after"))
    try:
        began = time.monotonic()
        for seq in (running, queued, after):
            scheduler.submit(seq)
        deadline = time.monotonic() + 60
        while len(ended) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        scheduler.stop()
    at, tokens, error = ended["queued"]
    assert tokens == 0 and queued.expired and "timeout of 50 ms passed while it waited" in error
    assert "1 KV-cache slots, all busy" in error and at - began < 0.15
    at, tokens, error = ended["running"]
    assert running.expired and 0 < tokens < 60 and f"after {tokens} of its 60 tokens" in error
    assert 0.15 <= at - began < 0.5
    assert ended["after"][2] is None and list(after.generated) == greedy(model, [8, 9], 12)
    assert outcomes.seen[:2] == ["timed_out", "timed_out"] and outcomes.seen[2:] in (["stop"], ["length"])


def test_a_queued_request_that_times_out_is_told_what_held_it():
    """Every slot busy: more replicas; a slot free but the iteration's prefill budget taken by longer prompts: the
    prefill chunk, or shorter prompts; neither (its timeout passed before the loop looked): a longer timeout."""
    queued = Sequence([5, 6], Sampling(max_tokens=4), timeout_s=0.05)
    assert "waited for one of the 2 KV-cache slots, all busy" in queued.timeout_error(2, free=0)
    behind = queued.timeout_error(2, free=1, prefilling=True)
    assert "behind longer prompts being prefilled" in behind and "serving.prefillChunkTokens" in behind
    assert "all busy" not in behind
    assert queued.timeout_error(2, free=1) == ("the request's timeout of 50 ms passed before it could be admitted: "
                                               "allow a longer timeout (the request's, or serving.requestTimeoutSeconds)")


def test_a_stalled_loop_logs_every_threads_stack_once_and_goes_on_when_it_moves(cache_dir, caplog):
    """An engine call that does not return (here: held until the test lets it go) is reported once per stall."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    release = threading.Event()

    class HeldRunner(TorchRunner):
        def _run(self, feeds, start, stop):
            release.wait(30)
            return super()._run(feeds, start, stop)

    scheduler = Scheduler(HeldRunner(model, 1, CAPACITY), eos_ids=[1], client_poll_s=0.01, stall_s=0.2).start()
    done = threading.Event()
    seq = Sequence([8, 9], Sampling(max_tokens=4), on_finish=lambda s, e: done.set())
    try:
        with caplog.at_level("ERROR", logger="deepseek_model_repository.scheduler"):
            scheduler.submit(seq)
            time.sleep(0.8)
            stalls = [r.getMessage() for r in caplog.records if "has not finished an iteration" in r.getMessage()]
            release.set()
            assert done.wait(60)
    finally:
        release.set()
        scheduler.stop()
    assert len(stalls) == 1, stalls
    assert "0 sequences running, 1 being prefilled and 0 waiting" in stalls[0]  # held in its prefill
    assert "thread deepseek-scheduler:" in stalls[0] and "release.wait(30)" in stalls[0]
    assert list(seq.generated) == greedy(model, [8, 9], 4)


def test_a_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout must be positive"):
        Sequence([5], Sampling(max_tokens=1), timeout_s=0)


def test_a_sequence_whose_client_went_away_still_gets_its_final_response_as_cancelled(cache_dir):
    """Running or queued, a sequence whose client went away leaves at once and gets its final response (Triton holds
    a request until its final response, and a relay waits for it), marked cancelled; a queued one leaves the queue
    at the watcher's next look, not when a slot frees."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    runner = TorchRunner(model, 1, CAPACITY)
    scheduler = Scheduler(runner, eos_ids=[1], client_poll_s=0.002).start()
    gone = threading.Event()
    answered: dict = {}

    def answer(label):
        return lambda s, e: answered.update({label: (len(s.generated), e, s.outcome)})

    hog = Sequence([9, 10, 11], Sampling(max_tokens=200, ignore_eos=True), on_finish=answer("hog"))
    running = Sequence([5, 6, 7], Sampling(max_tokens=60), on_token=lambda s, t: gone.set(), cancelled=gone.is_set,
                       on_finish=answer("running"))
    queued = Sequence([5, 6, 8], Sampling(max_tokens=60), cancelled=gone.is_set, on_finish=answer("queued"))
    try:
        scheduler.submit(running)
        deadline = time.monotonic() + 60
        while not running.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        gone.clear()
        scheduler.submit(hog)  # holds the one slot while the next one waits
        while not hog.generated and time.monotonic() < deadline:
            time.sleep(0.001)
        scheduler.submit(queued)
        time.sleep(0.05)
        assert len(scheduler.waiting) == 1 and not queued.finished
        gone.set()
        while not queued.finished and time.monotonic() < deadline:
            time.sleep(0.001)
        assert queued.finished and not hog.finished, "out of the queue while the slot is still held"
        assert len(scheduler.waiting) == 0
    finally:
        scheduler.stop()
    assert answered["running"][0] < 60 and answered["running"][1:] == (None, CANCELLED)
    assert answered["queued"] == (0, None, CANCELLED)


def test_a_response_that_fails_or_an_admission_that_fails_still_answers_every_sequence(cache_dir):
    """A response that cannot be built (``on_token`` raises) fails its sequence with the error, unless its client
    went away (then cancelled); a failure while admitting a group of sequences fails them all. Each gets its final
    response."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))

    def broken(seq, token):
        if len(seq.generated) == 3:
            raise RuntimeError("the response could not be built")

    ended: dict = {}
    seqs = [Sequence([5, 6, 7], Sampling(max_tokens=20), on_token=broken,
                     on_finish=lambda s, e: ended.update({"broken": (s.outcome, e, len(s.generated))})),
            Sequence([5, 6, 8], Sampling(max_tokens=20), on_token=broken, cancelled=lambda: True,
                     on_finish=lambda s, e: ended.update({"gone": (s.outcome, e)}))]
    run_queued(Scheduler(TorchRunner(model, 2, CAPACITY), eos_ids=[1], client_poll_s=60), seqs)
    assert ended["broken"] == (FAILED, "generation failed: the response could not be built", 3)
    assert ended["gone"] == (CANCELLED, None)

    class FailsOnce(NoMetrics):
        calls = 0

        def admitted(self, queue_seconds, prompt_tokens):
            FailsOnce.calls += 1
            if FailsOnce.calls == 2:
                raise RuntimeError("counting failed")

    answers: list = []
    group = [Sequence([5, 6, 7 + i], Sampling(max_tokens=4), on_finish=lambda s, e: answers.append((s.outcome, e)))
             for i in range(4)]
    scheduler = Scheduler(TorchRunner(model, 4, CAPACITY), eos_ids=[1], metrics=FailsOnce())
    run_queued(scheduler, group)
    assert answers == [(FAILED, "generation failed: counting failed")] * 4


def test_a_failing_client_poll_or_metric_frees_the_slot_and_the_loop_goes_on(cache_dir):
    """A poll of Triton that raises (a client's cancel state, a gauge) costs that sequence, never the scheduler."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    runner = TorchRunner(model, 2, CAPACITY)

    class BrokenGauges(NoMetrics):
        def gauges(self, waiting, running, cache_utilization):
            raise RuntimeError("the metrics port is gone")

    def poll_fails() -> bool:
        raise RuntimeError("cannot reach the server")

    polls = []

    def poll_fails_once_running() -> bool:  # the watcher's first poll answers; its next one raises
        polls.append(1)
        return poll_fails() if len(polls) > 1 else False

    scheduler = Scheduler(runner, eos_ids=[1], metrics=BrokenGauges(), client_poll_s=0.002).start()
    try:
        for poll in (poll_fails, poll_fails_once_running):
            ended: dict = {}
            done = threading.Event()
            broken = Sequence([5, 6, 7], Sampling(max_tokens=60), cancelled=poll,
                              on_finish=lambda s, e: (ended.update(error=e, tokens=len(s.generated)), done.set()))
            scheduler.submit(broken)
            assert done.wait(60)
            assert "could not check its client" in ended["error"]
            assert ended["tokens"] < 60
        [got] = run_all(scheduler, [([8, 9], 12)])
    finally:
        scheduler.stop()
    assert got == greedy(model, [8, 9], 12)
    assert not scheduler.running


def test_a_failed_publication_is_tried_again_once_idle_so_the_gauges_do_not_keep_a_busy_servers_values(cache_dir,
                                                                                                        caplog):
    """The autoscalers read the gauges: a publication that fails as the loop goes idle is tried again every
    ``publish_interval_s`` until one goes through, with one warning for the run of failures."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))

    class FailsTwice(NoMetrics):
        def __init__(self):
            self.tries, self.sent = 0, None

        def gauges(self, waiting, running, cache_utilization):
            self.pending = (waiting, running, cache_utilization)

        def publish(self):
            self.tries += 1
            if self.tries <= 2:
                raise RuntimeError("the metrics port is gone")
            self.sent = self.pending

    metrics = FailsTwice()
    scheduler = Scheduler(TorchRunner(model, 2, CAPACITY), eos_ids=[], metrics=metrics, publish_interval_s=0.2,
                          idle_publish_s=0.05)
    with caplog.at_level("INFO", logger="deepseek_model_repository.scheduler"):
        scheduler.start()
        try:
            done = threading.Event()
            scheduler.submit(Sequence([5, 6, 7], Sampling(max_tokens=3), on_finish=lambda s, e: done.set()))
            assert done.wait(60)
            deadline = time.monotonic() + 10
            while metrics.sent != (0, 0, 0.0) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            scheduler.stop()
    assert metrics.sent == (0, 0, 0.0) and metrics.tries >= 3
    warnings = [r for r in caplog.records if "publishing the scheduler's metrics failed" in r.getMessage()]
    assert len(warnings) == 1 and any("works again" in r.getMessage() for r in caplog.records)


def test_the_decode_loop_neither_polls_clients_nor_publishes_metrics_per_token(cache_dir):
    """Both are round trips to Triton's process: the watcher polls on its own clock, metrics go out in batches."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    runner = TorchRunner(model, 2, CAPACITY)

    class Counting(NoMetrics):
        def __init__(self):
            self.counted = self.published = self.publishes = 0

        def tokens(self, count):
            self.counted += count

        def publish(self):
            self.publishes += 1
            self.published, self.counted = self.published + self.counted, 0

    polls = []
    metrics = Counting()
    scheduler = Scheduler(runner, eos_ids=[], metrics=metrics, client_poll_s=30.0, publish_interval_s=30.0).start()
    try:
        done = threading.Event()
        seq = Sequence([5, 6, 7], Sampling(max_tokens=40), cancelled=lambda: polls.append(1) or False,
                       on_finish=lambda s, e: done.set())
        scheduler.submit(seq)
        assert done.wait(60)
        deadline = time.monotonic() + 10
        while metrics.published < 40 and time.monotonic() < deadline:  # the loop publishes once idle
            time.sleep(0.01)
    finally:
        scheduler.stop()
    assert len(seq.generated) == 40 and scheduler.steps == 39
    assert polls == []
    assert metrics.published == 40 and metrics.publishes <= 3


def test_a_request_that_comes_as_the_loop_goes_idle_is_not_held_by_a_publication(cache_dir):
    """A closed-loop client's next request comes just after its answer.  The loop publishes only once it has been
    idle for ``idle_publish_s``, and outside the queue's lock, so that request neither waits in ``submit`` nor for
    the publication's round trips (here a publication that takes 2 s); an idle loop still publishes."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    runner = TorchRunner(model, 2, CAPACITY)

    class Slow(NoMetrics):
        def __init__(self):
            self.counted = self.published = 0

        def tokens(self, count):
            self.counted += count

        def publish(self):
            time.sleep(2.0)
            self.published, self.counted = self.published + self.counted, 0

    metrics = Slow()
    scheduler = Scheduler(runner, eos_ids=[], metrics=metrics, publish_interval_s=30.0, idle_publish_s=1.0).start()
    try:
        first = threading.Event()
        scheduler.submit(Sequence([5, 6, 7], Sampling(max_tokens=4), on_finish=lambda s, e: first.set()))
        assert first.wait(60)
        second, began = threading.Event(), time.monotonic()
        scheduler.submit(Sequence([8, 9], Sampling(max_tokens=4), on_finish=lambda s, e: second.set()))
        submitted = time.monotonic() - began
        assert second.wait(60)
        took = time.monotonic() - began
        deadline = time.monotonic() + 10
        while metrics.published < 8 and time.monotonic() < deadline:  # idle now: the loop publishes after 1 s
            time.sleep(0.01)
    finally:
        scheduler.stop()
    assert submitted < 0.5 and took < 1.5, (submitted, took)
    assert metrics.published == 8


def test_each_engine_call_is_timed_by_phase(cache_dir):
    """One prefill for the admitted sequences, then one decode step per token after the first, each with its time
    (the engine_step_seconds histogram, by phase)."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    runner = TorchRunner(model, 2, CAPACITY)

    class Steps(NoMetrics):
        def __init__(self):
            self.steps = []

        def engine_step(self, phase, seconds):
            self.steps.append((phase, seconds))

    metrics = Steps()
    scheduler = Scheduler(runner, eos_ids=[], metrics=metrics).start()
    try:
        began = time.perf_counter()
        [got] = run_all(scheduler, [([5, 6, 7], 12)])
        took = time.perf_counter() - began
    finally:
        scheduler.stop()
    assert len(got) == 12
    assert [phase for phase, _ in metrics.steps] == [PREFILL] + [DECODE] * 11
    assert all(seconds > 0 for _, seconds in metrics.steps)
    assert sum(seconds for _, seconds in metrics.steps) <= took


def test_the_chunked_prefill_bench_round_runs_on_the_scheduler_and_leaves_the_cache_empty(cache_dir):
    """bench/serving/chunked_prefill.py's round, small: with a budget of 16 each of the 3 decoders makes a token after
    each of the first 6 of the 100-token prompt's 7 chunks, before its first token; with a budget that takes it
    whole, at most the token of the step that was under way when it arrived."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "serving" / "chunked_prefill.py"
    spec = importlib.util.spec_from_file_location("bench_chunked_prefill", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runner = TorchRunner(hf_model(tiny_model(cache_dir, "qwen2")), 4, 160)
    chunked = bench.one_round(runner, 16, seed=1, long_prompt=100)
    whole = bench.one_round(runner, 128, seed=1, long_prompt=100)
    assert int(runner.cache.lengths.sum()) == 0
    for row in (chunked, whole):
        assert row["decode_gap_ms"] > 0 and row["longest_gap_ms"] > 0 and row["ttft_ms"] > 0
    assert chunked["decoder_tokens"] >= 3 * 6 and whole["decoder_tokens"] <= 3
    padding = bench.padding_round(runner, (60, 5, 5))
    assert padding["one_padded_call_ms"] > 0 and padding["grouped_calls_ms"] > 0
    assert int(runner.cache.lengths.sum()) == 0


def test_prefill_groups_bound_the_padding_and_keep_the_rows_in_order():
    from deepseek_model_repository.serving.scheduler import PREFILL_PAD_SLACK, prefill_groups

    assert prefill_groups([]) == []
    assert prefill_groups([7]) == [(0, 1)]
    assert prefill_groups([100] * 8) == [(0, 8)]  # equal rows: one call, no padding
    assert prefill_groups([20] * 7 + [1000]) == [(0, 7), (7, 8)]
    assert prefill_groups([1000] + [20] * 7) == [(0, 1), (1, 8)]
    assert prefill_groups([12, 30, 25, 40]) == [(0, 4)]  # short prompts share a call: 160 padded for 107 real
    assert prefill_groups([300, 20, 20, 300]) == [(0, 1), (1, 3), (3, 4)]
    for chunks in ([3, 1, 4, 1, 5, 9, 2, 6], [50, 1, 1, 1, 50, 50], [1] * 5 + [64] + [2] * 3, [900, 1, 700, 2, 2000]):
        groups = prefill_groups(chunks)
        assert [i for a, b in groups for i in range(a, b)] == list(range(len(chunks)))  # every row once, in order
        for a, b in groups:
            padded, real = (b - a) * max(chunks[a:b]), sum(chunks[a:b])
            assert b - a == 1 or padded <= real * 5 // 4 + PREFILL_PAD_SLACK


def test_a_long_and_short_prompts_admitted_together_take_separate_calls_and_equal_transformers(cache_dir):
    """One 90-token prompt and five of 3 tokens arrive together: two prefill calls (the long one alone, the short
    ones together) rather than six rows padded to 90; every completion is transformers'."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    calls: list = []

    class Calls(NoMetrics):
        def engine_step(self, phase, seconds):
            calls.append(phase)

    scheduler = Scheduler(TorchRunner(model, 6, 128), eos_ids=[1], metrics=Calls())
    long_prompt = [3 + (i * 53) % 1900 for i in range(90)]
    jobs = [(long_prompt, 5)] + [([10 + i, 20 + i, 30 + i], 5) for i in range(5)]
    results: list = [None] * len(jobs)
    run_queued(scheduler, [Sequence(prompt, Sampling(max_tokens=max_tokens),
                                    on_finish=lambda s, e, i=i: results.__setitem__(i, e or list(s.generated)))
                           for i, (prompt, max_tokens) in enumerate(jobs)])
    assert results == [greedy(model, prompt, max_tokens) for prompt, max_tokens in jobs]
    assert calls[:3] == [PREFILL, PREFILL, DECODE] and calls.count(PREFILL) == 2


def test_min_tokens_masks_the_end_of_sentence_and_ignore_eos_runs_past_it_as_transformers_does(cache_dir):
    """The greedy run's 3rd token made the end-of-sentence token: without controls the completion stops before it;
    with min_tokens 6 it cannot come before 6 tokens (transformers' min_new_tokens); with ignore_eos the completion
    is the whole greedy run, that token included."""
    import torch

    model = hf_model(tiny_model(cache_dir, "qwen2"))
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        free = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    eos = free[2]
    assert eos not in free[:2]

    def reference(**controls):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                                 pad_token_id=0, **controls)[0, len(prompt):].tolist()
        return out[:out.index(eos)] if eos in out else out

    scheduler = Scheduler(TorchRunner(model, 3, CAPACITY), eos_ids=[eos]).start()
    results: dict = {}
    done = threading.Semaphore(0)
    cases = {"plain": Sampling(max_tokens=12), "min": Sampling(max_tokens=12, min_tokens=6),
             "ignore": Sampling(max_tokens=12, ignore_eos=True)}
    try:
        for name, sampling in cases.items():
            scheduler.submit(Sequence(prompt, sampling, on_finish=lambda s, e, name=name: (
                results.__setitem__(name, e or list(s.generated)), done.release())))
        for _ in cases:
            assert done.acquire(timeout=60)
    finally:
        scheduler.stop()
    assert results["plain"] == free[:2] == reference()
    assert results["min"] == reference(min_new_tokens=6) and len(results["min"]) >= 6
    assert results["ignore"] == free


def test_a_sequences_cumulative_logprob_is_the_sum_of_its_tokens_log_probabilities_under_the_raw_model(cache_dir):
    """Greedy and sampled (temperature 0.8, top-k 50) beside each other: the sum of log softmax of the model's raw
    logits at each token, as transformers gives them for the prompt and the completion in one pass."""
    import torch

    model = hf_model(tiny_model(cache_dir, "qwen2"))
    prompt = [5, 6, 7, 8]
    seqs = [Sequence(prompt, Sampling(max_tokens=10), logprobs=True),
            Sequence(prompt, Sampling(max_tokens=10, temperature=0.8, top_k=50, seed=7), logprobs=True)]
    run_to_their_end(Scheduler(TorchRunner(model, 2, CAPACITY), eos_ids=[1]), seqs)
    for seq in seqs:
        ids = prompt + list(seq.generated)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        want = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(seq.generated))
        assert seq.cumulative_logprob == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_penalties_change_the_greedy_choice_as_transformers_and_openai_define_them(cache_dir):
    """repetition_penalty 1.3 equals transformers' generate(repetition_penalty=1.3); presence 0.7 with frequency
    0.4 equals a step-by-step reference that subtracts them from the raw logits of the completion's tokens; the two
    beside an unpenalized sequence, in one batch."""
    import torch

    model = hf_model(tiny_model(cache_dir, "qwen2"))
    prompt = [5, 6, 7, 8, 5, 6]

    def openai_reference(presence, frequency, steps):
        ids, out = list(prompt), []
        for _ in range(steps):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].double()
            for token in set(out):
                logits[token] -= presence + frequency * out.count(token)
            token = int(torch.argmax(logits))
            if token == 1:
                break
            out.append(token)
            ids.append(token)
        return out

    with torch.no_grad():
        repeated = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=1,
                                  pad_token_id=1, repetition_penalty=1.3)[0, len(prompt):].tolist()
    repeated = repeated[:repeated.index(1)] if 1 in repeated else repeated
    seqs = {"none": Sequence(prompt, Sampling(max_tokens=16)),
            "repetition": Sequence(prompt, Sampling(max_tokens=16, repetition_penalty=1.3)),
            "openai": Sequence(prompt, Sampling(max_tokens=16, presence_penalty=0.7, frequency_penalty=0.4))}
    run_to_their_end(Scheduler(TorchRunner(model, 3, CAPACITY), eos_ids=[1]), list(seqs.values()))
    assert seqs["none"].generated == greedy(model, prompt, 16)
    assert seqs["repetition"].generated == repeated != seqs["none"].generated
    assert seqs["openai"].generated == openai_reference(0.7, 0.4, 16) != seqs["none"].generated


@pytest.mark.parametrize("arch, runtime", [("qwen2", "pytorch"), ("deepseek_v3", "onnxruntime")])
def test_prompts_that_start_like_a_cached_sequence_copy_that_start_and_equal_transformers(cache_dir, arch, runtime):
    """While one sequence decodes, three join: one sharing 18 tokens of its prompt, one its whole prompt, one its
    prompt and first completion tokens. Each copies the shared start from its cache (the last prompt token is always
    prefilled) and completes as transformers does alone; with sharing off nothing is copied and the text is the
    same."""
    import json

    model = hf_model(tiny_model(cache_dir, arch))
    if runtime == "pytorch":
        runner = TorchRunner(model, 4, CAPACITY)
    else:
        engine = build(tiny_resource(cache_dir, f"sched-{arch.replace('_', '-')}", arch=arch), cache_dir)
        runner = open_runner(engine, json.loads((engine / "model-info.json").read_text()), 4, CAPACITY)
    base = [3 + (i * 41) % 1900 for i in range(24)]
    results = {}
    for share in (True, False):
        shared: list = []

        class Shared(NoMetrics):
            def prefix_shared(self, tokens):
                shared.append(tokens)

        scheduler = Scheduler(runner, eos_ids=[1], metrics=Shared(), share_prefixes=share).start()
        started, done = threading.Event(), threading.Semaphore(0)
        first = Sequence(base, Sampling(max_tokens=20), on_finish=lambda s, e: done.release(),
                         on_token=lambda s, t: len(s.generated) >= 6 and started.set())
        try:
            scheduler.submit(first)
            assert started.wait(60)
            joining = [base[:18] + [7, 8, 9, 10], list(base), base + list(first.generated[:4])]
            seqs = [Sequence(p, Sampling(max_tokens=8), on_finish=lambda s, e: done.release()) for p in joining]
            for seq in seqs:
                scheduler.submit(seq)
            for _ in range(4):
                assert done.acquire(timeout=60)
        finally:
            scheduler.stop()
        results[share] = [list(first.generated)] + [list(s.generated) for s in seqs]
        assert sorted(shared) == ([18, 23, 27] if share else [])
        assert results[share] == [greedy(model, base, 20)] + [greedy(model, p, 8) for p in joining]
        assert int(runner.cache.lengths.sum()) == 0
    assert results[True] == results[False]


def test_a_scheduler_that_stops_answers_what_it_holds_as_retryable(cache_dir):
    """Running and queued sequences alike get an error that says to send the request again, marked
    ``server_stopping`` (Triton's model answers it UNAVAILABLE, which clients and proxies retry elsewhere)."""
    model = hf_model(tiny_model(cache_dir, "qwen2"))
    scheduler = Scheduler(TorchRunner(model, 1, CAPACITY), eos_ids=[1]).start()
    ended: list = []
    seqs = [Sequence([5, 6, 7 + i], Sampling(max_tokens=CAPACITY - 4, ignore_eos=True),
                     on_finish=lambda s, e: ended.append((s.server_stopping, s.outcome, e))) for i in range(2)]
    for seq in seqs:
        scheduler.submit(seq)
    deadline = time.monotonic() + 30
    while not seqs[0].generated and time.monotonic() < deadline:
        time.sleep(0.001)
    scheduler.stop()
    assert ended == [(True, FAILED, "the server is shutting down: send the request again (another replica serves "
                                    "it)")] * 2
