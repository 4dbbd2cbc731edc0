"""The Pareto frontier of (throughput per GPU, ITL) points: what a capacity planner can choose from.

A point is on the frontier when no other point has both higher-or-equal throughput and lower-or-equal
ITL (and is strictly better in one). Shared by the dashboard and ``profiler plot``.
"""

from __future__ import annotations

import numpy as np


def frontier(throughput: np.ndarray, itl: np.ndarray) -> np.ndarray:
    """Indices of the frontier points, ordered by rising throughput (and so rising ITL)."""
    thr = np.asarray(throughput, dtype=float)
    lat = np.asarray(itl, dtype=float)
    order = np.lexsort((lat, -thr))  # highest throughput first, ties: lowest ITL first
    keep: list[int] = []
    best_itl = np.inf
    for i in order:
        if lat[i] < best_itl:
            keep.append(int(i))
            best_itl = lat[i]
    return np.array(keep[::-1], dtype=int)
