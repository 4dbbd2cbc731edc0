"""Capacity rules per serving engine: integer math, the vLLM and engine rules, the ngram onset model."""

from __future__ import annotations

import numpy as np
import pytest

from kvbm import capacity as C


def test_blocks_per_sequence_is_exact_at_any_size() -> None:
    assert C.blocks_per_sequence(2**60, 0, 1) == 2**60 + 1  # float division said 2**60
    assert C.blocks_per_sequence(2**60, 3, 2**59) == 3
    assert C.blocks_for_slots(2**62 + 1, 2**62) == 2
    assert C.blocks_per_sequence(np.int64(15), np.int32(0), 16) == 1  # numpy ints are ints


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((10.0, 0, 16), TypeError, "context_len must be an int, got float 10.0"),
        ((10, 0.5, 16), TypeError, "num_lookahead_tokens must be an int"),
        ((10, 0, True), TypeError, "block_size must be an int, got True"),
        ((10, 0, "16"), TypeError, "block_size must be an int, got str"),
        ((-1, 0, 16), ValueError, "context_len must be >= 0, got -1"),
        ((10, 0, 0), ValueError, "block_size must be >= 1, got 0"),
    ],
)
def test_bad_arguments_name_the_field(args: tuple, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        C.blocks_per_sequence(*args)


def test_vllm_rule_matches_the_measured_numbers_of_the_issue() -> None:
    # 128 blocks of 32 without speculation: vLLM's limit is 31 at isl+osl = 126 and 128
    for ctx in (126, 128):
        b = C.static_bound("vllm", "none", 0, 128, ctx, 32)
        assert (b.usable_blocks, b.blocks_per_sequence, b.max_concurrency) == (127, 4, 31)
    assert C.static_bound("vllm", "none", 0, 128, 129, 32).max_concurrency == 31  # 128 slots: 4 blocks
    assert C.static_bound("vllm", "none", 0, 128, 130, 32).max_concurrency == 25
    # the engine has no null block
    assert C.static_bound("engine", "none", 0, 128, 129, 32).max_concurrency == 32


@pytest.mark.parametrize(
    ("model", "method", "k", "slots"),
    [
        ("vllm", "ngram", 4, 99 + 4),  # drafts take room, no lookahead reserved
        ("vllm", "eagle", 4, 99 + 8),  # drafts plus k lookahead (VllmConfig.num_lookahead_tokens)
        ("vllm", "draft", 3, 99 + 6),
        ("vllm", "medusa", 4, 99 + 4),
        ("engine", "ngram", 8, 99),  # drafts are cut to the room before max_tokens
        ("engine", "draft", 8, 99),
        ("engine", "medusa", 4, 103),  # a tree is not cut
        ("engine", "none", 0, 99),
    ],
)
def test_peak_slots_per_engine_and_method(model: str, method: str, k: int, slots: int) -> None:
    assert C.peak_slots(model, method, k, 100) == slots  # type: ignore[arg-type]
    assert C.describe_rule(model, method, k)  # type: ignore[arg-type]


def test_unknown_model_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity model must be one of engine, vllm, got 'sglang'"):
        C.usable_blocks("sglang", 10)  # type: ignore[arg-type]


def test_without_drafts_the_simulation_agrees_with_the_static_bound() -> None:
    """Coverage 0: every sequence advances one token a step, all peak together: the onset is static + 1."""
    for model in ("vllm", "engine"):
        static = C.static_bound(model, "none", 0, 128, 130, 32).max_concurrency
        b = C.dynamic_bound(model, 128, 32, 60, 70, 4, 0.0, [0.5] * 4)
        assert b.onset == static + 1 and b.max_concurrency == static
        assert C.preemption_probability(model, 128, 32, 60, 70, 4, 0.0, [0.5] * 4, static) == 0.0


def test_drafts_that_finish_sequences_early_move_the_onset_up() -> None:
    """vLLM with ngram: isl+osl-1 = 129 needs a 5th block only at the very end; high acceptance makes
    sequences finish at different steps, so more than the static 25 (k=4 drafts at every peak) fit."""
    static = C.static_bound("vllm", "ngram", 4, 128, 130, 32).max_concurrency
    b = C.dynamic_bound("vllm", 128, 32, 60, 70, 4, 0.9, [0.9, 0.8, 0.7, 0.6])
    assert static == 25 and b.onset > static + 1
    assert b.probability(b.onset) >= C.ONSET_PROBABILITY
    assert b.probability(b.max_concurrency) <= b.max_risk < b.probability(b.onset)
    assert b.probability(static) == 0.0


def test_prompts_that_cannot_fit_together_always_preempt() -> None:
    assert C.preemption_probability("vllm", 16, 32, 100, 10, 4, 1.0, [1.0] * 4, 6) == 1.0


def test_bad_acceptance_is_refused() -> None:
    with pytest.raises(ValueError, match="accepted_per_pos must hold k=4 shares"):
        C.preemption_probability("vllm", 64, 32, 40, 40, 4, 0.5, [0.5], 3)
    with pytest.raises(ValueError, match="coverage must be in"):
        C.preemption_probability("vllm", 64, 32, 40, 40, 1, 1.5, [0.5], 3)


@pytest.mark.parametrize(
    ("model", "blocks", "bs", "isl", "osl", "k", "coverage", "acc"),
    [
        ("vllm", 128, 32, 60, 70, 4, 0.9, [0.9, 0.8, 0.7, 0.6]),
        ("vllm", 128, 32, 60, 70, 8, 0.6, [0.6, 0.4, 0.3, 0.2, 0.1, 0.1, 0.05, 0.0]),
        ("engine", 128, 32, 60, 70, 4, 0.9, [0.9, 0.8, 0.7, 0.6]),
        ("vllm", 4000, 16, 1000, 256, 4, 0.7, [0.7, 0.5, 0.4, 0.3]),
    ],
)
def test_the_markov_chain_onset_agrees_with_monte_carlo(
    model: str, blocks: int, bs: int, isl: int, osl: int, k: int, coverage: float, acc: list[float]
) -> None:
    """The planner's closed form (exact per client, normal sum) and a direct simulation of c clients."""
    onset = C.dynamic_bound(model, blocks, bs, isl, osl, k, coverage, acc, waves=2).onset  # type: ignore[arg-type]
    static = C.static_bound(model, "ngram", k, blocks, isl + osl, bs).max_concurrency  # type: ignore[arg-type]
    simulated = next(
        c
        for c in range(static + 1, onset + 5)
        if C.preemption_probability(model, blocks, bs, isl, osl, k, coverage, acc, c, waves=2) >= 0.5  # type: ignore[arg-type]
    )
    assert abs(onset - simulated) <= 1


def test_client_occupancy_without_drafts_is_deterministic() -> None:
    means, variances = C.client_occupancy("vllm", 32, 60, 70, 0, 0.0, [], steps=140)
    assert max(variances) == 0.0
    assert max(means) == C.blocks_for_slots(60 + 70 - 1, 32)  # the last step holds isl + osl - 1
    assert means[0] == C.blocks_for_slots(61, 32)  # first decode step: prompt + first token
