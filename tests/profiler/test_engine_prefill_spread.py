"""A prefill point records the spread of its samples and is flagged unstable when they scatter: an eager
prefill is mostly kernel launches from Python, and every plan's prefill stall inherits its noise."""

from __future__ import annotations

import pytest

from common.metrics import MAX_TIMING_SPREAD, timing_spread
from profiler.backends.engine import EngineBackend


@pytest.mark.parametrize(
    ("samples", "stable"), [([10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8], True), ([10.0] * 6 + [30.0], False)]
)
def test_prefill_point_records_spread_and_stability(monkeypatch, samples, stable) -> None:
    backend = EngineBackend("tiny")
    backend.configure(1, "none", 0)
    monkeypatch.setattr(backend.sp, "measure_prefill", lambda n, repeats: samples[:repeats])
    point = backend.measure_prefill(1, 32)
    assert point.samples == 7 and point.ttft_ms == pytest.approx(sorted(samples)[3])
    assert point.ttft_ms_spread == pytest.approx(timing_spread(samples))
    assert point.stable is stable and (point.ttft_ms_spread > MAX_TIMING_SPREAD) is not stable
    backend.close()


def test_a_real_prefill_point_is_measured_with_its_spread() -> None:
    backend = EngineBackend("tiny")
    point = backend.measure_prefill(1, 32, repeats=3)
    assert point.samples == 3 and point.ttft_ms > 0 and point.ttft_ms_spread is not None
    assert point.stable is (point.ttft_ms_spread <= MAX_TIMING_SPREAD)
    backend.close()
