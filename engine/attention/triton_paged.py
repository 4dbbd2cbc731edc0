"""Paged attention in Triton: reads K/V in place through the block tables (no gather into a copy).

One kernel serves every batch shape of the flattened-batch contract (engine/attention/metadata.py):
decode (1 query per sequence), speculative verify (1 + k queries, causal), prefill chunks (causal) and
Medusa trees (``tree_mask``). A program owns one (sequence, query tile, KV head, KV split):

- GQA: the query heads that share a KV head are packed into the rows of one tile, so each K/V tile is
  loaded once for the whole group; rows are ``(query token, head in group)`` pairs.
- Split-K (flash-decoding): at small batch the (sequence x KV head) grid cannot fill the GPU, so the
  KV range is cut into ``num_splits`` pieces whose partial softmax states (running max, sum, unnormalised
  output) are merged by a second small kernel. The split count is chosen on the host from
  ``meta.max_seq_len`` and the batch, but each program derives its piece from the sequence's real
  ``seq_lens`` on the device, so a CUDA graph captured with a large ``max_seq_len`` stays correct for
  any shorter context.
- Softmax runs in base 2 with the scale folded in (``exp2``), fp32 accumulation; ``-1e30`` instead of
  ``-inf`` as the initial max keeps fully masked rows (padding, empty splits) free of NaNs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from engine.attention.metadata import AttentionMetadata

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 16
_MIN_TOKENS_PER_SPLIT = 128


@triton.jit
def _paged_attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    part_o_ptr,
    part_ml_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    tree_mask_ptr,
    qk_scale,
    num_q_tiles,
    num_q_heads,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_tm_b,
    stride_tm_q,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    IS_TREE: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = pid // num_q_tiles
    q_tile = pid % num_q_tiles

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # tokens cached before this chunk

    rows = tl.arange(0, BLOCK_M)
    j = q_tile * BLOCK_Q + rows // GROUP  # query index inside the chunk
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (j < q_len)
    tok = (q_start + j).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q_pos = ctx_len + j  # causal: key n is visible to query j iff n <= q_pos

    # Keys this tile can see at all: causal tiles stop at their last query; a tree may look at any
    # node of its chunk. A tile past the chunk end gets an empty range (its stores are masked off).
    if IS_TREE:  # noqa: SIM108 - a constexpr branch reads clearer in a kernel
        kv_end = seq_len
    else:
        kv_end = tl.minimum(seq_len, ctx_len + (q_tile + 1) * BLOCK_Q)
    kv_end = kv_end * (q_tile * BLOCK_Q < q_len).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, kv_end)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        block = tl.load(table + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        in_block = n % BLOCK_SIZE
        k_off = block * stride_kb + in_block * stride_ks + kv_head * stride_kh
        k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if IS_TREE:
            rel = n - ctx_len
            node = tl.load(
                tree_mask_ptr + seq * stride_tm_b + j[:, None] * stride_tm_q + rel[None, :],
                mask=row_ok[:, None] & (rel >= 0)[None, :] & n_ok[None, :],
                other=0,
            )
            visible = ((rel < 0)[None, :] | (node != 0)) & n_ok[None, :]
        else:
            visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = block * stride_vb + in_block * stride_vs + kv_head * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.maximum(l_i, 1.0e-30)[:, None]
        tl.store(
            o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        # partials laid out [T, Hq, NUM_SPLITS, (D | 2)]
        part = (tok * num_q_heads + head) * NUM_SPLITS + split
        tl.store(
            part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :]
        )
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_o_ptr,
    part_ml_ptr,
    o_ptr,
    num_q_heads,
    stride_ot,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    part = (tok * num_q_heads + head) * NUM_SPLITS + s
    m = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=-1.0e30)
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - m_max)
    denom = tl.sum(w * l_s, 0)
    o = tl.load(
        part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0
    )
    out = tl.sum(o * w[:, None], 0) / tl.maximum(denom, 1.0e-30)
    tl.store(o_ptr + tok * stride_ot + head * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d_ok)


@functools.cache
def _num_sms(device_index: int) -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 132  # Triton interpreter on CPU: any plausible value keeps the host logic exercised


def choose_tiles(max_query_len: int, group: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_M): query tokens per tile and tile rows (tokens x heads in the GQA group).

    Decode packs just the group (padded to the 16 rows tl.dot needs); verify chunks fill 64 rows;
    Medusa trees (65 queries) and prefill chunks take 128 rows, so a tree is one pass over the KV
    instead of two (the second of which would serve a single query)."""
    rows = max_query_len * group
    rows_target = 128 if rows > 64 else 64 if rows > 16 else 16
    block_q = max(1, min(triton.next_power_of_2(max_query_len), rows_target // group))
    block_m = max(16, triton.next_power_of_2(block_q * group))
    return block_q, block_m


def choose_num_splits(
    num_programs: int, max_seq_len: int, num_sms: int, min_tokens_per_split: int = _MIN_TOKENS_PER_SPLIT
) -> int:
    """KV splits so that ~2 programs per SM run, but never pieces shorter than min_tokens_per_split."""
    if num_programs >= num_sms:
        return 1
    want = triton.cdiv(2 * num_sms, num_programs)
    by_len = max(1, triton.cdiv(max_seq_len, min_tokens_per_split))
    return max(1, min(want, by_len, _MAX_SPLITS))


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache/v_cache must both be [num_blocks, block_size, Hkv, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.shape[3] != q.shape[2] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(
            f"q heads/head_dim {tuple(q.shape[1:])} do not fit cache Hkv/head_dim {tuple(k_cache.shape[2:])}"
        )
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("q, k_cache and v_cache must be contiguous in head_dim")
    if meta.num_tokens != q.shape[0]:
        raise ValueError(f"meta has {meta.num_tokens} tokens but q has {q.shape[0]} rows")
    if meta.tree_mask is not None and meta.tree_mask.shape[1:] != (meta.max_query_len, meta.max_query_len):
        raise ValueError(
            f"tree_mask must be [B, max_query_len, max_query_len]={meta.max_query_len}, "
            f"got {tuple(meta.tree_mask.shape)}"
        )


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of q [T, Hq, D] over caches [num_blocks, block_size, Hkv, D]; returns [T, Hq, D].

    ``num_splits`` None picks split-K from the batch and ``meta.max_seq_len`` (see choose_num_splits);
    the keyword tuning knobs exist for benchmarks/engine_bench.py and need not be passed otherwise."""
    _check(q, k_cache, v_cache, meta)
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    batch = meta.num_seqs
    out = torch.empty_like(q)
    if num_tokens == 0 or batch == 0:
        return out

    block_q, block_m = choose_tiles(max(1, meta.max_query_len), group)
    num_q_tiles = triton.cdiv(max(1, meta.max_query_len), block_q)
    if num_splits is None:
        dev = q.device.index if q.device.type == "cuda" and q.device.index is not None else 0
        num_splits = choose_num_splits(batch * num_q_tiles * num_kv_heads, meta.max_seq_len, _num_sms(dev))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    block_d = triton.next_power_of_2(head_dim)
    if num_warps is None:  # 128-row tiles need 8 warps to hold the fp32 accumulator without spilling
        num_warps = 8 if block_m >= 128 else 4

    if num_splits > 1:
        part_o = torch.empty(
            num_tokens, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32
        )
        part_ml = torch.empty(num_tokens, num_heads, num_splits, 2, device=q.device, dtype=torch.float32)
    else:
        part_o = part_ml = out  # unused by the kernel when NUM_SPLITS == 1
    tree = meta.tree_mask
    is_tree = tree is not None
    if is_tree and (tree.dtype != torch.bool or not tree.is_contiguous()):
        tree = tree.to(torch.bool).contiguous()
    tree_arg = tree if is_tree else meta.seq_lens  # any tensor; never read without IS_TREE

    grid = (batch * num_q_tiles, num_kv_heads, num_splits)
    _paged_attn_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        part_o,
        part_ml,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        tree_arg,
        scale * _LOG2E,
        num_q_tiles,
        num_heads,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        meta.block_tables.stride(0),
        tree.stride(0) if is_tree else 0,
        tree.stride(1) if is_tree else 0,
        GROUP=group,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits,
        IS_TREE=is_tree,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_o,
            part_ml,
            out,
            num_heads,
            out.stride(0),
            out.stride(1),
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out
