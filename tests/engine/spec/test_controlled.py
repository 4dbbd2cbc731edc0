"""The controlled-acceptance drafter: parsing, the per-position rule, and through LLMEngine on the tiny
random-weight model: it hits its target coverage and acceptance within a stated tolerance, and greedy
output stays identical to plain decoding (verification is lossless whatever the drafts are)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import ConfigError
from engine.spec import SpecConfig
from engine.spec.base import SpecSequence
from engine.spec.controlled import ControlledAcceptance, ControlledProposer
from engine.spec.ngram import NgramProposer


def test_parse_alpha_and_list() -> None:
    c = ControlledAcceptance.parse("alpha=0.5,coverage=0.8", 3)
    assert c.accepted_per_pos == pytest.approx((0.5, 0.25, 0.125))
    assert c.coverage == 0.8
    assert c.conditional() == pytest.approx([0.5, 0.5, 0.5])
    c = ControlledAcceptance.parse("acceptance=0.9:0.6:0", 3)
    assert c.coverage == 1.0
    assert c.conditional() == pytest.approx([0.9, 2 / 3, 0.0])


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("alpha=1.5", "alpha"),
        ("alpha=0.5,coverage=2", "coverage"),
        ("acceptance=0.5:0.7", "position 1"),
        ("acceptance=0.5", "1 positions for k=2"),
        ("alpha=x", "not a number"),
        ("beta=0.5", "expected alpha"),
        ("coverage=0.5", "exactly one of"),
    ],
)
def test_parse_errors_name_the_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ControlledAcceptance.parse(text, 2)


def test_spec_config_rejects_medusa() -> None:
    with pytest.raises(ConfigError, match="medusa"):
        SpecConfig(method="medusa", k=2, controlled="alpha=0.5")
    assert SpecConfig(method="ngram", k=2, controlled="alpha=0.5").controlled.coverage == 1.0


def test_serve_flag_builds_the_controlled_config() -> None:
    import argparse

    from engine.spec.flags import add_spec_arguments, spec_config

    parser = argparse.ArgumentParser()
    add_spec_arguments(parser)
    args = parser.parse_args(["--spec", "ngram", "--k", "2", "--spec-controlled", "alpha=0.5,coverage=0.9"])
    spec = spec_config(args, "engine serve")
    assert spec.controlled == ControlledAcceptance((0.5, 0.25), 0.9)
    with pytest.raises(ConfigError, match="alpha"):
        spec_config(parser.parse_args(["--spec", "ngram", "--k", "2", "--spec-controlled", "alpha=2"]), "x")


def test_per_position_rates_with_a_known_truth() -> None:
    """Without an engine: a recorded sequence's drafts are true at the target per-position rates."""
    target = ControlledAcceptance.parse("alpha=0.7,coverage=0.6", 3)
    p = ControlledProposer(NgramProposer(), target, vocab_size=100, bounded_by_inner=False, seed=1)
    rec = list(range(10, 60))
    p.propose([SpecSequence("r", rec)], 3)
    p.free("r")  # recorded
    seq = SpecSequence("s", rec[:20])
    n, drafts, accepted = 4000, 0, np.zeros(3)
    for _ in range(n):
        d = p.propose([seq], 3)[0]
        if d:
            drafts += 1
            ok = np.cumprod([a == b for a, b in zip(d, rec[20:23], strict=True)])
            accepted += ok
            assert all(0 <= t < 100 for t in d)
        p.commit("s", 0)
    assert drafts / n == pytest.approx(0.6, abs=0.03)
    assert accepted / drafts == pytest.approx([0.7, 0.49, 0.343], abs=0.03)


def test_unknown_prompt_gets_wrong_tokens_of_full_length() -> None:
    p = ControlledProposer(
        NgramProposer(), ControlledAcceptance.parse("alpha=1", 4), vocab_size=50, bounded_by_inner=False
    )
    d = p.propose([SpecSequence("s", list(range(30)))], 4)[0]
    assert len(d) == 4  # same verify cost as a recorded prompt
    assert p.truth(SpecSequence("s", list(range(30))), 4) == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_engine_hits_target_and_stays_lossless(method: str) -> None:
    """Tolerance: coverage within 0.05, acceptance per position within 0.08 of alpha^(i+1) (about 3
    binomial standard deviations at this sample size, plus the last step of each request, whose
    continuation was never recorded)."""
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=24).tolist() for _ in range(16)]
    params = SamplingParams(max_tokens=96, ignore_eos=True, temperature=0.0)
    kwargs = dict(dtype="float32", device="cpu", max_num_seqs=16, weights="random")
    plain = [c.token_ids for c in LLM("tiny", **kwargs).generate(prompts, params)]
    extra = {"draft_layers": 1} if method == "draft" else {}
    spec = SpecConfig(method=method, k=3, controlled="alpha=0.7,coverage=0.8", **extra)
    llm = LLM("tiny", spec=spec, **kwargs)
    first = [c.token_ids for c in llm.generate(prompts, params)]  # records the continuations
    before = llm.engine.spec_stats.to_dict()
    second = [c.token_ids for c in llm.generate(prompts, params)]
    after = llm.engine.spec_stats.to_dict()
    assert first == plain and second == plain
    drafts = after["num_drafts"] - before["num_drafts"]
    per_pos = [
        (a - b) / drafts for a, b in zip(after["accepted_per_pos"], before["accepted_per_pos"], strict=False)
    ]
    steps = sum(len(t) - 1 for t in second) - (after["num_accepted_tokens"] - before["num_accepted_tokens"])
    assert drafts / steps == pytest.approx(0.8, abs=0.05)
    assert per_pos == pytest.approx([0.7, 0.49, 0.343], abs=0.08)
