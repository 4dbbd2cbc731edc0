"""StepProfiler on the tiny preset: points measured without prefill, pool returned, bad points refused."""

from __future__ import annotations

import pytest

from engine.errors import CapacityError, ConfigError
from engine.step_profiler import StepProfiler


@pytest.mark.parametrize(("method", "k"), [("none", 0), ("ngram", 3), ("medusa", 2)])
def test_decode_point_times_every_step_and_returns_the_pool(method: str, k: int) -> None:
    sp = StepProfiler("tiny", device="cpu", method=method, k=k, num_blocks=256, max_context=256)
    t = sp.measure_decode(3, 40, steps=4, warmup=1)
    assert len(t.step_ms) == len(t.verify_ms) == len(t.draft_ms) == 4
    assert all(s > 0 for s in t.step_ms)
    assert t.step_ms == pytest.approx([d + v for d, v in zip(t.draft_ms, t.verify_ms, strict=True)])
    if method == "none":
        assert t.draft_ms == [0.0] * 4 and t.tokens_per_step == 1.0
    else:
        assert 1.0 <= t.tokens_per_step <= 1 + k
    # 3 sequences of >= 40 tokens in blocks of 16: at least 9 blocks were held at the peak
    assert t.kv_usage >= 9 / 256
    assert sp.kv.num_free_blocks == sp.kv.num_blocks
    assert sp.model_info["weights"] == "random"
    sp.close()


def test_point_that_does_not_fit_is_a_capacity_error_and_changes_nothing() -> None:
    sp = StepProfiler("tiny", device="cpu", num_blocks=8, max_context=512)
    with pytest.raises(CapacityError, match="concurrency 4 at context 100"):
        sp.measure_decode(4, 100, steps=2, warmup=0)
    assert sp.kv.num_free_blocks == 8
    with pytest.raises(CapacityError, match="max_model_len"):
        sp.measure_decode(1, 500, steps=20, warmup=0)


def test_prefill_times_and_bad_arguments() -> None:
    sp = StepProfiler("tiny", device="cpu", num_blocks=64)
    assert len(sp.measure_prefill(24, repeats=2)) == 2
    assert sp.kv.num_free_blocks == 64
    with pytest.raises(ConfigError, match="concurrency"):
        sp.measure_decode(0, 10)
    with pytest.raises(ConfigError, match="method"):
        StepProfiler("tiny", device="cpu", method="eagle", k=2)
    with pytest.raises(ConfigError, match="k is 0 exactly"):
        StepProfiler("tiny", device="cpu", method="ngram", k=0)
