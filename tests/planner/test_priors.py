"""The literature prior: the data file's published figures, the stated per-position model, labels."""

from __future__ import annotations

import pytest

from planner.priors import MIX, geometric_alpha, load_priors, prior_acceptance, workloads


def test_published_figures_reproduce_through_the_geometric_model() -> None:
    table = load_priors()
    vicuna = table.models["vicuna-7b"].methods
    # the checked Spec-Bench leaderboard (3090) figures, as the data file records them
    assert {m: p.tokens_per_step for m, p in vicuna.items()} == {
        "ngram": 1.73, "draft": 2.28, "eagle": 4.35, "medusa": 2.32, "hydra": 3.26,
    }  # fmt: skip
    for method, mp in vicuna.items():
        if not mp.plannable:
            continue
        acc = prior_acceptance("vicuna-7b", method, mp.k)
        assert not isinstance(acc, str)
        assert acc.tokens_per_step == pytest.approx(mp.tokens_per_step, rel=1e-6)
        assert acc.draft_coverage == 1.0 and acc.source.kind == "prior" and acc.source.citation
        alpha = acc.accepted_per_pos[0]
        assert acc.accepted_per_pos == pytest.approx([alpha ** (i + 1) for i in range(mp.k)])


def test_alpha_solves_the_stated_equation() -> None:
    for tps, k in ((1.73, 10), (2.28, 5), (4.35, 5), (1.2, 1)):
        a = geometric_alpha(tps, k)
        assert 1 + sum(a**i for i in range(1, k + 1)) == pytest.approx(tps)
    assert geometric_alpha(7.0, 5) == 1.0  # beyond what k drafts can give: every draft accepted


def test_workloads_scale_by_published_category_speedup() -> None:
    mp = load_priors().models["vicuna-7b"].methods["ngram"]
    summ = prior_acceptance("vicuna-7b", "ngram", 10, "summarization")
    trans = prior_acceptance("vicuna-7b", "ngram", 10, "translation")
    mix = prior_acceptance("vicuna-7b", "ngram", 10, MIX)
    assert summ.tokens_per_step == pytest.approx(1.73 * mp.speedup["summarization"] / mp.speedup["overall"])
    assert trans.tokens_per_step < mix.tokens_per_step < summ.tokens_per_step  # PLD loves summaries
    assert summ.workload == "summarization" and mix.workload is None
    assert "workload summarization" in summ.source.detail
    assert set(workloads()) == {
        "mt_bench",
        "translation",
        "summarization",
        "qa",
        "math_reasoning",
        "rag",
        MIX,
    }
    with pytest.raises(ValueError, match="workload='poetry'"):
        prior_acceptance("vicuna-7b", "ngram", 4, "poetry")


def test_drafter_settings_come_with_the_prior() -> None:
    ng = prior_acceptance("vicuna-7b", "ngram", 4)
    assert ng.drafter_settings == {"prompt_lookup_min": 1, "prompt_lookup_max": 3}
    dr = prior_acceptance("vicuna-7b", "draft", 4)
    assert dr.source.drafter == "double7/vicuna-68m"


def test_another_model_needs_an_explicit_labelled_opt_in() -> None:
    refused = prior_acceptance("llama-3-8b", "ngram", 4)
    assert isinstance(refused, str) and "no literature prior for model 'llama-3-8b'" in refused
    applied = prior_acceptance("llama-3-8b", "ngram", 4, prior_model="vicuna-7b")
    assert "prior for vicuna-7b applied to llama-3-8b" in applied.source.detail
    assert isinstance(prior_acceptance("vicuna-7b", "hydra", 4), str)  # no hydra method to plan
