"""`profiler validate`: off-grid targets for every method, the planner's prediction at a measured
acceptance, and none/ngram/draft end to end through `engine serve` over HTTP on the tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.metrics import summarize
from planner.profile import (
    Acceptance,
    AcceptanceSource,
    DecodePoint,
    EngineInfo,
    Hardware,
    Metadata,
    ModelInfo,
    ModelShape,
    PrefillPoint,
    Profile,
    new_profile,
    now_utc,
    save_profile,
)
from profiler.cli import main
from profiler.validate import (
    Outcome,
    Target,
    ValidateError,
    choose_targets,
    longest_output,
    predict,
    report,
    serve_command,
    spread_output_lengths,
)


def _profile(
    source: str = "measured",
    methods: tuple[tuple[str, int], ...] = (("none", 0),),
    concurrencies: tuple[int, ...] = (1, 4, 16),
) -> Profile:
    meta = Metadata(
        model=ModelInfo(name="tiny", shape=ModelShape(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32,
                                                      vocab=320, params=10**6)),
        hardware=Hardware(gpu_name="cpu", gpu_count=1), engine=EngineInfo(name="t", version="0"),
        backend="engine", dtype="float32", block_size=16, kv_capacity_blocks_per_gpu=1000,
        weights="random" if source == "measured" else "none", source=source, created_at=now_utc(),
        command="test",
    )  # fmt: skip
    prof = new_profile(meta)
    for method, k in methods:
        for ctx in (128, 512):
            for c in concurrencies:
                step = (2.0 + 0.1 * c + 0.001 * c * ctx) * (1 + 0.2 * k)  # affine in context, growing with c
                prof.upsert(DecodePoint(tp=1, method=method, k=k, concurrency=c, context_len=ctx,
                                        step_ms=step, tokens_per_step=1.0, itl_ms=summarize([step]),
                                        throughput_per_gpu=c / step * 1000, samples=1))  # fmt: skip
    for n, ms in ((64, 1.0), (256, 4.0)):
        prof.upsert(PrefillPoint(tp=1, input_len=n, ttft_ms=ms, prefill_tokens_per_s_per_gpu=n / ms * 1000))
    return prof


def test_output_lengths_spread_around_osl_so_arrivals_do_not_run_in_waves() -> None:
    lengths = spread_output_lengths(64, 16)
    assert sum(lengths) / len(lengths) == pytest.approx(64, abs=0.5)
    assert min(lengths) == 32 and max(lengths) == 96 and len(set(lengths)) == 16
    assert lengths != sorted(lengths) and lengths == spread_output_lengths(64, 16)  # shuffled, fixed
    assert spread_output_lengths(64, 1) == [64] and spread_output_lengths(3, 4) == [3] * 4
    assert all(
        max(spread_output_lengths(osl, n)) <= longest_output(osl) for osl in (3, 4, 9, 64) for n in (1, 7)
    )


def test_served_context_holds_the_longest_spread_output_and_the_record_pass() -> None:
    t = Target(tp=1, method="ngram", k=4, concurrency=2, isl=300, osl=128)
    cmd = serve_command(_profile(), [t], model="tiny", port=1, controlled=None, draft_model=None,
                        draft_layers=None)  # fmt: skip
    max_len = int(cmd[cmd.index("--max-model-len") + 1])
    assert max_len >= t.isl + max(spread_output_lengths(t.osl, 8)) + t.k + 1  # 300 + 192 + 5
    assert "--no-enable-prefix-caching" in cmd


def test_targets_are_off_grid_and_inside_the_measured_range() -> None:
    ts = choose_targets(_profile(), 5, 32)
    assert {t.concurrency for t in ts} == {2, 8}  # geometric midpoints of 1-4 and 4-16
    for t in ts:
        assert t.method == "none" and t.k == 0 and t.osl == 32
        assert t.isl >= 128 and t.isl + t.osl <= 512 and t.isl not in (128, 512)


def test_every_method_gets_targets_even_with_a_none_config() -> None:
    ts = choose_targets(_profile(methods=(("none", 0), ("ngram", 2), ("draft", 3))), 1, 32)
    assert sorted((t.method, t.k) for t in ts) == [("draft", 3), ("ngram", 2), ("none", 0)]
    ts = choose_targets(_profile(concurrencies=(1, 2, 4, 8, 16, 32, 64)), 2, 32)
    assert [t.concurrency for t in ts] == [3, 45]  # spread over the off-grid 3, 6, 11, 23, 45
    assert [
        t.method for t in choose_targets(_profile(methods=(("none", 0), ("ngram", 2))), 1, 32, ["ngram"])
    ] == ["ngram"]


def test_prediction_is_the_planners_at_the_measured_acceptance() -> None:
    prof = _profile(methods=(("none", 0), ("ngram", 2)))
    t = Target(tp=1, method="none", k=0, concurrency=4, isl=128, osl=2)
    itl, thr, tps = predict(prof, t)
    step = 2.0 + 0.4 + 0.004 * 129  # the planner's decode context isl + osl / 2; affine in context
    stall = 4 * 2.0 / 2  # c x TTFT(isl) / osl; TTFT(128) = 2 ms, between the prefill points 64 and 256
    assert (itl, tps) == (pytest.approx(step + stall, rel=1e-3), 1.0)
    assert thr == pytest.approx(4 / ((step + stall) / 1000), rel=1e-3)
    acc = Acceptance(method="ngram", k=2, draft_coverage=0.5, accepted_per_pos=[0.8, 0.4],
                     source=AcceptanceSource(kind="live", detail="test"))  # fmt: skip
    itl, thr, tps = predict(prof, Target(1, "ngram", 2, 4, 128, 2), acc)
    assert tps == pytest.approx(1 + 0.5 * 1.2)
    assert itl == pytest.approx(step * 1.4 / tps + stall, rel=1e-3)
    with pytest.raises(ValidateError, match="acceptance"):
        predict(prof, Target(1, "ngram", 2, 4, 128, 2))


def test_bad_inputs_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidateError, match="points: must be >= 1, got 0"):
        choose_targets(_profile(), 0, 32)
    with pytest.raises(ValidateError, match="max_tokens: 400 does not fit"):
        choose_targets(_profile(), 2, 400)
    real = tmp_path / "measured.json"
    save_profile(_profile(), real)
    assert main(["validate", str(real), "--min-requests", "0"]) == 2
    assert "min_requests: must be >= 1, got 0" in capsys.readouterr().err
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
def test_validate_none_ngram_draft_over_http_on_tiny(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hand-written profile (its numbers need not match this machine): the point is that every
    method runs end to end through engine serve and yields a finite error."""
    path = tmp_path / "tiny.json"
    prof = _profile(methods=(("none", 0), ("ngram", 2), ("draft", 2)), concurrencies=(1, 4))
    prof.metadata.command = "profiler sweep --model tiny --draft-model tiny"
    save_profile(prof, path)
    args = ["validate", str(path), "--points", "1", "--max-tokens", "16", "--requests-per-seq", "2"]
    args += ["--min-requests", "6"]
    assert main(args) == 0
    text = capsys.readouterr().out
    for method in ("none", "ngram", "draft"):
        cells = next(line for line in text.splitlines() if line.strip().startswith(method)).split()
        assert cells[2] == "2" and 128 < int(cells[3]) < 512  # c=2 off the grid, isl inside (128, 512)
        assert cells[5] == "6"  # --min-requests over 2 requests per slot x 2 slots
        assert re.fullmatch(r"[+-]\d+\.\d%", cells[10]), cells  # a finite ITL error
        assert float(cells[9]) > 0 and float(cells[14]) > 0  # measured ITL and throughput
        assert re.search(rf"{method} k=\d \(1 points\): ITL: median \d+\.\d%", text)
    assert "acceptance used for tp=1 ngram k=2: coverage" in text  # controlled: random weights
