"""StepProfiler on the tiny preset: it times LLMEngine.step itself (the same phases as serving, for every
method), speculative points at a draft coverage, repeats until stable, prefill, capacity errors."""

from __future__ import annotations

import random
import time

import pytest
import torch

from common.metrics import MAX_TIMING_SPREAD
from engine.engine_config import EngineConfig
from engine.errors import CapacityError, ConfigError
from engine.llm_engine import LLMEngine
from engine.phases import PhaseClock
from engine.sampling import SamplingParams
from engine.spec import SpecConfig
from engine.step_profiler import StepProfiler, StepTiming

SPECS = {
    "none": (0, None),
    "ngram": (3, None),
    "draft": (2, {"draft_layers": 1}),
    "medusa": (2, {"tree": [[0], [1], [0, 0]]}),
}


def _config(method: str, k: int, opts: dict | None, **kw) -> EngineConfig:
    spec = None if method == "none" else SpecConfig(method=method, k=k, **(opts or {}))
    return EngineConfig("tiny", device="cpu", spec=spec, **kw)


@pytest.fixture(scope="module")
def sp() -> StepProfiler:
    return StepProfiler(EngineConfig("tiny", device="cpu", num_gpu_blocks=200, block_size=16))


def test_describes_model_and_pool(sp):
    info = sp.model_info
    assert info["name"] == "tiny" and info["weights"] == "random"
    assert info["shape"]["layers"] == 2 and info["shape"]["kv_heads"] == 2
    assert sp.kv_capacity_blocks == 200 and sp.block_size == 16 and sp.dtype == "float32"
    assert sp.device_name.startswith("cpu")


def test_decode_point(sp):
    t = sp.measure_decode(4, 100, steps=5, warmup=1)
    assert isinstance(t, StepTiming)
    assert len(t.step_ms) == len(t.verify_ms) == len(t.draft_ms) == 5
    assert all(ms > 0 for ms in t.step_ms) and t.draft_ms == [0.0] * 5
    assert list(t.phases_ms) == ["schedule", "prepare", "forward", "sample_verify", "commit", "output"]
    assert t.draft_coverage is None and t.repeat_medians == [pytest.approx(t.median_ms)]
    assert t.kv_usage == pytest.approx(4 * 7 / 200)  # contexts 97..103: ceil(103 / 16) blocks each
    assert sp.engine.kv_manager.num_free_blocks == 200  # the point's sequences are gone


