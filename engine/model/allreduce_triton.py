"""One-shot all-reduce over symmetric memory, in Triton, for the small messages of a decode step, and
the same fused with the residual add and RMSNorm that follow every row-parallel projection.

Every rank copies its input into its own symmetric buffer, meets its peers at a barrier, then sums
all ranks' buffers (read over NVLink) into its output, in rank order, so every rank gets the same
bits. A second barrier keeps any rank from overwriting its buffer (the next all-reduce) while a peer
still reads it. Barriers are per program: program ``pid`` of every rank covers the same elements and
signals the same slots, ``pid * world + sender``, of each receiver's signal pad (flag 0 -> 1 by the
sender with release semantics, 1 -> 0 by the receiver with acquire semantics, both system-scope).

Why not PyTorch's ``symm_mem.one_shot_all_reduce``: in torch 2.11 it has no float16 kernel, and
float16 is what most checkpoints serve in. No NVLink multicast is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # elements per program per iteration
MAX_PROGRAMS = 32  # one signal slot per (program, peer): 32 * 8 ranks stays within a 9 KiB pad


@triton.jit
def _barrier(sig_ptrs, rank, pid, WORLD: tl.constexpr):
    tl.debug_barrier()  # this program's stores happen before its signal
    for p in tl.static_range(WORLD):
        remote = tl.load(sig_ptrs + p).to(tl.pointer_type(tl.int32))
        while tl.atomic_cas(remote + pid * WORLD + rank, 0, 1, sem="release", scope="sys") != 0:
            pass
    local = tl.load(sig_ptrs + rank).to(tl.pointer_type(tl.int32))
    for p in tl.static_range(WORLD):
        while tl.atomic_cas(local + pid * WORLD + p, 1, 0, sem="acquire", scope="sys") != 1:
            pass
    tl.debug_barrier()  # every thread's loads happen after the peers' signals


@triton.jit
def _one_shot_kernel(
    x_ptr, out_ptr, buf_ptrs, sig_ptrs, numel, rank, WORLD: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    buf_ptrs = buf_ptrs.to(tl.pointer_type(tl.uint64))
    sig_ptrs = sig_ptrs.to(tl.pointer_type(tl.uint64))
    dtype = x_ptr.dtype.element_ty
    mine = tl.multiple_of(tl.load(buf_ptrs + rank).to(tl.pointer_type(dtype)), 16)
    for start in range(pid * BLOCK, numel, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        tl.store(mine + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    _barrier(sig_ptrs, rank, pid, WORLD)
    for start in range(pid * BLOCK, numel, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):
            peer = tl.multiple_of(tl.load(buf_ptrs + p).to(tl.pointer_type(dtype)), 16)
            acc += tl.load(peer + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(out_ptr + offs, acc.to(dtype), mask=mask)
    _barrier(sig_ptrs, rank, pid, WORLD)


def one_shot_all_reduce(x: torch.Tensor, handle) -> torch.Tensor:  # noqa: ANN001 - a _SymmetricMemory
    """Sum of the contiguous ``x`` over the ranks of ``handle`` (its buffer must hold ``x``)."""
    out = torch.empty_like(x)
    numel = x.numel()
    programs = max(1, min(MAX_PROGRAMS, triton.cdiv(numel, BLOCK)))
    _one_shot_kernel[(programs,)](
        x,
        out,
        handle.buffer_ptrs_dev,
        handle.signal_pad_ptrs_dev,
        numel,
        handle.rank,
        WORLD=handle.world_size,
        BLOCK=BLOCK,
        num_warps=8,
    )
    return out


@triton.jit
def _one_shot_add_rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    buf_ptrs,
    sig_ptrs,
    n_cols,
    eps,
    rank,
    WORLD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One token row per program: all-reduce the row, add the residual, RMSNorm, in one launch."""
    row = tl.program_id(0)
    buf_ptrs = buf_ptrs.to(tl.pointer_type(tl.uint64))
    sig_ptrs = sig_ptrs.to(tl.pointer_type(tl.uint64))
    dtype = x_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row.to(tl.int64) * n_cols + cols
    mine = tl.multiple_of(tl.load(buf_ptrs + rank).to(tl.pointer_type(dtype)), 16)
    tl.store(mine + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    _barrier(sig_ptrs, rank, row, WORLD)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in tl.static_range(WORLD):
        peer = tl.multiple_of(tl.load(buf_ptrs + p).to(tl.pointer_type(dtype)), 16)
        acc += tl.load(peer + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    _barrier(sig_ptrs, rank, row, WORLD)  # peers are done reading this row of our buffer
    # the same roundings as all_reduce() followed by fused_add_rmsnorm: sum, then residual sum, in
    # the activation dtype; statistics in float32; normalised value rounded before the weight
    reduced = acc.to(dtype)
    r = tl.load(res_ptr + offs, mask=mask, other=0.0)
    h = (reduced.to(tl.float32) + r.to(tl.float32)).to(dtype)
    tl.store(res_out_ptr + offs, h, mask=mask)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / n_cols
    normed = (hf * tl.math.rsqrt(var + eps)).to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def max_fused_rows(handle, hidden: int, element_size: int, buffer_bytes: int) -> int:  # noqa: ANN001
    """Rows ``one_shot_add_rmsnorm`` can take: its buffer and one signal slot per (row, peer)."""
    return min(buffer_bytes // (hidden * element_size), handle.signal_pad_size // (4 * handle.world_size))


def one_shot_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    handle,  # noqa: ANN001
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(allreduce(x) + residual) * weight, allreduce(x) + residual) for contiguous [T, H]."""
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty_like(x)
    block = triton.next_power_of_2(n)
    _one_shot_add_rmsnorm_kernel[(rows,)](
        x,
        residual,
        weight,
        out,
        res_out,
        handle.buffer_ptrs_dev,
        handle.signal_pad_ptrs_dev,
        n,
        eps,
        handle.rank,
        WORLD=handle.world_size,
        BLOCK=block,
        num_warps=max(1, min(16, block // 256)),
    )
    return out, res_out
