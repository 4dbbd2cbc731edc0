"""Sweep grid: defaults per machine, overrides, validation naming the field and value, point order."""

from __future__ import annotations

from pathlib import Path

import pytest

from profiler.grid import GridError, SweepConfig, load_config, quick


def test_defaults_differ_by_machine() -> None:
    gpu = load_config(gpu=True)
    cpu = load_config(gpu=False)
    assert gpu.model == "vicuna-7b" and gpu.method == ["none", "ngram", "draft"]
    assert gpu.k == [0, 1, 2, 3, 4, 5] and max(gpu.concurrency) == 128 and gpu.context == [512, 2048]
    assert cpu.model == "tiny" and len(list(cpu.points())) < len(list(gpu.points()))


def test_points_pair_none_with_k0_and_group_by_configuration() -> None:
    cfg = SweepConfig(model="tiny", method=["none", "ngram"], k=[0, 2], concurrency=[4, 1], context=[64])
    pts = [p.key for p in cfg.points()]
    assert pts == [
        (1, "none", 0, 1, 64, 0.0),
        (1, "none", 0, 4, 64, 0.0),
        (1, "ngram", 2, 1, 64, 1.0),
        (1, "ngram", 2, 4, 64, 1.0),
    ]


def test_speculative_engine_points_at_each_realisable_coverage() -> None:
    cfg = SweepConfig(
        model="tiny",
        method=["none", "ngram"],
        k=[0, 2],
        concurrency=[1, 4],
        context=[64],
        coverage=[0, 0.5, 1],
    )
    pts = [(p.method, p.concurrency, p.coverage) for p in cfg.points()]
    # one sequence realises only coverage 0 or 1; method none has no drafts to cover
    assert pts == [
        ("none", 1, None),
        ("none", 4, None),
        ("ngram", 1, 0.0),
        ("ngram", 1, 1.0),
        ("ngram", 4, 0.0),
        ("ngram", 4, 0.5),
        ("ngram", 4, 1.0),
    ]
    http = SweepConfig(
        model="m", backend="http", url="http://x", method=["ngram"], k=[2], coverage=[0, 1], weights="real"
    )
    assert [p.coverage for p in http.points()] == [None]  # a server's drafter has its own


def test_overrides_and_config_file(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("cpu:\n  concurrency: [2, 8]\n  context: [256]\n")
    cfg = load_config(f, gpu=False, overrides={"k": [0, 3], "method": None})
    assert cfg.concurrency == [2, 8] and cfg.context == [256] and cfg.k == [0, 3]
    assert cfg.method == ["none", "ngram"]  # None overrides are ignored


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"concurrency": [0]}, r"'concurrency'.*got 0"),
        ({"method": ["eagle9"]}, r"'method'.*'eagle9'"),
        ({"backend": "tgi"}, r"'backend'.*'tgi'"),
        ({"method": ["ngram"], "k": [0]}, r"'k'.*need some k > 0"),
        ({"context": []}, r"'context'.*at least 1 item.*got \[\]"),
        ({"backend": "http"}, r"'url' is required"),
        ({"bogus": 1}, r"unknown sweep field.*bogus"),
        ({"coverage": [1.5]}, r"'coverage'.*1.5"),
        ({"min_repeats": 3, "max_repeats": 2}, r"min_repeats.*3/2"),
        ({"steps": True}, r"'steps'.*valid integer.*True"),
        ({"tp": "1"}, r"'tp'.*valid list.*'1'"),
    ],
)
def test_invalid_grids_fail_with_field_and_value(override: dict, match: str) -> None:
    with pytest.raises(GridError, match=match):
        load_config(gpu=False, overrides=override)


def test_bad_yaml_is_named(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("cpu: [unclosed\n")
    with pytest.raises(GridError, match="not valid YAML"):
        load_config(f, gpu=False)


def test_quick_keeps_corners() -> None:
    cfg = quick(load_config(gpu=True))
    assert cfg.concurrency == [1, 128] and cfg.k == [0, 5] and cfg.context == [512, 2048]
