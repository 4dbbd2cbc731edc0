"""Reference paged attention against a dense per-sequence computation on random paged layouts."""

from __future__ import annotations

import torch

from engine.attention import paged_attention, write_kv
from engine.attention.metadata import AttentionMetadata


def _layout(ctx_lens, q_lens, block_size, num_blocks, gen):
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for c, q in zip(ctx_lens, q_lens, strict=True):
        n = -(-(c + q) // block_size)
        table = [perm.pop() for _ in range(n)]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(c + q)]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return tables, bt


def _dense(q, k, v, mask, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _run(ctx_lens, q_lens, tree=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bs, nb, hq, hkv, d = 4, 64, 4, 2, 8
    tables, bt = _layout(ctx_lens, q_lens, bs, nb, gen)
    k_cache = torch.zeros(nb, bs, hkv, d)
    v_cache = torch.zeros(nb, bs, hkv, d)
    full_k = [torch.randn(c + q, hkv, d, generator=gen) for c, q in zip(ctx_lens, q_lens, strict=True)]
    full_v = [torch.randn(c + q, hkv, d, generator=gen) for c, q in zip(ctx_lens, q_lens, strict=True)]
    # context KV already in the cache; this step's KV written by write_kv
    step_k, step_v, step_slots = [], [], []
    for i, (c, q) in enumerate(zip(ctx_lens, q_lens, strict=True)):
        for p in range(c + q):
            slot = tables[i][p // bs] * bs + p % bs
            if p < c:
                k_cache.view(-1, hkv, d)[slot] = full_k[i][p]
                v_cache.view(-1, hkv, d)[slot] = full_v[i][p]
            else:
                step_slots.append(slot)
        step_k.append(full_k[i][c:])
        step_v.append(full_v[i][c:])
    write_kv(k_cache, v_cache, torch.cat(step_k), torch.cat(step_v), torch.tensor(step_slots))
    q = torch.randn(sum(q_lens), hq, d, generator=gen)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([c + q for c, q in zip(ctx_lens, q_lens, strict=True)], dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(step_slots),
        query_start_loc=starts,
        seq_lens=seq_lens,
        block_tables=bt,
        max_query_len=max(q_lens),
        max_seq_len=int(seq_lens.max()),
        tree_mask=tree,
    )
    out = paged_attention(q, k_cache, v_cache, meta, 0.3, backend="torch")
    for i, (c, ql) in enumerate(zip(ctx_lens, q_lens, strict=True)):
        mask = torch.zeros(ql, c + ql, dtype=torch.bool)
        mask[:, :c] = True
        if tree is None:
            mask[:, c:] = torch.ones(ql, ql).tril().bool()
        else:
            mask[:, c:] = tree[i, :ql, :ql]
        ref = _dense(q[starts[i] : starts[i + 1]], full_k[i], full_v[i], mask, 0.3)
        torch.testing.assert_close(out[starts[i] : starts[i + 1]], ref, atol=1e-5, rtol=1e-5)


def test_mixed_prefill_and_decode_batch():
    _run([0, 7, 13, 3], [9, 1, 1, 5])


def test_decode_only_batch():
    _run([1, 5, 16, 30], [1, 1, 1, 1], seed=1)


def test_tree_mask_is_honoured():
    # two sequences with a 4-token candidate tree: root, two children of root, one grandchild
    tm = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    tree = torch.stack([tm, tm])
    _run([6, 11], [4, 4], tree=tree, seed=2)


def test_write_kv_places_tokens_at_slots():
    k_cache = torch.zeros(3, 2, 1, 2)
    v_cache = torch.zeros(3, 2, 1, 2)
    k = torch.arange(6.0).view(3, 1, 2)
    write_kv(k_cache, v_cache, k, -k, torch.tensor([5, 0, 2]))
    assert torch.equal(k_cache[2, 1, 0], k[0, 0])
    assert torch.equal(k_cache[0, 0, 0], k[1, 0])
    assert torch.equal(v_cache[1, 0, 0], -k[2, 0])
