"""Interpolation: accuracy at held-out points of the analytic model, ragged grids, no silent extrapolation."""

from __future__ import annotations

import numpy as np
import pytest

from planner.surface import DecodeSurface, PrefillSurface, Surfaces
from planner.synthetic import AnalyticModel, synthetic_profile

M = AnalyticModel()
HELD_OUT_C = (3, 6, 12, 24, 48, 96, 192, 384)
HELD_OUT_L = (384, 768, 1280)


def held_out_errors(surfaces: Surfaces) -> np.ndarray:
    """Relative step-time errors at points the profile did not measure (inside its range)."""
    errs = []
    for (tp, method, k), surf in surfaces.decode.items():
        for L in HELD_OUT_L:
            lo, hi = surf.concurrency_bounds(L)
            for c in HELD_OUT_C:
                if lo <= c <= hi:
                    pred = float(surf.step_ms(c, L)[0])
                    errs.append(abs(pred / M.step_ms(tp, method, k, c, L) - 1))
    return np.array(errs)


def test_held_out_interpolation_error_is_small() -> None:
    errs = held_out_errors(Surfaces(synthetic_profile(M)))
    print(f"held-out step-time error: n={errs.size} mean={errs.mean():.4%} max={errs.max():.4%}")
    assert errs.size > 150
    assert errs.max() < 0.03 and errs.mean() < 0.01


def test_measured_points_are_reproduced_exactly() -> None:
    prof = synthetic_profile(M, tps=(1,), configs=(("none", 0),))
    surf = Surfaces(prof).decode[(1, "none", 0)]
    for p in prof.decode:
        if p.ok:
            assert float(surf.step_ms(p.concurrency, p.context_len)[0]) == pytest.approx(p.step_ms, rel=1e-9)


def test_ragged_rows_use_the_common_range_and_never_extrapolate_concurrency() -> None:
    prof = synthetic_profile(M, tps=(1,), configs=(("none", 0),))
    surf = Surfaces(prof).decode[(1, "none", 0)]
    failed = [p for p in prof.decode if not p.ok]
    assert failed, "the analytic KV budget should make the largest points fail"
    lo, hi = surf.concurrency_bounds(1536)
    largest_ok = max(p.concurrency for p in prof.decode if p.ok and p.context_len == 1536)
    assert (lo, hi) == (1, largest_ok)
    assert np.isnan(surf.step_ms(hi + 1, 1536)[0])
    # between a long row and a shorter one, only the shorter one's range is usable
    assert surf.concurrency_bounds(1300)[1] == largest_ok


def test_context_is_extrapolated_linearly_outside_the_rows() -> None:
    surf = Surfaces(synthetic_profile(M, tps=(1,), configs=(("none", 0),))).decode[(1, "none", 0)]
    assert not surf.context_range.contains(2000)
    got = float(surf.step_ms(8, 2000)[0])
    assert got == pytest.approx(M.step_ms(1, "none", 0, 8, 2000), rel=0.01)  # step is affine in L


def test_single_row_and_single_point_surfaces() -> None:
    prof = synthetic_profile(M, tps=(1,), configs=(("none", 0),), contexts=(512,), concurrency=(4,))
    surf = DecodeSurface((1, "none", 0), prof.decode)
    assert float(surf.step_ms(4, 512)[0]) == pytest.approx(M.step_ms(1, "none", 0, 4, 512))
    assert np.isnan(surf.step_ms(5, 512)[0])


def test_surface_without_successful_points_is_unusable() -> None:
    prof = synthetic_profile(M, tps=(1,), configs=(("none", 0),), contexts=(512,), concurrency=(4,))
    bad = prof.decode[0].model_copy(update={"error": "capacity", "step_ms": None})
    s = Surfaces(prof.model_copy(update={"decode": [bad]}))
    assert (1, "none", 0) in s.unusable and not s.decode


