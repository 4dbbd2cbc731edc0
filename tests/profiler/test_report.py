"""``profiler show``: readable parameter counts and explained columns."""

from __future__ import annotations


def test_profiler_show_prints_small_parameter_counts_and_explains_its_columns() -> None:
    from profiler.report import DECODE_LEGEND, params_text

    assert [params_text(n) for n in (6_738_415_616, 134_515_008, 2_100_000, 820_000)] == [
        "6.74B", "135M", "2.1M", "820K"
    ]  # fmt: skip
    assert "kv use: share of the KV-cache pool" in DECODE_LEGEND and "GPU W: mean power" in DECODE_LEGEND
