"""The best k per running batch size: a k schedule for one speculative method at one tp.

The best ``num_speculative_tokens`` falls as the batch grows (verification costs more per step, the
spare compute that made drafts free is used up) until speculation stops paying and k = 0 wins. At a
fixed concurrency, throughput per GPU is ``c / ITL``, so the best k at ``c`` is the one with the lowest
predicted ITL among those whose KV fits; k values that meet the ITL SLA are preferred. The schedule is a
list of ``[first, last, k]`` batch-size ranges, the format of vLLM's
``num_speculative_tokens_per_batch_size`` and of ``engine serve --spec-schedule``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Schedule = list[list[int]]
GPU_NOTE = (
    "with a k schedule vLLM 0.32 downgrades full CUDA graphs to piecewise on GPUs (its log says so; "
    "VLLM_USE_V2_MODEL_RUNNER=1 keeps full graphs) and ignores the schedule under data parallelism"
)


class KCurve:
    """Predicted ITL of one k over its measured concurrency range, and the KV concurrency bound."""

    def __init__(self, c: np.ndarray, itl: np.ndarray, c_kv: int) -> None:
        self.c, self.itl, self.c_kv = c, itl, c_kv

    def itl_at(self, c: int) -> float:
        """ITL at concurrency ``c``; inf outside the measured range or beyond what KV holds."""
        lo, hi = int(self.c[0]), int(self.c[-1])
        if c < lo or c > hi or c > self.c_kv:
            return float("inf")
        v = float(self.itl[c - lo])
        return v if np.isfinite(v) else float("inf")


def best_k(curves: Mapping[int, KCurve], c: int, itl_sla: float | None) -> int | None:
    """The k with the lowest ITL at ``c`` (preferring those within the SLA); ties go to the smaller k."""
    itls = {k: cur.itl_at(c) for k, cur in curves.items()}
    finite = {k: v for k, v in itls.items() if np.isfinite(v)}
    if not finite:
        return None
    within = {k: v for k, v in finite.items() if itl_sla is None or v <= itl_sla}
    pool = within or finite
    return min(pool, key=lambda k: (pool[k], k))


SWITCH_GAIN = 0.02  # switch k only for a gain larger than the few per cent a measured step time wobbles


def k_schedule(
    curves: Mapping[int, KCurve], up_to: int, itl_sla: float | None, switch_gain: float = SWITCH_GAIN
) -> Schedule:
    """``[[first, last, k], ...]`` covering batch sizes 1..``up_to``. The previous band's k is kept
    while it stays within ``switch_gain`` of the best ITL (and within the SLA when the best is, and no
    slower than k = 0), so measurement noise does not split the schedule into many bands; a size no k
    can run keeps the
    previous k (vLLM carries the last k forward the same way)."""
    ks: list[int] = []
    for c in range(1, up_to + 1):
        k = best_k(curves, c, itl_sla)
        if k is not None and ks and ks[-1] in curves and ks[-1] != k:
            prev, best = curves[ks[-1]].itl_at(c), curves[k].itl_at(c)
            sla_ok = itl_sla is None or prev <= itl_sla or best > itl_sla
            plain = curves[0].itl_at(c) if 0 in curves else float("inf")
            # never keep a speculating k that is slower than not speculating at all
            if np.isfinite(prev) and sla_ok and prev <= best * (1.0 + switch_gain) and prev <= plain:
                k = ks[-1]
        ks.append(k if k is not None else (ks[-1] if ks else 0))
    return bands(ks)


def bands(ks: list[int]) -> Schedule:
    """Run-length encode ``ks`` (k per batch size from 1) into ``[first, last, k]`` ranges."""
    out: Schedule = []
    for c, k in enumerate(ks, start=1):
        if out and out[-1][2] == k:
            out[-1][1] = c
        else:
            out.append([c, c, k])
    return out


def k_at(schedule: Schedule, c: int) -> int:
    """The k a schedule runs at batch size ``c`` (the last band carries on past its end)."""
    for first, last, k in schedule:
        if first <= c <= last:
            return k
    return schedule[-1][2] if schedule else 0
