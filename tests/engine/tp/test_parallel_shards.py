"""The shards of the tensor-parallel layers recombine into the full layer (no processes: the
collectives are replayed by hand as sums and concatenations over the rank objects)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)

torch.manual_seed(0)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_fused_column_parallel_recombines_each_part(tp):
    sizes = [12, 24, 24]
    full = [torch.randn(s, 16) for s in sizes]
    x = torch.randn(5, 16)
    ranks = [ColumnParallelLinear(16, sizes, tp_rank=r, tp_size=tp) for r in range(tp)]
    for layer in ranks:
        for part, w in enumerate(full):
            layer.load_shard(part, w)
    outs = [layer(x).split(layer.shard_sizes, dim=-1) for layer in ranks]
    for part, w in enumerate(full):  # each rank holds [q_r, k_r, v_r]; concatenating part i over ranks
        got = torch.cat([o[part] for o in outs], dim=-1)  # gives the full part i
        torch.testing.assert_close(got, F.linear(x, w))


def test_replicated_kv_part_keeps_the_rank_head():
    """4 ranks, 2 KV heads of size 8: ranks 0-1 hold head 0, ranks 2-3 head 1."""
    k_full = torch.randn(16, 16)
    x = torch.randn(3, 16)
    for r in range(4):
        layer = ColumnParallelLinear(16, [32, 8], tp_rank=r, tp_size=4, replicate=[False, True])
        layer.load_shard(1, k_full, start=(r * 2 // 4) * 8)
        head = r * 2 // 4
        torch.testing.assert_close(layer(x)[:, 8:], F.linear(x, k_full[head * 8 : head * 8 + 8]))


@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_partial_sums_add_up(tp):
    w = torch.randn(10, 24)
    x = torch.randn(4, 24)
    ranks = [RowParallelLinear(24, 10, tp_rank=r, tp_size=tp) for r in range(tp)]
    partial = []
    for r, layer in enumerate(ranks):
        layer.load_shard(w)
        xs = x[:, r * layer.in_shard : (r + 1) * layer.in_shard]
        partial.append(F.linear(xs, layer.weight))  # what forward computes before its all-reduce
    torch.testing.assert_close(sum(partial), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp", [2, 3])
def test_vocab_parallel_embedding_and_head_with_padding(tp):
    vocab, hidden = 10, 6  # 10 is not divisible by 3: the last shard is padded with zero rows
    table = torch.randn(vocab, hidden)
    ids = torch.tensor([0, 3, 9, 4, 7])
    h = torch.randn(2, hidden)
    emb_sum = torch.zeros(len(ids), hidden)
    logits = []
    for r in range(tp):
        emb = VocabParallelEmbedding(vocab, hidden, tp_rank=r, tp_size=tp)
        emb.load_shard(table)
        local = ids - emb.vocab_start
        mine = (local >= 0) & (local < emb.shard)
        emb_sum += F.embedding(local.clamp(0, emb.shard - 1), emb.weight) * mine.unsqueeze(-1)
        head = ParallelLMHead(vocab, hidden, tp_rank=r, tp_size=tp)
        head.load_shard(table)
        logits.append(F.linear(h, head.weight))
    torch.testing.assert_close(emb_sum, table[ids])
    torch.testing.assert_close(torch.cat(logits, dim=-1)[:, :vocab], F.linear(h, table))


def test_uneven_split_is_refused_with_the_sizes():
    with pytest.raises(ValueError, match="output size=10 is not divisible by tp_size=3"):
        ColumnParallelLinear(4, [10], tp_rank=0, tp_size=3)
    with pytest.raises(ValueError, match="input size=10 is not divisible by tp_size=4"):
        RowParallelLinear(10, 4, tp_rank=0, tp_size=4)
