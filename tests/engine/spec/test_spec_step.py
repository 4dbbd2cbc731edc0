"""Speculative decoding over the target runner and kvbm (no scheduler): lossless greedy output for
every method and k, rejection sampling's output distribution, KV-block accounting in both pools and
counter identities. Uses the random-weight ``tiny`` preset (and a 16-token-vocabulary variant), so
it runs in seconds; the real-weight lossless tests go through LLMEngine (test_spec_engine.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import kvbm
from engine.presets import resolve_model
from engine.runner import ModelRunner, SeqBatchEntry
from engine.spec import SpecConfig, SpecSequence, filtered_probs
from engine.spec.step import SpecStepRunner

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


def _plain_greedy(runner: ModelRunner, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    kv = kvbm.KVCacheManager(NUM_BLOCKS, BLOCK)
    outs = []
    for i, p in enumerate(prompts):
        sid = f"p{i}"
        kv.allocate(sid, len(p), token_ids=p)
        done = kv.num_computed_tokens(sid)
        ids, pos, meta = runner.prepare([SeqBatchEntry(p[done:], kv.block_table(sid), done)])
        _, logits = runner.execute(ids, pos, meta, runner.logits_indices(meta))
        kv.commit(sid, len(p) - done)
        toks = [int(logits[0].argmax())]
        while len(toks) < n_new:
            kv.allocate(sid, 1)
            ids, pos, meta = runner.prepare(
                [SeqBatchEntry([toks[-1]], kv.block_table(sid), len(p) + len(toks) - 1)]
            )
            _, logits = runner.execute(ids, pos, meta, None)
            kv.commit(sid, 1, token_ids=[toks[-1]])
            toks.append(int(logits[0].argmax()))
        kv.free(sid)
        outs.append(toks)
    return outs


def _spec_greedy(sr: SpecStepRunner, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    toks = {}
    for i, p in enumerate(prompts):
        toks[f"s{i}"] = list(p) + [int(sr.prefill(f"s{i}", p).argmax())]
    lens = {f"s{i}": len(p) for i, p in enumerate(prompts)}
    while live := [s for s in toks if len(toks[s]) - lens[s] < n_new]:
        for o in sr.step([SpecSequence(s, toks[s]) for s in live]):
            toks[o.seq_id].extend(o.tokens)
    return [toks[f"s{i}"][lens[f"s{i}"] :][:n_new] for i in range(len(prompts))]


CONFIGS = [
    pytest.param(lambda k: SpecConfig(method="ngram", k=k), id="ngram"),
    pytest.param(lambda k: SpecConfig(method="draft", k=k, draft_layers=1), id="draft-self1"),
    pytest.param(lambda k: SpecConfig(method="medusa", k=min(k, 4)), id="medusa"),
]


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("make", CONFIGS)
def test_greedy_is_lossless_and_frees_every_block(tiny: ModelRunner, make, k: int) -> None:
    prompts = _prompts(tiny.config.vocab_size)
    n_new = 24
    want = _plain_greedy(tiny, prompts, n_new)
    cfg = make(k)
    kv = kvbm.KVCacheManager(NUM_BLOCKS, BLOCK)
    sr = SpecStepRunner(cfg, tiny, kv)
    got = _spec_greedy(sr, prompts, n_new)
    assert got == want
    st = sr.stats
    assert st.num_decode_steps > 0
    assert st.accepted_per_pos and sum(st.accepted_per_pos) == st.num_accepted_tokens
    assert st.tokens_per_step == pytest.approx(1 + st.draft_coverage * st.acceptance_given_draft)
    for sid in [f"s{i}" for i in range(len(prompts))]:
        sr.free(sid)
    assert kv.num_free_blocks == NUM_BLOCKS
    if cfg.method == "draft":
        assert sr.proposer.kv.num_free_blocks == sr.proposer.kv.num_blocks
    if cfg.method == "ngram":
        assert st.num_drafts > 0  # the repeated prompts do give prompt lookup matches


def test_emitted_tokens_equal_steps_plus_accepted(tiny: ModelRunner) -> None:
    kv = kvbm.KVCacheManager(NUM_BLOCKS, BLOCK)
    sr = SpecStepRunner(SpecConfig(method="ngram", k=4), tiny, kv)
    prompts = _prompts(tiny.config.vocab_size)
    toks = {f"s{i}": list(p) + [int(sr.prefill(f"s{i}", p).argmax())] for i, p in enumerate(prompts)}
    emitted = 0
    for _ in range(6):
        outs = sr.step([SpecSequence(s, t) for s, t in toks.items()])
        for o in outs:
            toks[o.seq_id].extend(o.tokens)
            emitted += len(o.tokens)
            assert len(o.tokens) == o.num_accepted + 1 and o.num_accepted <= o.num_draft_tokens
    assert emitted == sr.stats.num_decode_steps + sr.stats.num_accepted_tokens
    assert sr.stats.num_decode_steps == 6 * len(prompts)
    # the target pool holds exactly the committed tokens (lookahead released after each commit)
    for s, t in toks.items():
        assert kv.num_computed_tokens(s) == len(t) - 1
        assert len(kv.block_table(s)) == -(-(len(t) - 1) // BLOCK)


def test_draft_pool_rolls_back_rejected_drafts(tiny: ModelRunner) -> None:
    kv = kvbm.KVCacheManager(NUM_BLOCKS, BLOCK)
    sr = SpecStepRunner(SpecConfig(method="draft", k=4, draft_layers=1), tiny, kv)
    prompt = _prompts(tiny.config.vocab_size)[1]
    toks = list(prompt) + [int(sr.prefill("a", prompt).argmax())]
    dkv = sr.proposer.kv
    for _ in range(5):
        (o,) = sr.step([SpecSequence("a", toks)])
        # drafter KV covers the catch-up plus the accepted drafts it fed, never a rejected one
        assert dkv.num_computed_tokens("a") == len(toks) + min(o.num_accepted, o.num_draft_tokens - 1)
        assert len(dkv.block_table("a")) == -(-dkv.num_computed_tokens("a") // BLOCK)
        toks.extend(o.tokens)
    sr.free("a")
    assert dkv.num_free_blocks == dkv.num_blocks and kv.num_free_blocks == NUM_BLOCKS


@pytest.mark.slow
def test_draft_rejection_sampling_matches_target_distribution() -> None:
    """Chi-square over the first two emitted tokens: speculative sampling (k=2, a 1-layer drafter,
    temperature 1, top-p 0.9) vs the target's exact joint distribution, on a 16-token vocabulary."""
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

    kv = kvbm.KVCacheManager(512, BLOCK)
    sr = SpecStepRunner(SpecConfig(method="draft", k=2, draft_layers=1, seed=1), runner, kv)
    counts = np.zeros((16, 16))
    n, batch = 3000, 250
    drafts_seen = 0
    for b0 in range(0, n, batch):
        live = {}
        for j in range(b0, b0 + batch):
            sr.prefill(f"r{j}", prompt[:-1])
            g = torch.Generator().manual_seed(10_000 + j)
            live[f"r{j}"] = SpecSequence(f"r{j}", list(prompt), temperature=temp, top_p=top_p, generator=g)
        out = {s: [] for s in live}
        while pending := [s for s in live.values() if len(out[s.seq_id]) < 2]:
            for o in sr.step(pending):
                out[o.seq_id].extend(o.tokens)
                live[o.seq_id].token_ids = [*live[o.seq_id].token_ids, *o.tokens]
                drafts_seen += o.num_draft_tokens
        for s, toks in out.items():
            counts[toks[0], toks[1]] += 1
            sr.free(s)
    assert drafts_seen > 0
    expected = joint.ravel() / joint.sum() * n
    obs = counts.ravel()
    assert obs[expected == 0].sum() == 0  # nothing outside the target's top-p support
    keep = expected >= 5
    f_obs = np.append(obs[keep], obs[~keep].sum())
    f_exp = np.append(expected[keep], expected[~keep].sum())
    f_exp *= f_obs.sum() / f_exp.sum()
    assert chisquare(f_obs, f_exp).pvalue > 1e-3
    assert kv.num_free_blocks == 512