def _serving_trace(method: str) -> list[str]:
    """Phase trace of a decode step of real requests through a serving engine."""
    k, opts = SPECS[method]
    spec = None if method == "none" else SpecConfig(method=method, k=k, **(opts or {}))
    engine = LLMEngine(EngineConfig("tiny", device="cpu", num_gpu_blocks=200, block_size=16, spec=spec))
    for i in range(3):
        engine.add_request(f"r{i}", [5 + i, 7, 9, 5 + i, 7], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()  # prefill
    engine.clock = clock = PhaseClock(engine.runner.device)
    engine.step()
    trace = list(clock.trace)
    engine.close()
    return trace


@pytest.mark.parametrize("method", list(SPECS))
def test_profiling_times_the_serving_step(method, monkeypatch):
    """Profiling and serving run one step pipeline: the profiler's timed steps are LLMEngine.step calls
    and record the same phase trace as a served decode step."""
    k, opts = SPECS[method]
    profiler = StepProfiler(_config(method, k, opts, num_gpu_blocks=200))
    calls = []
    real_step = LLMEngine.step

    def counting(self):  # noqa: ANN001, ANN202
        calls.append(self)
        return real_step(self)

    monkeypatch.setattr(LLMEngine, "step", counting)
    traces = []
    real_stop = PhaseClock.stop

    def recording(self):  # noqa: ANN001, ANN202
        traces.append(list(self.trace))
        return real_stop(self)

    monkeypatch.setattr(PhaseClock, "stop", recording)
    t = profiler.measure_decode(3, 40, steps=3, warmup=1)
    monkeypatch.undo()
    assert len(calls) == 4 and all(e is profiler.engine for e in calls)
    want = _serving_trace(method)
    assert traces == [want] * 3
    assert list(t.phases_ms) == want
    assert t.step_ms == pytest.approx([d + v for d, v in zip(t.draft_ms, t.verify_ms, strict=True)])
    profiler.close()


@pytest.mark.parametrize(
    ("method", "coverage"), [("ngram", 0.0), ("ngram", 0.5), ("ngram", 1.0), ("draft", 0.5)]
)
def test_speculative_point_verifies_k_drafts_at_the_coverage(method, coverage):
    k = 3
    opts = {"draft_layers": 1} if method == "draft" else None
    profiler = StepProfiler(_config(method, k, opts, num_gpu_blocks=300))
    widths = []
    prepare = profiler.runner.prepare

    def spying(entries):  # noqa: ANN001, ANN202
        widths.append(sorted(len(e.token_ids) for e in entries))
        return prepare(entries)

    profiler.runner.prepare = spying
    t = profiler.measure_decode(4, 60, steps=2, warmup=0, coverage=coverage)
    drafting = round(coverage * 4)
    assert t.draft_coverage == drafting / 4
    assert widths == [[1] * (4 - drafting) + [1 + k] * drafting] * 2
    profiler.close()


def test_repeats_until_the_median_settles_and_reports_spread(sp):
    t = sp.measure_decode(2, 64, steps=4, warmup=1, min_repeats=3, max_repeats=6, rel_tol=0.5)
    assert 3 <= len(t.repeat_medians) <= 6 and len(t.step_ms) == 4 * len(t.repeat_medians)
    assert t.settled and t.spread >= 0.0


@pytest.fixture
def one_thread():
    """One intra-op thread: on an oversubscribed CPU two threads wait on each other for 10-100x a step."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_injected_noise_is_flagged(sp, one_thread):
    """Random stalls of 0-100 ms inside the forward: the repeat medians scatter, the point is flagged."""
    kw = dict(steps=3, warmup=1, min_repeats=5, max_repeats=5)
    rng = random.Random(0)
    execute = sp.runner.execute

    def stalling(*args):  # noqa: ANN002, ANN202
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0.0, 0.1))
        return execute(*args)

    sp.runner.execute = stalling
    try:
        noisy = sp.measure_decode(2, 64, **kw)
    finally:
        del sp.runner.execute
    assert len(noisy.repeat_medians) == 5
    assert noisy.spread > MAX_TIMING_SPREAD and not noisy.stable


def test_stability_is_settled_and_narrow():
    def timing(medians, settled=True):  # noqa: ANN001, ANN202
        return StepTiming(list(medians), {}, list(medians), settled, 0.0, None)

    assert timing([10.0, 10.2, 9.9, 10.1]).stable
    assert timing([10.0, 10.2, 9.9, 10.1]).spread == pytest.approx((10.17 - 9.93) / 10.05)
    assert not timing([10.0, 10.2, 9.9, 10.1], settled=False).stable
    assert not timing([10.0, 20.0, 9.0, 14.0]).stable


def test_capacity_error_names_the_point(sp):
    with pytest.raises(CapacityError, match="concurrency 64 at context 1000"):
        sp.measure_decode(64, 1000)


def test_prefill(sp):
    ms = sp.measure_prefill(50, repeats=2)
    assert len(ms) == 2 and all(m > 0 for m in ms)
    assert not sp.engine.has_unfinished()


def test_bad_arguments(sp):
    with pytest.raises(ConfigError, match="coverage"):
        sp.measure_decode(2, 64, coverage=1.5)
    with pytest.raises(ConfigError, match="min_repeats"):
        sp.measure_decode(2, 64, min_repeats=3, max_repeats=2)


@pytest.fixture(scope="module")
def sp_short() -> StepProfiler:
    return StepProfiler(
        EngineConfig("tiny", device="cpu", num_gpu_blocks=100, block_size=16, max_model_len=128)
    )


@pytest.mark.parametrize("method", ["none", "ngram"])
def test_decode_point_at_max_context_is_measured(method):
    k = SPECS[method][0]
    sp = StepProfiler(_config(method, k, None, num_gpu_blocks=100, max_model_len=128))
    try:
        t = sp.measure_decode(2, 128, steps=4, warmup=1)
        assert len(t.step_ms) == 4
        with pytest.raises(CapacityError, match="context_len 129 exceeds max_context 128"):
            sp.measure_decode(2, 129, steps=4, warmup=1)
        with pytest.raises(CapacityError, match="do not fit within max_context 128"):
            sp.measure_decode(2, 128, steps=130, warmup=1)
    finally:
        sp.close()


def test_prefill_of_max_context_is_measured(sp_short):
    ms = sp_short.measure_prefill(128, repeats=1)
    assert len(ms) == 1 and ms[0] > 0
    assert not sp_short.engine.has_unfinished()
    with pytest.raises(CapacityError, match="input_len 129 exceeds max_context 128"):
        sp_short.measure_prefill(129, repeats=1)


def test_a_point_whose_sequences_stop_running_is_refused(sp, monkeypatch):
    """A sequence that leaves the batch mid-point (max_context reached, preempted) would time a
    smaller batch than the point names: the point raises instead."""
    step = sp.engine.step

    def step_then_finish_one() -> list:
        out = step()
        if len(sp.engine.scheduler.running) == 3:
            sp.engine.abort(sp.engine.scheduler.running[0].request_id)
        return out

    monkeypatch.setattr(sp.engine, "step", step_then_finish_one)
    with pytest.raises(CapacityError, match="1 sequences stopped running"):
        sp.measure_decode(3, 64, steps=3, warmup=1)
    assert not sp.engine.has_unfinished()
