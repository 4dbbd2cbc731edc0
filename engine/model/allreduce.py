"""The all-reduce of the tensor-parallel layers: NCCL (gloo on CPU), or a one-shot kernel for small
messages.

A decode step at batch 1 all-reduces 65 tensors of a few KiB (vicuna-7b): each costs NCCL's fixed
latency, not bandwidth. ``SPECPLAN_TP_ALLREDUCE=oneshot`` gives the group a symmetric-memory buffer and
sends messages up to ``SYMM_MEM_MAX_BYTES`` through the Triton one-shot kernels of
``engine.model.allreduce_triton`` (every rank reads its peers' buffers over NVLink; no NVLink
multicast), and fuses each row-parallel all-reduce with the residual add and RMSNorm that follow it
(``all_reduce_add_rmsnorm``: one kernel instead of an all-reduce and a norm). On 2x H200 that made the
vicuna-7b tp 2 decode step 5% faster than NCCL at batch 1 and 3% at batch 64 (benchmarks/RESULTS.md,
tensor parallel). It is opt-in, for two reasons: its barriers spin on the GPU, so a rank that dies in
the middle of a step leaves its peers spinning where NCCL's watchdog would have ended the step with an
error; and its setup across executor rebuilds in one process hung a sweep once (fixed since in
``_negotiate`` and tested on CPU, not re-run on GPUs). Both paths are captured by CUDA graphs.

``SPECPLAN_TP_ALLREDUCE`` is read by every rank (spawned ranks inherit the environment): ``nccl``
(default), ``oneshot``, or ``none`` - no communication at all, so results are WRONG; it exists only
for benchmarks, which time a step with and without its collectives to learn what they cost.

Only the first process group of a process gets symmetric memory: torch keys its symmetric-memory
state by group name, which a later group reuses after ``destroy_process_group``, and a rendezvous
then waits on the old group's store (a profiler sweep that rebuilds the executor stalled 60-120 s per
rebuild that way). Later groups use NCCL.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

MODES = ("nccl", "oneshot", "none")
SYMM_MEM_MAX_BYTES = 1 << 20  # one-shot beats NCCL's ring/tree only while latency dominates

_symm_mem_tried = False  # set by the first enable_symm_mem of this process
_symm_handles: dict[str, tuple] = {}  # group name -> (this rank's buffer, its _SymmetricMemory)


def allreduce_mode() -> str:
    mode = os.environ.get("SPECPLAN_TP_ALLREDUCE", "nccl")
    if mode not in MODES:
        raise ValueError(f"SPECPLAN_TP_ALLREDUCE must be one of {MODES}, got {mode!r}")
    return mode


def enable_symm_mem(group: dist.ProcessGroup, device: torch.device) -> bool:
    """Give ``group`` a symmetric buffer for small all-reduces (collective: every rank calls it).

    Returns False, and the group keeps using NCCL, where symmetric memory is unavailable (CPU, an
    old torch, GPUs without peer access, a process's second group); any failure here is a fallback,
    never an error."""
    if device.type != "cuda" or allreduce_mode() != "oneshot":
        return False  # the same on every rank: they share the environment and the device kind
    return _negotiate(group, device, _rendezvous)


def _negotiate(
    group: dist.ProcessGroup,
    device: torch.device,
    setup: Callable[[dist.ProcessGroup, torch.device], tuple | None],
) -> bool:
    """Set up ``setup``'s symmetric buffer on every rank or on none. Every rank runs the same
    collectives whatever its own state: rank 0 of a second executor has been through this before
    while its freshly spawned workers have not, and a rank that skipped a collective the others run
    hung a sweep (kept apart from ``enable_symm_mem`` so CPU tests can run it with gloo)."""
    global _symm_mem_tried
    name = group.group_name
    fresh = not _symm_mem_tried and name not in _symm_handles
    if not _all_ranks(fresh, group, device):
        _symm_handles.pop(name, None)  # a stale entry from an earlier group of the same name
        return False
    _symm_mem_tried = True
    try:
        entry = setup(group, device)
    except Exception:  # noqa: BLE001 - fall back to NCCL, which always works
        entry = None
    if not _all_ranks(entry is not None, group, device):  # use it only if every rank has it
        return False
    _symm_handles[name] = entry
    return True


def _rendezvous(group: dist.ProcessGroup, device: torch.device) -> tuple | None:
    """(buffer, handle) of a fresh symmetric buffer for ``group``, or None where it cannot serve."""
    import torch.distributed._symmetric_memory as symm_mem

    from engine.model import allreduce_triton  # needs Triton

    buf = symm_mem.empty(SYMM_MEM_MAX_BYTES, dtype=torch.uint8, device=device)
    handle = symm_mem.rendezvous(buf, group.group_name)
    slots_needed = group.size() * allreduce_triton.MAX_PROGRAMS * 4
    usable = handle.world_size == group.size() and slots_needed <= handle.signal_pad_size
    return (buf, handle) if usable else None


def _all_ranks(flag: bool, group: dist.ProcessGroup, device: torch.device) -> bool:
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def release_symm_mem() -> None:
    _symm_handles.clear()


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of ``x`` over the group's ranks (may be ``x`` itself, reduced in place)."""
    mode = allreduce_mode()
    if mode == "none":
        return x
    nbytes = x.numel() * x.element_size()
    symm = _symm_handles.get(group.group_name) if group is not None and mode == "oneshot" else None
    if symm is not None and nbytes <= SYMM_MEM_MAX_BYTES and x.is_contiguous():
        from engine.model.allreduce_triton import one_shot_all_reduce

        return one_shot_all_reduce(x, symm[1])
    dist.all_reduce(x, group=group)
    return x


def can_fuse_add_norm(group: dist.ProcessGroup | None, x: torch.Tensor) -> bool:
    """Whether ``x`` [T, H] (a row-parallel partial sum) can be all-reduced by the kernel that also
    adds the residual and applies RMSNorm (``SPECPLAN_TP_ALLREDUCE=oneshot``, small T)."""
    if group is None or x.dim() != 2 or allreduce_mode() != "oneshot":
        return False
    symm = _symm_handles.get(group.group_name)
    if symm is None:
        return False
    from engine.model.allreduce_triton import max_fused_rows

    return 1 <= x.shape[0] <= max_fused_rows(symm[1], x.shape[1], x.element_size(), SYMM_MEM_MAX_BYTES)


def all_reduce_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(sum over ranks of x + residual) * weight, that sum + residual) in one kernel; callers
    check ``can_fuse_add_norm`` first."""
    from engine.model.allreduce_triton import one_shot_add_rmsnorm

    return one_shot_add_rmsnorm(
        x.contiguous(), residual.contiguous(), weight, eps, _symm_handles[group.group_name][1]
    )
