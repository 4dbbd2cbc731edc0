"""Metric definitions shared by profiler, planner and daemon."""

from __future__ import annotations

import numpy as np
import pytest

from common import metrics as md


def test_request_itl_uses_tokens_not_chunks() -> None:
    # 5 tokens in 3 chunks: first at t=1.0, last at t=1.4 -> (1.4 - 1.0) / 4
    assert md.request_itl(1.0, 1.4, 5) == pytest.approx(0.1)
    assert md.request_itl(1.0, 1.0, 1) is None
    assert md.chunk_gaps([1.0, 1.1, 1.4]) == pytest.approx([0.1, 0.3])
    with pytest.raises(ValueError, match="precedes"):
        md.request_itl(2.0, 1.0, 3)


def test_percentiles_match_numpy_linear() -> None:
    rng = np.random.default_rng(0)
    values = list(rng.exponential(10.0, size=101))
    stats = md.summarize(values)
    assert stats.p50 == pytest.approx(np.percentile(values, 50))
    assert stats.p90 == pytest.approx(np.percentile(values, 90))
    assert stats.p99 == pytest.approx(np.percentile(values, 99))
    assert stats.mean == pytest.approx(np.mean(values))
    with pytest.raises(ValueError, match="empty"):
        md.summarize([])


def test_tokens_per_step_from_coverage_and_acceptance() -> None:
    assert md.tokens_per_step(1.0, [0.8, 0.6]) == pytest.approx(2.4)
    assert md.tokens_per_step(0.5, [0.8, 0.6]) == pytest.approx(1.7)
    assert md.tokens_per_step(0.0, [0.8, 0.6]) == pytest.approx(1.0)


def test_vllm_decode_steps_from_counters() -> None:
    # 10 requests, 1000 generated tokens, 300 accepted draft tokens: 10 first tokens from prefill,
    # 690 decode steps each emitting one token of its own.
    steps = md.vllm_decode_steps(1000, 300, 10)
    assert steps == 690
    assert md.draft_coverage(345, steps) == pytest.approx(0.5)
    # tokens per step recovers generated decode tokens / decode steps
    per_pos = md.acceptance_given_draft([200, 100], 345)
    tps = md.tokens_per_step(md.draft_coverage(345, steps), per_pos)
    assert tps == pytest.approx((1000 - 10) / 690)


def test_step_to_itl_and_throughput() -> None:
    assert md.itl_from_step(20.0, 2.0) == pytest.approx(10.0)
    assert md.decode_throughput_per_gpu(8, 20.0, 2.0, tp=2) == pytest.approx(8 * 2 / 0.02 / 2)
    assert md.throughput_per_gpu(1000, 2.0, 4) == pytest.approx(125.0)
