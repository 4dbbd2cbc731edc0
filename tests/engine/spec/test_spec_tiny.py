"""Speculative decoding through LLMEngine.step on the random-weight ``tiny`` preset (and a
16-token-vocabulary variant): lossless greedy output for every method and k, rejection sampling's
output distribution, KV-block accounting in both pools and counter identities. Runs in seconds; the
real-weight lossless tests are in test_spec_engine.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import kvbm
from engine import llm_engine
from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.presets import resolve_model
from engine.runner import ModelRunner, SeqBatchEntry
from engine.sampling import SamplingParams
from engine.spec import SpecConfig, filtered_probs

NUM_BLOCKS = 256
BLOCK = 8


@pytest.fixture(scope="module")
def tiny() -> ModelRunner:
    return ModelRunner("tiny", device="cpu", num_blocks=NUM_BLOCKS, block_size=BLOCK, weights="random")


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    out = []
    for n in (5, 17, 30):
        base = rng.integers(0, min(vocab, 250), size=n).tolist()
        out.append(base + base[: n // 2] + base)  # repeats give prompt lookup something to find
    return out


def _engine(spec: SpecConfig | None, **kw) -> LLMEngine:
    kw.setdefault("num_gpu_blocks", NUM_BLOCKS)
    return LLMEngine(EngineConfig("tiny", device="cpu", block_size=BLOCK, spec=spec, weights="random", **kw))


def _greedy(engine: LLMEngine, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n_new, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"s{i}", p, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = list(o.token_ids)
    return [done[f"s{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def plain() -> list[list[int]]:
    return _greedy(_engine(None), _prompts(512), 24)


CONFIGS = [
    pytest.param(lambda k: SpecConfig(method="ngram", k=k), id="ngram"),
    pytest.param(lambda k: SpecConfig(method="draft", k=k, draft_layers=1), id="draft-self1"),
    pytest.param(lambda k: SpecConfig(method="medusa", k=min(k, 4)), id="medusa"),
]


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("make", CONFIGS)
def test_greedy_is_lossless_and_frees_every_block(plain, make, k: int) -> None:
    cfg = make(k)
    engine = _engine(cfg)
    assert _greedy(engine, _prompts(engine.config.vocab_size), 24) == plain
    st = engine.spec_stats
    assert st.num_decode_steps > 0
    assert st.accepted_per_pos and sum(st.accepted_per_pos) == st.num_accepted_tokens
    assert st.tokens_per_step == pytest.approx(1 + st.draft_coverage * st.acceptance_given_draft)
    assert engine.kv_manager.num_free_blocks == NUM_BLOCKS
    if cfg.method == "draft":
        assert engine.proposer.kv.num_free_blocks == engine.proposer.kv.num_blocks
    if cfg.method == "ngram":
        assert st.num_drafts > 0  # the repeated prompts do give prompt lookup matches


def _start(engine: LLMEngine, prompts: list[list[int]], n_new: int = 64) -> None:
    """Add the prompts and run their prefill step."""
    for i, p in enumerate(prompts):
        engine.add_request(f"s{i}", p, SamplingParams(max_tokens=n_new, ignore_eos=True))
    engine.step()


def test_emitted_tokens_equal_steps_plus_accepted() -> None:
    engine = _engine(SpecConfig(method="ngram", k=4))
    prompts = _prompts(engine.config.vocab_size)
    _start(engine, prompts)
    emitted = 0
    for _ in range(6):
        for o in engine.step():
            emitted += len(o.new_token_ids)
    st = engine.spec_stats
    assert emitted == st.num_decode_steps + st.num_accepted_tokens
    assert st.num_decode_steps == 6 * len(prompts)
    # the target pool holds exactly the committed tokens (lookahead released after each commit)
    kv = engine.kv_manager
    for req in engine.scheduler.running:
        assert kv.num_computed_tokens(req.request_id) == req.num_tokens - 1
        assert len(kv.block_table(req.request_id)) == -(-(req.num_tokens - 1) // BLOCK)


def test_draft_pool_rolls_back_rejected_drafts() -> None:
    engine = _engine(SpecConfig(method="draft", k=4, draft_layers=1))
    _start(engine, [_prompts(engine.config.vocab_size)[1]])
    (req,) = engine.scheduler.running
    dkv = engine.proposer.kv
    st = engine.spec_stats
    for _ in range(5):
        n, drafted, accepted = req.num_tokens, st.num_draft_tokens, st.num_accepted_tokens
        engine.step()
        d, a = st.num_draft_tokens - drafted, st.num_accepted_tokens - accepted
        # drafter KV covers the catch-up plus the accepted drafts it fed, never a rejected one
        assert dkv.num_computed_tokens("s0") == n + min(a, d - 1)
        assert len(dkv.block_table("s0")) == -(-dkv.num_computed_tokens("s0") // BLOCK)
    engine.abort("s0")
    assert dkv.num_free_blocks == dkv.num_blocks and engine.kv_manager.num_free_blocks == NUM_BLOCKS


def test_draft_uniform_catch_up_drafts_what_the_ragged_one_does() -> None:
    """Widening a 1-token catch-up to 2 (a CUDA-graph shape on GPU) re-feeds a token whose KV the
    drafter already holds: the drafts are those of the ragged catch-up, and nothing more is committed."""
    from engine.spec.base import SpecSequence

    prompts = _prompts(512)[:2]
    results = {}
    for uniform in (False, True):
        proposer = _engine(SpecConfig(method="draft", k=3, draft_layers=1)).proposer
        proposer.uniform_catch_up = uniform
        seqs = [SpecSequence(f"s{i}", list(p)) for i, p in enumerate(prompts)]
        first = proposer.propose(seqs, 3)
        proposer.commit("s0", 3)  # every draft accepted: next catch-up = last draft + bonus (2 tokens)
        proposer.commit("s1", 0)  # nothing accepted: next catch-up = the bonus (1 token)
        seqs = [
            SpecSequence("s0", [*prompts[0], *first[0], 7]),
            SpecSequence("s1", [*prompts[1], 9]),
        ]
        widths = []
        prepare = proposer.runner.prepare

        def spy(entries, prepare=prepare, widths=widths):  # noqa: ANN001, ANN202
            widths.append([len(e.token_ids) for e in entries])
            return prepare(entries)

        proposer.runner.prepare = spy
        second = proposer.propose(seqs, 3)
        for sid in ("s0", "s1"):
            proposer.commit(sid, 1)
        computed = [proposer.kv.num_computed_tokens(s.seq_id) for s in seqs]
        results[uniform] = (first, second, computed, widths[0])
    assert results[False][3] == [2, 1] and results[True][3] == [2, 2]  # the catch-up forward's widths
    assert results[True][:3] == results[False][:3]


@pytest.mark.slow
def test_draft_rejection_sampling_matches_target_distribution(monkeypatch) -> None:
    """Chi-square over the first two emitted tokens: the second comes from speculative sampling (a
    1-layer drafter, temperature 1, top-p 0.9) and their joint must be the target's exact joint
    distribution, on a 16-token vocabulary."""
    base = resolve_model("tiny", weights="random")
    src = dataclasses.replace(base, config=base.config.replace(name="tiny-v16", vocab_size=16))
    runner = ModelRunner(src, device="cpu", num_blocks=512, block_size=BLOCK, seed=3)
    temp, top_p = 1.0, 0.9
    prompt = [3, 7, 1, 12, 5, 9, 2]
    # exact target joint p(t1) * p(t2 | t1) from the target model
    kv = kvbm.KVCacheManager(512, BLOCK, enable_prefix_caching=False)
    seqs = [(prompt + [t], f"x{t}") for t in range(16)]
    entries = []
    for toks, sid in seqs:
        kv.allocate(sid, len(toks), token_ids=toks)
        entries.append(SeqBatchEntry(toks, kv.block_table(sid), 0))
    ids, pos, meta = runner.prepare(entries)
    _, logits = runner.execute(ids, pos, meta, None)
    rows = logits.view(16, len(prompt) + 1, 16)
    p1 = filtered_probs(rows[0, -2], temp, top_p)
    p2 = filtered_probs(rows[:, -1], temp, top_p)
    joint = (p1[:, None] * p2).numpy().astype(np.float64)

    spec = SpecConfig(method="draft", k=2, draft_layers=1, seed=1)
    monkeypatch.setattr(llm_engine, "resolve_model", lambda *a, **kw: src)
    engine = LLMEngine(
        EngineConfig("tiny-v16", device="cpu", num_gpu_blocks=512, block_size=BLOCK, seed=3, spec=spec)
    )
    counts = np.zeros((16, 16))
    n, batch = 3000, 250
    for b0 in range(0, n, batch):
        for j in range(b0, b0 + batch):
            # t1 comes from the prefill's plain sampling, t2 from verifying the drafter's first token
            params = SamplingParams(
                max_tokens=3, temperature=temp, top_p=top_p, seed=10_000 + j, ignore_eos=True
            )
            engine.add_request(f"r{j}", list(prompt), params)
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    counts[o.token_ids[0], o.token_ids[1]] += 1
    drafts_seen = engine.spec_stats.num_draft_tokens
    assert drafts_seen > 0
    expected = joint.ravel() / joint.sum() * n
    obs = counts.ravel()
    assert obs[expected == 0].sum() == 0  # nothing outside the target's top-p support
    keep = expected >= 5
    f_obs = np.append(obs[keep], obs[~keep].sum())
    f_exp = np.append(expected[keep], expected[~keep].sum())
    f_exp *= f_obs.sum() / f_exp.sum()
    assert chisquare(f_obs, f_exp).pvalue > 1e-3
    assert engine.kv_manager.num_free_blocks == 512


def test_medusa_tree_prefix_in_mixed_batch_matches_causal_rows(tiny: ModelRunner) -> None:
    """apply_tree on a batch mixing a causal chunk and a cut tree: the tree chain (root -> (0,) ->
    (0, 0)) gets the same logits as the same tokens run causally, and the causal chunk is untouched."""
    from engine.spec.medusa_decoder import MedusaDecoder

    cfg = SpecConfig(method="medusa", k=2, tree=[[0], [1], [0, 0], [1, 0]])
    med = MedusaDecoder(cfg, tiny)
    kv = kvbm.KVCacheManager(NUM_BLOCKS, BLOCK, enable_prefix_caching=False)
    ctx = list(range(10, 30))
    nodes = [40, 41, 42]  # BFS prefix of 3 nodes: (0,), (1,), (0, 0)
    other = list(range(50, 61))
    for sid, n in (("t", len(ctx) + len(nodes)), ("c", len(other))):
        kv.allocate(sid, n)
    prefix_entry = SeqBatchEntry(ctx[:-1], kv.block_table("t"), 0)
    ids, pos, meta = tiny.prepare([prefix_entry])
    tiny.execute(ids, pos, meta, None)
    batch = [
        SeqBatchEntry([ctx[-1], *nodes], kv.block_table("t"), len(ctx) - 1),
        SeqBatchEntry(other, kv.block_table("c"), 0),
    ]
    ids, pos, meta = tiny.prepare(batch)
    med.apply_tree(meta, pos, [len(nodes), 0])
    assert pos[:4].tolist() == [19, 20, 20, 21]
    _, tree_logits = tiny.execute(ids, pos, meta, None)
    # causal reference: root, node (0,), node (0, 0) in a fresh pool
    kv2 = kvbm.KVCacheManager(NUM_BLOCKS, BLOCK, enable_prefix_caching=False)
    kv2.allocate("r", len(ctx) + 2)
    kv2.allocate("o", len(other))
    ids, pos, meta = tiny.prepare(
        [
            SeqBatchEntry([*ctx, 40, 42], kv2.block_table("r"), 0),
            SeqBatchEntry(other, kv2.block_table("o"), 0),
        ]
    )
    _, ref = tiny.execute(ids, pos, meta, None)
    torch.testing.assert_close(tree_logits[[0, 1, 3]], ref[[19, 20, 21]], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tree_logits[4:], ref[22:], rtol=1e-4, atol=1e-4)


def test_medusa_accepted_paths_keep_output_lossless(plain, medusa_oracle) -> None:
    cfg = SpecConfig(method="medusa", k=3, tree=[[0], [1], [2], [0, 0], [1, 0], [1, 1], [1, 1, 0], [1, 1, 1]])
    engine = _engine(cfg)
    prompts = _prompts(engine.config.vocab_size)
    truth = {f"s{i}": w for i, w in enumerate(plain)}
    plen = {f"s{i}": len(p) for i, p in enumerate(prompts)}
    engine.proposer.propose = medusa_oracle(engine.proposer, truth, plen, engine.config.vocab_size)
    assert _greedy(engine, prompts, 24) == plain
    st = engine.spec_stats
    assert st.num_drafts > 0 and st.accepted_per_pos[0] == st.num_drafts
    assert st.acceptance_given_draft > 2  # deep paths were accepted (and their KV moved)
    assert engine.kv_manager.num_free_blocks == NUM_BLOCKS


def test_separate_draft_model_and_vocab_check(plain) -> None:
    from engine.errors import ConfigError

    cfg = SpecConfig(method="draft", k=3, draft_model="tiny", draft_weights="random", seed=5)
    engine = _engine(cfg)
    assert engine.proposer.runner.config.num_layers == engine.config.num_layers
    assert _greedy(engine, _prompts(engine.config.vocab_size)[:2], 24) == plain[:2]
    with pytest.raises(ConfigError, match="vocab_size 32000 differs"):
        _engine(SpecConfig(method="draft", k=2, draft_model="llama-68m"))
