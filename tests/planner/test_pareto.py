"""Pareto frontier: dominated points are dropped, the frontier is ordered by throughput."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from planner.pareto import frontier


def test_frontier_drops_dominated_points() -> None:
    thr = np.array([100.0, 200.0, 150.0, 300.0, 300.0])
    itl = np.array([5.0, 10.0, 12.0, 20.0, 25.0])
    assert frontier(thr, itl).tolist() == [0, 1, 3]


@given(st.lists(st.tuples(st.floats(0, 1e4), st.floats(0.1, 1e3)), min_size=1, max_size=40))
def test_no_frontier_point_is_dominated_and_every_other_is(points: list[tuple[float, float]]) -> None:
    thr, itl = (np.array(x) for x in zip(*points, strict=True))
    front = set(frontier(thr, itl).tolist())

    def dominated(i: int) -> bool:
        return any(
            thr[j] >= thr[i] and itl[j] <= itl[i] and (thr[j] > thr[i] or itl[j] < itl[i])
            for j in range(len(thr))
        )

    assert not any(dominated(i) for i in front)
    for i in range(len(thr)):  # every undominated point is on it, or an identical point stands for it
        if not dominated(i):
            assert any(thr[j] == thr[i] and itl[j] == itl[i] for j in front)
