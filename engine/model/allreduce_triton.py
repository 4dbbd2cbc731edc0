"""One-shot all-reduce over symmetric memory, in Triton, for the small messages of a decode step.

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
