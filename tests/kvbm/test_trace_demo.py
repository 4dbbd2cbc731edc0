"""The simulated serving trace behind the demo and the benchmark, and the demo itself."""

from __future__ import annotations

import pytest

from kvbm import demo
from kvbm.trace import OPS, TraceConfig, run_trace

SMALL = TraceConfig(
    num_requests=60,
    max_running=16,
    num_system_prompts=2,
    system_prompt_len=64,
    user_prompt_len=(4, 40),
    output_len=(8, 64),
    num_blocks=4000,
)


def test_trace_finishes_every_request_and_is_deterministic() -> None:
    a = run_trace(SMALL)
    b = run_trace(SMALL)
    assert a.finished == SMALL.num_requests
    assert (a.steps, a.tokens_generated, a.held_peak_sum) == (b.steps, b.tokens_generated, b.held_peak_sum)
    assert a.usage_trace[-1] == 0.0  # everything freed at the end
    assert 0.0 < a.prefix_hit_rate < 1.0  # the shared system prompts hit
    assert set(a.op_ns) == set(OPS)
    assert a.op_ns["commit (1 + accepted)"][0] > 0


def test_explicit_release_never_holds_more_than_keeping_drafts_in_a_roomy_pool() -> None:
    cfg = TraceConfig(**{**SMALL.__dict__, "k": 16})
    release = run_trace(cfg, release_lookahead=True)
    keep = run_trace(cfg, release_lookahead=False)
    assert release.preemptions == keep.preemptions == 0
    assert release.tokens_generated == keep.tokens_generated  # same trace, same schedule
    assert release.held_after_sum < keep.held_after_sum
    assert release.held_peak_sum <= keep.held_peak_sum
    assert release.lookahead_blocks_released > 0 and keep.lookahead_blocks_released == 0


def test_a_tight_pool_preempts_and_still_finishes() -> None:
    cfg = TraceConfig(**{**SMALL.__dict__, "num_blocks": 60})
    r = run_trace(cfg)
    assert r.preemptions > 0
    assert r.finished == cfg.num_requests


def test_demo_prints_capacity_usage_hit_rate_and_savings(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--requests", "40", "--running", "8", "--blocks", "300"]) == 0
    out = capsys.readouterr().out
    assert "capacity" in out and "prefix-cache hit rate" in out and "usage over time" in out
    assert "blocks saved by explicit release" in out


def test_demo_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        demo.main(["--blocks", "0"])


def test_a_pool_too_small_for_one_prompt_is_an_error_not_a_hang() -> None:
    with pytest.raises(ValueError, match="does not fit in an empty pool of 2 blocks"):
        run_trace(TraceConfig(**{**SMALL.__dict__, "num_blocks": 2}))