@pytest.mark.parametrize(
    "cfg",
    [
        SpecConfig(method="ngram", k=4),
        SpecConfig(method="draft", k=3, draft_layers=1),
        SpecConfig(method="medusa", k=2, tree=[[0], [1], [0, 0], [0, 1], [1, 0]]),
    ],
    ids=["ngram", "draft", "medusa"],
)
def test_profiling_phases_verify_full_width(tiny: ModelRunner, cfg: SpecConfig) -> None:
    """The profiler's path: context filled without a prefill, then draft and verify phases; with
    pad_drafts every step verifies exactly k drafts (the whole tree for Medusa)."""
    kv = kvbm.KVCacheManager(NUM_BLOCKS, BLOCK)
    sr = SpecStepRunner(cfg, tiny, kv, pad_drafts=True)
    rng = np.random.default_rng(1)
    ctx = {f"c{i}": rng.integers(0, 250, size=40).tolist() for i in range(3)}
    seqs = sr.fill_context(ctx)
    assert all(kv.num_computed_tokens(s) == 39 for s in ctx)
    width = cfg.num_lookahead_tokens
    for _ in range(3):
        drafts = sr.draft(seqs)
        assert [len(d) for d in drafts] == [width] * 3
        outs = sr.verify(seqs, drafts)
        for s, o in zip(seqs, outs, strict=True):
            s.token_ids = [*s.token_ids, *o.tokens]
            assert kv.num_computed_tokens(s.seq_id) == len(s.token_ids) - 1
    assert sr.stats.num_drafts == sr.stats.num_decode_steps == 9
    for s in ctx:
        sr.free(s)
    assert kv.num_free_blocks == NUM_BLOCKS


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


