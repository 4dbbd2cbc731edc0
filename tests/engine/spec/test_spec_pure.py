"""Unit tests of the model-free parts of engine.spec: config validation, counters, prompt lookup,
verification (greedy, rejection sampling, tree walk) and the Medusa tree/heads helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from engine.errors import ConfigError
from engine.spec import NgramProposer, SpecConfig, SpecSequence, SpecStats, verify_chain, verify_greedy
from engine.spec.medusa import MedusaHeads, MedusaTree, compact_accepted_kv, default_tree
from engine.spec.ngram import lookup
from engine.spec.verify import filtered_probs, rejection_sample_one, verify_tree


def _chi2_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness-of-fit p-value of observed counts against probabilities."""
    probs = np.asarray(probs, dtype=np.float64).ravel()
    counts = np.asarray(counts, dtype=np.float64).ravel()
    return float(chisquare(counts, probs / probs.sum() * counts.sum()).pvalue)


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"method": "eagle", "k": 2}, "'eagle'"),
        ({"method": "ngram", "k": 0}, "k (num_speculative_tokens)"),
        (
            {"method": "ngram", "k": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 4},
            "prompt_lookup_min (5)",
        ),
        ({"method": "ngram", "k": 2, "draft_layers": 2}, "draft_model/draft_layers"),
        ({"method": "draft", "k": 2, "draft_layers": 0}, "draft_layers"),
        ({"method": "medusa", "k": 2, "tree": [[0, 1, 2]]}, "no parent path"),
        ({"method": "medusa", "k": 2, "tree": [[0], [0, 0], [0, 0, 0]]}, "tree depth 3 exceeds k=2"),
        ({"method": "medusa", "k": 2, "tree": [[-1]]}, "ints >= 0"),
    ],
)
def test_spec_config_errors_name_field_and_value(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as exc:
        SpecConfig(**kwargs)
    assert needle in str(exc.value)


def test_spec_config_tree_is_normalized_and_lookahead() -> None:
    cfg = SpecConfig(method="medusa", k=2, tree=[[1], [0, 0], [0]])
    assert cfg.tree == ((0,), (1,), (0, 0))
    assert cfg.num_lookahead_tokens == 3  # the root is the real token; 3 tree nodes ride along
    assert SpecConfig(method="ngram", k=4).num_lookahead_tokens == 4
    assert SpecConfig(method="medusa", k=4).num_lookahead_tokens == 63
    with pytest.raises(ConfigError, match="unknown field"):
        SpecConfig.from_dict({"method": "ngram", "k": 1, "bogus": 3})


# --- counters -----------------------------------------------------------------------------------


def test_spec_stats_identity_and_vllm_counting() -> None:
    s = SpecStats()
    s.record(0, 0)  # a step without a draft: counted as a decode step, not as a draft
    s.record(4, 2)
    s.record(4, 4)
    s.record(2, 0)
    assert (s.num_decode_steps, s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (4, 3, 10, 6)
    assert s.accepted_per_pos == [2, 2, 1, 1]
    assert s.tokens_per_step == pytest.approx(1 + 6 / 4)
    assert s.tokens_per_step == pytest.approx(1 + s.draft_coverage * s.acceptance_given_draft)
    assert s.acceptance_given_draft == pytest.approx(sum(s.acceptance_rate_per_pos))
    with pytest.raises(ValueError, match="num_accepted"):
        s.record(2, 3)
    tree = SpecStats(max_positions=3)
    tree.record(63, 2)
    assert tree.accepted_per_pos == [1, 1, 0] and tree.num_draft_tokens == 63
    with pytest.raises(ValueError, match="max_positions"):
        tree.record(63, 4)
    t = SpecStats()
    t.record(1, 1)
    s.merge(t)
    assert s.accepted_per_pos == [3, 2, 1, 1] and s.num_decode_steps == 5


# --- prompt lookup ------------------------------------------------------------------------------


def test_ngram_lookup_longest_most_recent_match() -> None:
    toks = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    # suffix (2, 3) occurs at 1 and 5; the most recent is 5 -> continuation 7 8 5
    assert lookup(toks, 3, 1, 4) == [7, 8, 5]
    # a longer n wins over a more recent shorter one
    toks = np.array([4, 5, 6, 10, 11, 6, 12, 4, 5, 6])
    assert lookup(toks, 2, 1, 3) == [10, 11]
    assert lookup(np.array([1, 2, 3]), 4, 1, 4) == []  # nothing repeats
    assert lookup(np.array([5, 5, 5]), 4, 1, 4) == [5, 5, 5, 5]  # a repeat continues periodically
    assert lookup(np.array([1, 7, 8, 7, 8, 7]), 5, 1, 4) == [8, 7, 8, 7, 8]
    assert lookup(np.array([1, 2, 1]), 0, 1, 4) == []


def test_ngram_proposer_per_sequence_budgets() -> None:
    p = NgramProposer(2, 3)
    seqs = [SpecSequence("a", [1, 2, 3, 4, 1, 2]), SpecSequence("b", [7, 8, 9, 7, 8])]
    assert p.propose(seqs, 2) == [[3, 4], [9, 7]]
    assert p.propose(seqs, [1, 0]) == [[3], []]
    assert p.propose([SpecSequence("c", [1, 2, 3, 1])], 2) == [[]]  # n=1 not allowed here
    assert p.draft_probs(seqs) == [None, None]


# --- verification -------------------------------------------------------------------------------


def _onehot_logits(tokens: list[int], vocab: int = 10) -> torch.Tensor:
    out = torch.full((len(tokens), vocab), -10.0)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = 10.0
    return out


def test_verify_greedy_accepts_matching_prefix_then_target_token() -> None:
    # seq 0: drafts [3, 4, 5], target argmax rows [3, 4, 6, 1] -> accept 2, then 6
    # seq 1: no draft, target 2 ; seq 2: drafts [1], target [1, 8] -> accept 1, bonus 8
    logits = _onehot_logits([3, 4, 6, 1, 2, 1, 8])
    res = verify_greedy(logits, [[3, 4, 5], [], [1]])
    assert res.num_accepted == [2, 0, 1]
    assert res.tokens == [[3, 4, 6], [2], [1, 8]]
    with pytest.raises(ValueError, match="logit rows"):
        verify_greedy(logits[:3], [[3, 4, 5]])


def test_filtered_probs_top_p_keeps_crossing_token() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = filtered_probs(logits, 1.0, 0.7)
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(filtered_probs(logits, 1.0, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))


def _first_token_counts(p: torch.Tensor, q: torch.Tensor | None, n: int, sample_draft: bool) -> np.ndarray:
    """Histogram of the first emitted token of rejection sampling over n seeded runs."""
    vocab = p.shape[-1]
    counts = np.zeros(vocab)
    g = torch.Generator().manual_seed(1234)
    for _ in range(n):
        if sample_draft:
            assert q is not None
            d = [int(torch.multinomial(q[0], 1, generator=g))]
        else:
            d = [2]
        _, toks = rejection_sample_one(p, d, q, g)
        counts[toks[0]] += 1
    return counts


@pytest.mark.parametrize("draft_kind", ["model", "onehot"])
def test_rejection_sampling_preserves_target_distribution(draft_kind: str) -> None:
    """Chi-square: first emitted token ~ p whatever q is (Leviathan et al.)."""
    p_row = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    q_row = torch.tensor([0.40, 0.05, 0.25, 0.05, 0.05, 0.20])
    p = torch.stack([p_row, torch.full((6,), 1 / 6)])
    n = 6000
    if draft_kind == "model":
        counts = _first_token_counts(p, q_row[None], n, sample_draft=True)
    else:
        counts = _first_token_counts(p, None, n, sample_draft=False)
    assert _chi2_p(counts, p_row.numpy()) > 1e-3, counts


def test_rejection_sampling_two_positions_joint_distribution() -> None:
    """Two draft positions: the emitted pair (t1, t2) follows p1(t1) * p2(t2 | t1)."""
    p1 = torch.tensor([0.6, 0.3, 0.1])
    p2 = torch.tensor([0.2, 0.2, 0.6])  # the test's target ignores t1 for simplicity
    q1 = torch.tensor([0.2, 0.2, 0.6])
    q2 = torch.tensor([0.7, 0.2, 0.1])
    p = torch.stack([p1, p2, p2])
    q = torch.stack([q1, q2])
    g = torch.Generator().manual_seed(7)
    counts = np.zeros((3, 3))
    n = 9000
    for _ in range(n):
        d = [int(torch.multinomial(q1, 1, generator=g)), int(torch.multinomial(q2, 1, generator=g))]
        a, toks = rejection_sample_one(p, d, q, g)
        if len(toks) < 2:  # rejected at position 0: continue plain sampling from the target
            toks = [*toks, int(torch.multinomial(p2, 1, generator=g))]
        counts[toks[0], toks[1]] += 1
    assert _chi2_p(counts, (p1[:, None] * p2[None, :]).numpy()) > 1e-3, counts


def test_verify_chain_mixes_greedy_and_sampled_rows() -> None:
    logits = _onehot_logits([3, 4, 6, 2, 5])
    g = torch.Generator().manual_seed(0)
    res = verify_chain(
        logits,
        [[3, 4], [2]],
        temperatures=[0.0, 0.5],
        top_ps=[1.0, 1.0],
        generators=[None, g],
    )
    assert res.tokens[0] == [3, 4, 6]
    assert res.tokens[1] == [2, 5]  # near-deterministic target: draft accepted, bonus 5


def test_verify_tree_greedy_and_sampled() -> None:
    tree = MedusaTree.build(((0,), (1,), (0, 0), (1, 0)))
    # nodes: 0 root, 1=(0,), 2=(1,), 3=(0,0), 4=(1,0)
    node_tokens = [9, 5, 6, 7, 8]
    argmax_rows = [6, 0, 8, 0, 3]  # root -> 6 (node 2), node 2 -> 8 (node 4), node 4 -> 3 (bonus)
    path, nxt = verify_tree(_onehot_logits(argmax_rows), node_tokens, tree.children)
    assert path == [2, 4] and nxt == 3
    # sampled walk on a near-deterministic target picks the same path
    g = torch.Generator().manual_seed(3)
    path, nxt = verify_tree(
        _onehot_logits(argmax_rows), node_tokens, tree.children, temperature=1.0, generator=g
    )
    assert path == [2, 4] and nxt == 3


def test_verify_tree_sampling_preserves_distribution() -> None:
    """First emitted token of a sampled tree walk with two root children ~ p(root row)."""
    tree = MedusaTree.build(((0,), (1,)))
    p_root = torch.tensor([0.1, 0.4, 0.2, 0.3])
    logits = torch.log(torch.stack([p_root, p_root, p_root]))
    g = torch.Generator().manual_seed(11)
    n = 6000
    counts = np.zeros(4)
    for _ in range(n):
        path, nxt = verify_tree(logits, [0, 1, 3], tree.children, temperature=1.0, generator=g)
        first = [0, 1, 3][path[0]] if path else nxt
        counts[first] += 1
    assert _chi2_p(counts, p_root.numpy()) > 1e-3, counts


# --- medusa helpers -----------------------------------------------------------------------------


def test_default_tree_shape_and_mask() -> None:
    paths = default_tree(4)
    assert len(paths) == 63
    tree = MedusaTree.build(paths)
    assert tree.num_nodes == 64 and tree.num_heads == 4
    for p in paths[1:]:
        assert len(p) == 1 or p[:-1] in paths
    m = tree.mask
    assert m.diagonal().all() and m[:, 0].all()
    for j in range(1, tree.num_nodes):
        assert int(m[j].sum()) == tree.depth[j] + 1  # itself + its ancestors incl. the root
        assert not m[j, j + 1 :].any()  # breadth-first order: ancestors come first


def test_candidates_and_positions() -> None:
    tree = MedusaTree.build(((0,), (1,), (0, 0)))
    head_logits = torch.zeros(1, 2, 5)
    head_logits[0, 0] = torch.tensor([0.0, 5.0, 4.0, 1.0, 2.0])  # top: 1, 2
    head_logits[0, 1] = torch.tensor([3.0, 0.0, 0.0, 9.0, 0.0])  # top: 3
    cand = tree.candidates(torch.tensor([7]), head_logits)
    assert cand.tolist() == [[7, 1, 2, 3]]
    assert tree.positions(torch.tensor([10])).tolist() == [[10, 11, 11, 12]]


def test_medusa_heads_roundtrip(tmp_path) -> None:
    heads = MedusaHeads.random(16, 40, 3, seed=1)
    names = set(heads.state_dict())
    assert "medusa_head.2.0.linear.bias" in names and "medusa_head.0.1.weight" in names
    out = heads(torch.randn(5, 16))
    assert out.shape == (5, 3, 40)
    f = tmp_path / "heads.safetensors"
    heads.save(f)
    again = MedusaHeads.load(f)
    x = torch.randn(2, 16)
    assert torch.equal(again(x), heads(x))
    # a medusa_lm_head.pt-style dict without the prefix
    pt = tmp_path / "medusa_lm_head.pt"
    torch.save({k.removeprefix("medusa_head."): v for k, v in heads.state_dict().items()}, pt)
    assert torch.equal(MedusaHeads.load(pt)(x), heads(x))
    with pytest.raises(ConfigError, match="does not exist"):
        MedusaHeads.load(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="missing"):
        MedusaHeads.from_state_dict({"medusa_head.0.1.weight": torch.zeros(4, 2)})


def test_compact_accepted_kv_moves_path_to_contiguous_slots() -> None:
    block_size = 4
    k = torch.arange(3 * block_size, dtype=torch.float32).view(3, block_size, 1, 1).clone()
    v = -k.clone()
    table = [2, 0, 1]  # positions 0-3 in block 2, 4-7 in block 0, 8-11 in block 1
    # root at position 2; accepted nodes 3 (depth 1) and 6 (depth 2)
    compact_accepted_kv([(k, v)], table, block_size, root_pos=2, path=[3, 6])

    def at(cache: torch.Tensor, pos: int) -> float:
        return float(cache.view(-1)[table[pos // block_size] * block_size + pos % block_size])

    orig = torch.arange(12, dtype=torch.float32)

    def orig_at(pos: int) -> float:
        return float(orig[table[pos // block_size] * block_size + pos % block_size])

    assert at(k, 3) == orig_at(5) and at(k, 4) == orig_at(8)
    assert at(v, 3) == -orig_at(5) and at(k, 2) == orig_at(2)


@pytest.mark.parametrize(
    ("given", "window"),
    [({}, (5, 5)), ({"prompt_lookup_max": 4}, (4, 4)), ({"prompt_lookup_min": 2}, (2, 2)),
     ({"prompt_lookup_min": 2, "prompt_lookup_max": 4}, (2, 4))],
)  # fmt: skip
def test_prompt_lookup_defaults_follow_vllm_and_the_planner(given: dict, window: tuple[int, int]) -> None:
    from planner.profile import ngram_settings

    cfg = SpecConfig(method="ngram", k=3, **given)
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == window
    assert cfg.drafter_settings() == ngram_settings(
        given.get("prompt_lookup_min"), given.get("prompt_lookup_max")
    )
