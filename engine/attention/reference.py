"""Reference paged attention in plain PyTorch (CPU tests, and the oracle GPU kernels are checked
against). It gathers each sequence's blocks into a padded batch and runs one masked SDPA call, so
it is exact and reasonably quick on CPU, but it copies the cache: the GPU path must not."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata


def build_mask(meta: AttentionMetadata, max_kv: int) -> torch.Tensor:
    """[B, max_query_len, max_kv] bool: which cached key each (padded) query row may see."""
    device = meta.seq_lens.device
    seq_lens = meta.seq_lens.long()
    q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
    ctx = seq_lens - q_lens  # tokens cached before this chunk
    j = torch.arange(meta.max_query_len, device=device)
    s = torch.arange(max_kv, device=device)
    key_pos = s.view(1, 1, -1)
    if meta.tree_mask is None:
        limit = ctx.view(-1, 1, 1) + j.view(1, -1, 1)  # causal: sees positions <= ctx + j
        mask = key_pos <= limit
    else:
        rel = key_pos - ctx.view(-1, 1, 1)  # index of the key inside this chunk (negative = context)
        in_chunk = (rel >= 0) & (rel < meta.max_query_len)
        tm = meta.tree_mask.to(device=device, dtype=torch.bool)
        tree_ok = torch.gather(
            tm, 2, rel.clamp(0, meta.max_query_len - 1).expand(tm.shape[0], tm.shape[1], -1)
        )
        mask = (rel < 0) | (in_chunk & tree_ok)
    return mask & (key_pos < seq_lens.view(-1, 1, 1))


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D]; caches [num_blocks, block_size, Hkv, D]; returns [T, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    batch = meta.num_seqs
    blocks = -(-meta.max_seq_len // block_size)
    table = meta.block_tables[:, :blocks].long()
    # [B, blocks, bs, Hkv, D] -> [B, Hkv, S, D]
    k = k_cache[table].reshape(batch, blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache[table].reshape(batch, blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)

    # scatter the flattened queries into [B, max_q, Hq, D]
    starts = meta.query_start_loc.long()
    q_lens = starts[1:] - starts[:-1]
    seq_idx = torch.repeat_interleave(torch.arange(batch, device=q.device), q_lens, output_size=num_tokens)
    row = torch.arange(num_tokens, device=q.device) - starts[seq_idx]
    qp = q.new_zeros(batch, meta.max_query_len, num_heads, head_dim)
    qp[seq_idx, row] = q
    mask = build_mask(meta, blocks * block_size)
    # padded query rows see key 0 only so softmax stays finite; their output is discarded
    mask[:, :, 0] |= ~mask.any(-1)
    # enable_gqa: query head h reads KV head h // (Hq / Hkv) without materialising repeated K/V
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2),
        k,
        v,
        attn_mask=mask.unsqueeze(1),
        scale=scale,
        enable_gqa=num_kv_heads != num_heads,
    )
    return out.transpose(1, 2)[seq_idx, row]