def test_prefill_interpolates_and_extrapolates_along_the_end_segment() -> None:
    prof = synthetic_profile(M, tps=(1,), configs=(("none", 0),))
    pre = PrefillSurface(1, prof.prefill)
    assert pre.ttft_ms(768) == pytest.approx(M.ttft_ms(1, 768), rel=0.01)
    assert not pre.input_range.contains(4096)
    assert pre.ttft_ms(4096) > pre.ttft_ms(2048)


def _point(method: str, k: int, c: int, L: int, step: float, cov: float | None = None, **kw):  # noqa: N803
    from common import metrics as md
    from planner.profile import DecodePoint

    return DecodePoint(
        tp=1, method=method, k=k, concurrency=c, context_len=L, step_ms=step, tokens_per_step=1.0,
        itl_ms=md.summarize([step]), throughput_per_gpu=c / step * 1e3, draft_coverage=cov, samples=1, **kw,
    )  # fmt: skip


def _coverage_points(covs=(0.0, 0.5, 1.0)):  # noqa: ANN001, ANN202
    """ngram k=2 whose step time is 10 * c**0.5 * (1 + cov); one sequence realises only 0 and 1."""
    return [
        _point("ngram", 2, c, 128, 10 * c**0.5 * (1 + cov), cov)
        for c in (1, 4, 16)
        for cov in covs
        if c > 1 or cov in (0.0, 1.0)
    ]


def test_step_time_is_linear_in_draft_coverage() -> None:
    surf = DecodeSurface((1, "ngram", 2), _coverage_points())
    assert surf.coverages == [0.0, 0.5, 1.0]
    assert surf.step_ms(4, 128, 0.25)[0] == pytest.approx(20 * 1.25)
    assert surf.step_ms(4, 128, 0.5)[0] == pytest.approx(20 * 1.5)
    assert surf.step_ms(1, 128, 0.5)[0] == pytest.approx(10 * 1.5)  # c=1: between coverage 0 and 1
    assert surf.step_ms(4, 128)[0] == pytest.approx(20 * 2.0)  # no coverage: every sequence drafting
    # the concurrencies between measured ones interpolate within each level first
    mid = surf.step_ms(8, 128, 0.75)[0]
    assert 0.5 * (surf.step_ms(8, 128, 0.5)[0] + surf.step_ms(8, 128, 1.0)[0]) == pytest.approx(mid)


def test_coverage_outside_the_measured_levels_holds_the_nearest() -> None:
    surf = DecodeSurface((1, "ngram", 2), _coverage_points(covs=(0.5, 1.0)))
    assert surf.step_ms(4, 128, 0.1)[0] == pytest.approx(20 * 1.5)
    one = DecodeSurface((1, "ngram", 2), _coverage_points(covs=(1.0,)))
    assert one.step_ms(4, 128, 0.1)[0] == pytest.approx(40.0)  # a single level is what was measured


def test_unstable_and_non_monotonic_points_are_flagged() -> None:
    from planner.surface import point_flags

    pts = [
        _point("none", 0, 1, 128, 10.0, stable=True, repeats=3, step_ms_spread=0.01),
        _point("none", 0, 4, 128, 8.0, stable=False, repeats=8, step_ms_spread=0.6),
        _point("none", 0, 16, 128, 30.0, stable=True, repeats=3, step_ms_spread=0.02),
        _point("none", 0, 16, 512, 29.0),  # 3 % below L=128: within tolerance
    ]
    flags = point_flags(pts)
    assert set(flags) == {pts[1].key}
    assert flags[pts[1].key][0] == "unstable timing (8 repeats, spread 60%)"
    assert "non-monotonic: 8 ms below 10 ms at c=1" in flags[pts[1].key][1]
    surf = DecodeSurface((1, "none", 0), pts)
    assert surf.flags_near(2, 128) and surf.flags_near(8, 200)  # c=4 brackets both
    assert surf.flags_near(16, 128) == []
