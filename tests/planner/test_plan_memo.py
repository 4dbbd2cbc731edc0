"""The planner's memo is bounded by bytes: a wide measured range cannot grow a server without limit."""

from __future__ import annotations

import json
from pathlib import Path

from planner.plan import Planner
from planner.profile import MAX_CONCURRENCY, parse_profile

SYN = Path(__file__).resolve().parents[2] / "configs" / "profiles" / "synthetic-vicuna-7b-h100.json"


def wide_planner(memo_bytes: int) -> Planner:
    """The synthetic profile with its concurrencies stretched up to the schema's bound."""
    doc = json.loads(SYN.read_text())
    scale = MAX_CONCURRENCY // max(p["concurrency"] for p in doc["decode"])
    for p in doc["decode"]:
        p["concurrency"] *= scale
    return Planner(parse_profile(doc), "wide", memo_bytes=memo_bytes)


def test_memo_stays_within_its_byte_budget_over_many_workloads() -> None:
    budget = 4 * 2**20
    planner = wide_planner(budget)
    for isl in range(100, 2100, 100):  # every isl is a new decode context: new curves per config
        planner.plan(30, isl=isl, osl=128)
        assert planner.memo_bytes <= budget
    held = sum(
        v.nbytes for value, _ in planner._memo.values() for v in (value if isinstance(value, tuple) else ())
    )
    assert held <= budget


def test_memo_answers_repeated_workloads_without_growing() -> None:
    planner = wide_planner(64 * 2**20)
    first = planner.plan(30, isl=512, osl=128)
    size = planner.memo_bytes
    assert size > 0
    assert planner.plan(30, isl=512, osl=128) == first
    assert planner.memo_bytes == size
