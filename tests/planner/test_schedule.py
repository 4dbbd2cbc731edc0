"""k schedule per batch size: the best k at each concurrency, as vLLM's batch-size ranges."""

from __future__ import annotations

import numpy as np

from planner.schedule import KCurve, bands, best_k, k_at, k_schedule


def curve(itl: list[float], c_kv: int = 1000) -> KCurve:
    return KCurve(np.arange(1, len(itl) + 1, dtype=float), np.array(itl), c_kv)


def test_bands_run_length_encode() -> None:
    assert bands([4, 4, 2, 2, 2, 0]) == [[1, 2, 4], [3, 5, 2], [6, 6, 0]]
    assert k_at([[1, 2, 4], [3, 5, 2]], 4) == 2 and k_at([[1, 2, 4], [3, 5, 2]], 99) == 2


def test_speculation_stops_where_it_stops_paying() -> None:
    # ITL per concurrency 1..6: k=4 best at low batch, k=2 in the middle, none at high batch
    curves = {
        0: curve([10, 10, 10, 10, 10, 10]),
        2: curve([7, 7, 8, 8, 12, 12]),
        4: curve([5, 6, 9, 9, 14, 14]),
    }
    assert k_schedule(curves, 6, itl_sla=None) == [[1, 2, 4], [3, 4, 2], [5, 6, 0]]
    assert best_k(curves, 5, None) == 0


def test_kv_and_sla_shape_the_choice() -> None:
    curves = {0: curve([10, 10, 10]), 4: curve([5, 5, 5], c_kv=2)}  # k=4's lookahead does not fit at 3
    assert k_schedule(curves, 3, None) == [[1, 2, 4], [3, 3, 0]]
    # nothing meets a 4 ms SLA: the lowest ITL still wins (the schedule covers every batch size)
    assert best_k(curves, 1, 4.0) == 4


def test_small_gains_do_not_split_bands() -> None:
    curves = {0: curve([10, 10, 10, 10]), 2: curve([5.0, 5.05, 5.0, 5.0]), 3: curve([5.05, 5.0, 5.05, 4.0])}
    # k=3 is better at c=2 by 1 %: noise, the band stays k=2; at c=4 it is 20 % better: switch
    assert k_schedule(curves, 4, None) == [[1, 3, 2], [4, 4, 3]]
    assert k_schedule(curves, 4, None, switch_gain=0.0) == [[1, 1, 2], [2, 2, 3], [3, 3, 2], [4, 4, 3]]


def test_the_margin_never_keeps_a_k_slower_than_no_speculation() -> None:
    curves = {0: curve([10.0, 10.0]), 2: curve([8.0, 10.1])}  # at c=2 k=2 is 1 % slower than k=0
    assert k_schedule(curves, 2, None) == [[1, 1, 2], [2, 2, 0]]
