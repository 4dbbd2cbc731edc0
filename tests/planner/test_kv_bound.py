"""Planner.kv_bound: whose KV rule applies, what it says, and that a plan never recommends a
concurrency at which its own KV model predicts preemption."""

from __future__ import annotations

import pytest

from kvbm import capacity
from planner.plan import Planner
from planner.synthetic import AnalyticModel, synthetic_profile

M = AnalyticModel()


def planner_for(backend: str = "engine", kv_model: str | None = None, blocks: int | None = None) -> Planner:
    prof = synthetic_profile(M)
    meta = prof.metadata.model_copy(
        update={
            "backend": backend,
            "kv_capacity_model": kv_model,
            "kv_capacity_blocks_by_tp": {1: blocks} if blocks else None,
        }
    )
    return Planner(prof.model_copy(update={"metadata": meta}), "kv")


@pytest.mark.parametrize(
    ("backend", "override", "model"),
    [("engine", None, "engine"), ("http", None, "vllm"), ("vllm", None, "vllm"), ("engine", "vllm", "vllm")],
)
def test_the_rule_follows_the_backend_unless_the_profile_names_one(backend, override, model) -> None:
    kv = planner_for(backend, override, blocks=128).kv_bound(1, 0, 128)
    assert kv.model == model
    # 128 blocks of 16, isl + osl = 128: 127 slots -> 8 blocks; vLLM keeps a null block out of the pool
    assert (kv.blocks_per_sequence, kv.max_concurrency) == (8, 16 if model == "engine" else 15)
    assert ("null block" in kv.rule) == (model == "vllm") and "isl+osl-1" in kv.rule


def test_kv_capacity_model_is_validated() -> None:
    with pytest.raises(ValueError, match="kv_capacity_model"):
        planner_for().profile.metadata.model_validate(
            {**planner_for().profile.metadata.model_dump(), "kv_capacity_model": "sglang"}
        )


def test_ngram_bound_uses_the_measured_acceptance_and_lies_between_worst_case_and_onset() -> None:
    p = planner_for("vllm", blocks=2000)
    isl, osl = 1000, 300
    kv = p.kv_bound(1, 4, isl + osl, "ngram", isl)
    cov, acc = M.acceptance["ngram"][0], [a for a in p._kv_acceptance("ngram", 4)[1]]
    expect = capacity.dynamic_bound("vllm", 2000, M.block_size, isl, osl, 4, cov, acc)
    assert kv.worst_case_concurrency <= kv.max_concurrency < kv.preemption_onset == expect.onset
    assert kv.worst_case_concurrency + 1 < kv.preemption_onset
    assert kv.max_concurrency == expect.max_concurrency
    assert "simulated" in kv.rule
    assert kv.at(kv.max_concurrency).preemption_risk <= kv.max_preemption_risk
    assert kv.at(kv.preemption_onset).preemption_risk >= 0.5
    assert kv.at(kv.worst_case_concurrency).preemption_risk == 0.0
    # a draft model drafts at every step: worst case only, and vLLM reserves k lookahead slots too
    draft = p.kv_bound(1, 4, isl + osl, "draft", isl)
    assert draft.preemption_onset is None
    assert draft.blocks_per_sequence == capacity.blocks_for_slots(isl + osl - 1 + 8, M.block_size)


def test_plan_never_recommends_a_concurrency_the_kv_model_says_preempts() -> None:
    p = planner_for("vllm", blocks=1200)
    res = p.plan(500.0, isl=1000, osl=300, max_gpus=1)
    for ch in [res.choice, *res.alternatives]:
        assert ch is not None
        assert ch.max_concurrency <= ch.kv.max_concurrency
        assert ch.kv.concurrency == ch.max_concurrency
        assert ch.kv.preemption_risk is not None and ch.kv.preemption_risk <= capacity.DEFAULT_MAX_RISK
    assert any(ch.limited_by == "kv" for ch in [res.choice, *res.alternatives])
    ngram = [ch for ch in res.alternatives + [res.choice] if ch and ch.method == "ngram"]
    assert ngram and all(ch.max_concurrency < ch.kv.preemption_onset for ch in ngram)
