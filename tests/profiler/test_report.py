"""`profiler show` text: coverage, spread and flags per decode point, the flagged list, step phases,
readable parameter counts and explained columns."""

from __future__ import annotations

from planner.synthetic import synthetic_profile
from profiler.report import describe
from tests.planner.test_surface import _point


def test_show_flags_unstable_and_non_monotonic_points_and_lists_phases() -> None:
    prof = synthetic_profile(configs=(("none", 0), ("ngram", 2)), tps=(1,))
    phases = {
        "schedule": 0.1,
        "prepare": 0.2,
        "forward": 5.0,
        "sample_verify": 0.3,
        "commit": 0.1,
        "output": 0.1,
    }
    prof.decode = [
        _point("none", 0, 1, 128, 5.8, stable=True, repeats=3, step_ms_spread=0.02, phases_ms=phases),
        _point("none", 0, 4, 128, 12.0, stable=False, repeats=8, step_ms_spread=0.7),
        _point("none", 0, 16, 128, 9.0, stable=True, repeats=3, step_ms_spread=0.03),
        _point("ngram", 2, 4, 128, 14.0, 0.5, stable=True, repeats=3, step_ms_spread=0.01),
    ]
    text = describe(prof)
    assert "flagged decode points (2): re-measure on an idle machine" in text
    assert "tp=1 none k=0 c=4 L=128: unstable timing (8 repeats, spread 70%)" in text
    assert "tp=1 none k=0 c=16 L=128: non-monotonic: 9 ms below 12 ms at c=4" in text
    rows = {line.split()[3]: line for line in text.splitlines() if line.split()[:2] == ["1", "none"]}
    assert rows["4"].endswith("UNSTABLE") and rows["16"].endswith("NON-MONO") and "70%" in rows["4"]
    assert "step phases (median ms)" in text and "sample_verify" in text and "5.000" in text
    ngram = next(line for line in text.splitlines() if line.split()[:2] == ["1", "ngram"])
    assert ngram.split()[5] == "0.5"  # its draft coverage


def test_profiler_show_prints_small_parameter_counts_and_explains_its_columns() -> None:
    from profiler.report import DECODE_LEGEND, params_text

    assert [params_text(n) for n in (6_738_415_616, 134_515_008, 2_100_000, 820_000)] == [
        "6.74B", "135M", "2.1M", "820K"
    ]  # fmt: skip
    assert "kv use: share of the KV-cache pool" in DECODE_LEGEND and "GPU W: mean power" in DECODE_LEGEND
