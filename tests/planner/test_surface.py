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
