"""Plots a planner reads: one Pareto plot per method, heatmaps and acceptance panels, all >= 900 px wide."""

from __future__ import annotations

import struct
from pathlib import Path

from planner.profile import load_profile
from profiler.plots import plot_all

REPO = Path(__file__).resolve().parents[2]
SYN = REPO / "configs" / "profiles" / "synthetic-vicuna-7b-h100.json"


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_every_plot_is_written_and_wide_enough(tmp_path: Path) -> None:
    paths = plot_all(load_profile(SYN), tmp_path, itl_ms=15.0, name="syn")
    names = {p.name for p in paths}
    assert {"pareto_none.png", "pareto_ngram.png", "pareto_draft.png", "acceptance_per_position.png"} <= names
    assert "speedup_ngram_tp2_L1024.png" in names
    for p in paths:
        width, height = _png_size(p)
        assert width >= 900 and height >= 300, (p.name, width, height)


def test_random_weights_without_acceptance_plot_speculation_with_the_prior(tmp_path: Path) -> None:
    prof = load_profile(REPO / "configs" / "profiles" / "vicuna-7b-h200x2-tp12.json")
    assert not prof.acceptance and prof.metadata.weights == "random"
    names = {p.name for p in plot_all(prof, tmp_path / "a")}
    assert {"pareto_none.png", "pareto_ngram.png"} <= names  # planned with the literature prior
    names = {p.name for p in plot_all(prof, tmp_path / "b", alpha=0.7)}
    assert "pareto_ngram.png" in names
