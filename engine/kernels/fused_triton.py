"""Fused Triton kernels for the Llama decode path: one launch each instead of ~5-15 eager ops.

- ``fused_add_rmsnorm``: residual add + RMSNorm, one program per token row.
- ``silu_and_mul``: SiLU(gate) * up, one program per (row, column tile).
- ``rope_and_write_kv``: rotate_half RoPE of q and k plus the K/V cache store, one program per token.

Rounding follows the eager model (see reference.py) wherever it is free: the residual sum and the
normalised value are rounded to the activation dtype before the next step uses them, statistics and
the SiLU are float32. RoPE is computed wholly in float32 and rounded once (the eager path rounds the
tables and each product to the activation dtype), so it is slightly *more* precise than eager.
Every launch is shape-only (no host syncs, no data-dependent allocation), so it is CUDA-graph
capturable. Tensors must have a unit stride in their last dimension; row/head strides are passed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _num_warps(block: int) -> int:
    """About 8 elements per thread, 1..16 warps."""
    return max(1, min(16, block // 256))


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    n_cols,
    eps,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # round the sum to the activation dtype, as the eager add does, before taking statistics
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.math.rsqrt(var + eps)).to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual) for x [T, H]; with no residual, (.., x).
    Fresh outputs, inputs untouched (callers such as drafters may still hold them)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    # weight * normed promotes like the eager op (fp32 weight on fp16 activations gives fp32)
    out = torch.empty((rows, n), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is None:
        res2 = res_out = x2
    else:
        res2 = residual.reshape(-1, n)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        res_out = torch.empty_like(x2)
    if rows:
        block = triton.next_power_of_2(n)
        _add_rmsnorm_kernel[(rows,)](
            x2,
            res2,
            weight,
            out,
            res_out,
            n,
            eps,
            x2.stride(0),
            res2.stride(0),
            out.stride(0),
            res_out.stride(0),
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    return out.view(x.shape), x if residual is None else res_out.view(x.shape)


@triton.jit
def _silu_and_mul_kernel(
    in_ptr,
    out_ptr,
    n_cols,
    stride_in,
    stride_out,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(in_ptr + row * stride_in + cols, mask=mask, other=0.0)
    u = tl.load(in_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0)
    dtype = g.dtype
    gf = g.to(tl.float32)
    # F.silu rounds to the activation dtype before the multiply; so do we
    s = (gf / (1.0 + tl.exp(-gf))).to(dtype)
    y = s.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate first, then up) -> silu(gate) * up [T, I]."""
    two_i = gate_up.shape[-1]
    n = two_i // 2
    x2 = gate_up.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
            x2, out, n, x2.stride(0), out.stride(0), BLOCK=block, num_warps=_num_warps(block)
        )
    return out.view(*gate_up.shape[:-1], n)


@triton.jit
def _rope_kv_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    num_q_heads,
    num_kv_heads,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_tab,
    stride_kcs,
    stride_kch,
    stride_vcs,
    stride_vch,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    # emb = cat(freqs, freqs): both halves of the table are read, so any table layout is honoured
    tab = cos_ptr + pos * stride_tab
    cos1 = tl.load(tab + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(tab + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    tab = sin_ptr + pos * stride_tab
    sin1 = tl.load(tab + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(tab + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]

    # q: out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1); rotated in place
    hq = tl.arange(0, BLOCK_HQ)
    m = (hq < num_q_heads)[:, None] & d_mask[None, :]
    p1 = q_ptr + tok * stride_qt + hq[:, None] * stride_qh + d[None, :]
    x1 = tl.load(p1, mask=m, other=0.0)
    x2 = tl.load(p1 + HALF, mask=m, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(p1, (x1f * cos1 - x2f * sin1).to(x1.dtype), mask=m)
    tl.store(p1 + HALF, (x2f * cos2 + x1f * sin2).to(x1.dtype), mask=m)

    # k: rotate, then store straight into the cache slot (the rotated k is not needed elsewhere)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    hk = tl.arange(0, BLOCK_HKV)
    m = (hk < num_kv_heads)[:, None] & d_mask[None, :] & (slot >= 0)
    p1 = k_ptr + tok * stride_kt + hk[:, None] * stride_kh + d[None, :]
    x1 = tl.load(p1, mask=m, other=0.0)
    x2 = tl.load(p1 + HALF, mask=m, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    c1 = kc_ptr + slot * stride_kcs + hk[:, None] * stride_kch + d[None, :]
    cdt = kc_ptr.dtype.element_ty
    tl.store(c1, (x1f * cos1 - x2f * sin1).to(x1.dtype).to(cdt), mask=m)
    tl.store(c1 + HALF, (x2f * cos2 + x1f * sin2).to(x1.dtype).to(cdt), mask=m)

    # v: plain copy (two halves, so one mask serves every tensor)
    p1 = v_ptr + tok * stride_vt + hk[:, None] * stride_vh + d[None, :]
    c1 = vc_ptr + slot * stride_vcs + hk[:, None] * stride_vch + d[None, :]
    vdt = vc_ptr.dtype.element_ty
    tl.store(c1, tl.load(p1, mask=m, other=0.0).to(vdt), mask=m)
    tl.store(c1 + HALF, tl.load(p1 + HALF, mask=m, other=0.0).to(vdt), mask=m)


def rope_and_write_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate q [T, Hq, D] (in place) and k [T, Hkv, D], store k/v at ``slot_mapping`` of the caches
    [num_blocks, block_size, Hkv, D] (slots < 0 are skipped); returns q."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    if d % 2:
        raise ValueError(f"rope needs an even head_dim, got {d}")
    for name, x in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dimension")
    if cos_table.stride() != sin_table.stride() or cos_table.stride(-1) != 1:
        raise ValueError("cos/sin tables must share a layout with a unit last stride")
    kc = k_cache.view(-1, hkv, d)
    vc = v_cache.view(-1, hkv, d)
    if t:
        half = d // 2
        _rope_kv_kernel[(t,)](
            positions,
            q,
            k,
            v,
            cos_table,
            sin_table,
            kc,
            vc,
            slot_mapping,
            hq,
            hkv,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            cos_table.stride(0),
            kc.stride(0),
            kc.stride(1),
            vc.stride(0),
            vc.stride(1),
            HALF=half,
            BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_HQ=triton.next_power_of_2(hq),
            BLOCK_HKV=triton.next_power_of_2(hkv),
            num_warps=4,
        )
    return q
