"""``planner plan`` / ``planner synthetic``: table and JSON output, exit codes, errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.cli import main
from planner.plan import Planner
from planner.profile import load_profile

REPO = Path(__file__).resolve().parents[2]
SYN = REPO / "configs" / "profiles" / "synthetic-vicuna-7b-h100.json"


def test_plan_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["plan", "--profile", str(SYN), "--itl-ms", "15", "--isl", "512", "--osl", "256",
               "--request-rate", "20"])  # fmt: skip
    out = capsys.readouterr().out
    want = Planner(load_profile(SYN), SYN.stem).plan(15, isl=512, osl=256, request_rate=20)
    assert rc == 0
    assert out.startswith("WARNING: profile source is 'synthetic'")
    assert f"FEASIBLE: {want.message}" in out
    assert "choice" in out and out.count("alt ") == 3
    assert f"serve: {want.choice.serve_command}" in out
    assert f"for 20 req/s: decode {want.choice.replicas.decode_replicas} replica(s)" in out


def test_plan_json_and_infeasible_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["plan", "--profile", str(SYN), "--itl-ms", "0.5", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 3 and res["feasible"] is False and res["lowest_achievable_itl_ms"] > 0.5


def test_errors_name_the_file_or_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "p.json"
    bad.write_text('{"schema_version": 7}')
    assert main(["plan", "--profile", str(bad), "--itl-ms", "30"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "schema_version" in err
    assert main(["plan", "--profile", str(SYN), "--itl-ms", "-1"]) == 2
    assert "itl_ms=-1.0" in capsys.readouterr().err


def test_synthetic_writes_a_loadable_labelled_profile(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    assert main(["synthetic", "--out", str(out), "--command", "planner synthetic --out s.json"]) == 0
    prof = load_profile(out)
    assert prof.metadata.source == "synthetic" and prof.metadata.weights == "none"
    assert prof.metadata.command == "planner synthetic --out s.json"
    assert len(prof.decode) == len(load_profile(SYN).decode)
