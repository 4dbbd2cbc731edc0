"""StepProfiler on the tiny preset: decode and speculative points, prefill, capacity errors."""

from __future__ import annotations

import pytest

from engine.errors import CapacityError, ConfigError
from engine.step_profiler import StepProfiler, StepTiming


@pytest.fixture(scope="module")
def sp() -> StepProfiler:
    return StepProfiler("tiny", device="cpu", num_blocks=200, block_size=16)


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
    assert t.kv_usage == pytest.approx(4 * 7 / 200)  # ceil(100 / 16) blocks per sequence


def test_capacity_error_names_the_point(sp):
    with pytest.raises(CapacityError, match="concurrency 64 at context 1000"):
        sp.measure_decode(64, 1000)


def test_prefill(sp):
    ms = sp.measure_prefill(50, repeats=2)
    assert len(ms) == 2 and all(m > 0 for m in ms)


@pytest.mark.parametrize(("method", "k", "opts"), [("ngram", 3, None), ("draft", 2, {"draft_layers": 1})])
def test_speculative_point_times_both_phases(method, k, opts):
    sp = StepProfiler("tiny", device="cpu", num_blocks=300, method=method, k=k, spec_options=opts)
    t = sp.measure_decode(3, 40, steps=3, warmup=1)
    assert len(t.draft_ms) == len(t.verify_ms) == 3
    assert t.step_ms == [d + v for d, v in zip(t.draft_ms, t.verify_ms, strict=True)]
    assert all(v > 0 for v in t.verify_ms)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="method"):
        StepProfiler("tiny", method="eagle", k=2)
    with pytest.raises(ConfigError, match="k must be"):
        StepProfiler("tiny", method="ngram", k=0)
