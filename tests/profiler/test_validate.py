"""`profiler validate`: off-grid targets, predictions from the surfaces, closed loop on the tiny engine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from planner.metrics_def import summarize
from planner.profile import (
    DecodePoint,
    EngineInfo,
    Hardware,
    Metadata,
    ModelInfo,
    ModelShape,
    PrefillPoint,
    Profile,
    load_profile,
    new_profile,
    now_utc,
    save_profile,
)
from profiler.cli import main
from profiler.validate import Outcome, Target, ValidateError, choose_targets, predict, report


def _profile(source: str = "measured") -> Profile:
    meta = Metadata(
        model=ModelInfo(name="tiny", shape=ModelShape(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32,
                                                      vocab=320, params=10**6)),
        hardware=Hardware(gpu_name="cpu", gpu_count=1), engine=EngineInfo(name="t", version="0"),
        backend="engine", dtype="float32", block_size=16, kv_capacity_blocks_per_gpu=1000,
        weights="random" if source == "measured" else "none", source=source, created_at=now_utc(),
        command="test",
    )  # fmt: skip
    prof = new_profile(meta)
    for ctx in (128, 512):
        for c in (1, 4, 16):
            step = 2.0 + 0.1 * c + 0.001 * c * ctx  # affine in context, growing with c
            prof.upsert(DecodePoint(tp=1, method="none", k=0, concurrency=c, context_len=ctx, step_ms=step,
                                    tokens_per_step=1.0, itl_ms=summarize([step]),
                                    throughput_per_gpu=c / step * 1000, samples=1))  # fmt: skip
    for n, ms in ((64, 1.0), (256, 4.0)):
        prof.upsert(PrefillPoint(tp=1, input_len=n, ttft_ms=ms, prefill_tokens_per_s_per_gpu=n / ms * 1000))
    return prof


def test_targets_are_off_grid_and_inside_the_measured_range() -> None:
    ts = choose_targets(_profile(), 5, 32)
    assert {t.concurrency for t in ts} == {2, 8}  # geometric midpoints of 1-4 and 4-16
    for t in ts:
        assert t.method == "none" and t.k == 0 and t.osl == 32
        assert t.isl >= 128 and t.isl + t.osl <= 512 and t.isl not in (128, 512)


def test_prediction_uses_decode_and_prefill_surfaces() -> None:
    t = Target(tp=1, method="none", k=0, concurrency=4, isl=128, osl=2)
    itl, thr = predict(_profile(), t)
    # on-grid check of the arithmetic: steps at ctx 128 and 129 (affine), TTFT(128) from the PCHIP fit
    expected_step = 2.0 + 0.4 + 0.004 * 128.5
    assert itl == pytest.approx(expected_step, rel=1e-3)
    assert thr < 4 / (expected_step / 1000)  # prefill time lowers end-to-end throughput


def test_bad_inputs_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidateError, match="points: must be >= 1, got 0"):
        choose_targets(_profile(), 0, 32)
    with pytest.raises(ValidateError, match="max_tokens: 400 does not fit"):
        choose_targets(_profile(), 2, 400)
    path = tmp_path / "synthetic.json"
    save_profile(_profile("synthetic"), path)
    assert main(["validate", str(path), "--points", "1"]) == 2
    assert "source is 'synthetic'" in capsys.readouterr().err


def test_report_summarises_median_and_worst_error() -> None:
    t = Target(1, "none", 0, 2, 200, 32)
    outs = [Outcome(t, 10.0, 11.0, 100.0, 90.0, 4), Outcome(t, 10.0, 9.7, 100.0, 100.0, 4)]
    text = report(outs)
    assert "ITL error: median 6.5%, worst 10.0%" in text
    assert "throughput error: median 5.0%, worst 10.0%" in text


@pytest.mark.slow
def test_sweep_then_validate_on_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny.json"
    sweep = ["sweep", "--model", "tiny", "--method", "none", "--k", "0", "--concurrency", "1,4", "--context",
             "64,256", "--steps", "3", "--out", str(out), "--no-plots", "--no-progress"]  # fmt: skip
    assert main(sweep) == 0
    assert load_profile(out).metadata.weights == "random"
    capsys.readouterr()
    assert main(["validate", str(out), "--points", "1", "--max-tokens", "16", "--requests-per-seq", "1"]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.strip().startswith("none"))
    cells = row.split()
    assert cells[2] == "2" and int(cells[3]) > 64  # c=2 off the grid, isl inside (64, 256)
    assert float(cells[6]) > 0 and float(cells[7]) > 0  # predicted and measured ITL
    assert re.search(r"ITL error: median \d+\.\d%, worst \d+\.\d%", text)