def test_medusa_accepted_paths_keep_output_lossless(tiny: ModelRunner, medusa_oracle) -> None:
    prompts = _prompts(tiny.config.vocab_size)
    n_new = 24
    want = _plain_greedy(tiny, prompts, n_new)
    kv = kvbm.KVCacheManager(NUM_BLOCKS, BLOCK)
    cfg = SpecConfig(method="medusa", k=3, tree=[[0], [1], [2], [0, 0], [1, 0], [1, 1], [1, 1, 0], [1, 1, 1]])
    sr = SpecStepRunner(cfg, tiny, kv)
    truth = {f"s{i}": w for i, w in enumerate(want)}
    plen = {f"s{i}": len(p) for i, p in enumerate(prompts)}
    sr.medusa.propose = medusa_oracle(sr.medusa, truth, plen, tiny.config.vocab_size)
    got = _spec_greedy(sr, prompts, n_new)
    assert got == want
    st = sr.stats
    assert st.num_drafts > 0 and st.accepted_per_pos[0] == st.num_drafts
    assert st.acceptance_given_draft > 2  # deep paths were accepted (and their KV moved)
    for s in truth:
        sr.free(s)
    assert kv.num_free_blocks == NUM_BLOCKS


def test_separate_draft_model_and_vocab_check(tiny: ModelRunner) -> None:
    from engine.errors import ConfigError

    prompts = _prompts(tiny.config.vocab_size)[:2]
    want = _plain_greedy(tiny, prompts, 12)
    kv = kvbm.KVCacheManager(NUM_BLOCKS, BLOCK)
    cfg = SpecConfig(method="draft", k=3, draft_model="tiny", draft_weights="random", seed=5)
    sr = SpecStepRunner(cfg, tiny, kv)
    assert sr.proposer.runner.config.num_layers == tiny.config.num_layers
    assert _spec_greedy(sr, prompts, 12) == want
    with pytest.raises(ConfigError, match="vocab_size 32000 differs"):
        SpecStepRunner(SpecConfig(method="draft", k=2, draft_model="llama-68m"), tiny, kv)
