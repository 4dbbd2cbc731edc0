"""benchmarks/schedule_serve_bench.py end to end on the tiny model: a random-weight profile runs at a
controlled acceptance (the same one the schedule is planned at), every config through engine serve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.schedule_serve_bench import main as bench_main
from profiler.cli import main as profiler_main


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sched") / "tiny.json"
    args = ["sweep", "--model", "tiny", "--method", "none,ngram", "--k", "0,2", "--concurrency", "1,4"]
    args += ["--context", "128,256", "--out", str(path), "--no-progress", "--no-plots"]
    assert profiler_main(args) == 0
    return path


def test_random_weights_need_a_controlled_acceptance(tiny_profile: Path, capsys) -> None:
    assert bench_main(["--profile", str(tiny_profile), "--itl-ms", "20"]) == 2
    assert "--controlled alpha=A,coverage=C" in capsys.readouterr().err


@pytest.mark.slow
def test_every_config_is_served_at_the_controlled_acceptance(
    tiny_profile: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out.json"
    args = ["--profile", str(tiny_profile), "--itl-ms", "50", "--controlled", "alpha=0.9,coverage=1"]
    args += ["--concurrency", "1,2", "--isl", "64", "--osl", "16", "--waves", "2", "--repeats", "2"]
    args += ["--out", str(out)]
    assert bench_main(args) == 0
    result = json.loads(out.read_text())
    assert result["controlled"] == "alpha=0.9,coverage=1"
    assert set(result["rows"]) == {"none", "ngram k=2", "ngram schedule"}
    for config, rows in result["rows"].items():
        assert set(rows) == {"1", "2"}
        for row in rows.values():
            assert len(row["repeats"]) == 2 and row["thr"] == pytest.approx(
                (row["repeats"][0]["thr"] + row["repeats"][1]["thr"]) / 2
            )  # the median of two
            assert math.isfinite(row["itl_ms"]) and row["itl_ms"] > 0 and row["thr"] > 0
            # random weights accept nothing by themselves: drafts are kept only at the controlled rate
            if config == "none" or row["k_run"] == 0:
                assert row["tokens_per_step"] == pytest.approx(1.0)
            else:
                assert row["tokens_per_step"] > 1.5  # 1 + 0.9 + 0.81 at every step with k = 2
    # a run resumed from a complete file starts no server and keeps every measurement
    capsys.readouterr()
    assert bench_main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("kept from") == 3
    assert "median |ITL error|: none" in printed  # measured against the planner's own prediction
    assert json.loads(out.read_text())["rows"] == result["rows"]
