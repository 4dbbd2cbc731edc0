"""Steady windows of a closed loop: the span where the target concurrency was really decoding."""

from __future__ import annotations

import pytest

from profiler.loadgen import RequestRecord, steady_window


def _rec(first: float, last: float, tokens: int) -> RequestRecord:
    return RequestRecord(send=first - 0.5, first=first, last=last, output_tokens=tokens, end=last)


def test_ramp_up_and_down_are_left_out() -> None:
    # c=2: A decodes 0-10, B 2-8, C 8-14 (sent when B finished); two decode at once over 2-10.
    recs = [_rec(0, 10, 11), _rec(2, 8, 7), _rec(8, 14, 7)]
    w = steady_window(recs, 2)
    assert (w.start, w.end) == (2, 10)
    assert w.mean_in_flight == pytest.approx(2.0)
    # A: 10 tokens over 10 s -> 8 inside; B: 6 over 6 s, all inside; C: 6 over 6 s -> 2 inside
    assert w.output_tokens == pytest.approx(16.0)
    assert w.output_tokens / w.duration_s == pytest.approx(2.0)


def test_a_dip_inside_the_window_lowers_mean_in_flight() -> None:
    # c=2 in two waves with a 2 s gap (the second wave's prefill): 1 in flight over 4-6.
    recs = [_rec(0, 4, 5), _rec(0, 6, 7), _rec(6, 10, 5), _rec(5, 10, 6)]
    w = steady_window(recs, 2)
    assert (w.start, w.end) == (0, 10)
    assert w.mean_in_flight == pytest.approx((4 + 6 + 4 + 5) / 10)


def test_target_never_reached_uses_the_peak_and_failures_are_ignored() -> None:
    recs = [_rec(0, 4, 5), _rec(1, 3, 3), RequestRecord(send=0.0, error="HTTP 500")]
    w = steady_window(recs, 8)
    assert (w.start, w.end) == (1, 3) and w.mean_in_flight == pytest.approx(2.0)
    assert steady_window([RequestRecord(send=0.0, error="x")], 1) is None
