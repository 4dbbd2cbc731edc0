"""The one text table: columns as wide as their widest cell, labels left, numbers right."""

from __future__ import annotations

from common.tables import text_table


def test_numbers_right_labels_left_and_a_rule_under_the_header() -> None:
    out = text_table([["ngram", 4, "12.5"], ["none", 0, "7"]], ["method", "k", "ms"], left=1)
    assert out.splitlines() == [
        "method  k    ms",
        "------  -  ----",
        "ngram   4  12.5",
        "none    0     7",
    ]


def test_all_right_aligned_by_default_and_empty_tables_keep_their_header() -> None:
    assert text_table([["a", 10]], ["x", "y"]).splitlines() == ["x   y", "-  --", "a  10"]
    assert text_table([], ["tp", "c"]) == "tp  c\n--  -"
