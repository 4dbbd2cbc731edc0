"""The all-reduce of the tensor-parallel layers, with a low-latency path for small messages.

A decode step at batch 1 all-reduces 65 tensors of a few KiB (vicuna-7b): each costs NCCL's fixed
latency (~12 us on 2x H200), not bandwidth. On CUDA, ``enable_symm_mem`` gives a group a symmetric-memory
buffer, and messages up to ``SYMM_MEM_MAX_BYTES`` then go through the Triton one-shot all-reduce of
``engine.model.allreduce_triton`` (every rank reads its peers' buffers over NVLink in one kernel; no
NVLink multicast); larger ones, CPU (gloo) and groups without the buffer use ``dist.all_reduce``. Both
are captured by CUDA graphs.

``SPECPLAN_TP_ALLREDUCE`` picks the path for every rank (spawned ranks inherit the environment):
``auto`` (default: the one-shot kernel where it was set up), ``nccl`` (always ``dist.all_reduce``), or
``none`` - no communication at all, so results are WRONG; it exists only for benchmarks, which time a
step with and without its collectives to learn what the collectives cost.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

MODES = ("auto", "nccl", "none")
SYMM_MEM_MAX_BYTES = 1 << 20  # one-shot beats NCCL's ring/tree only while latency dominates

_symm_handles: dict[str, tuple] = {}  # group name -> (this rank's buffer, its _SymmetricMemory)


def allreduce_mode() -> str:
    mode = os.environ.get("SPECPLAN_TP_ALLREDUCE", "auto")
    if mode not in MODES:
        raise ValueError(f"SPECPLAN_TP_ALLREDUCE must be one of {MODES}, got {mode!r}")
    return mode


def enable_symm_mem(group: dist.ProcessGroup, device: torch.device) -> bool:
    """Give ``group`` a symmetric buffer for small all-reduces (collective: every rank calls it).

    Returns False, and the group keeps using NCCL, where symmetric memory is unavailable (CPU, an
    old torch, GPUs without peer access); any failure here is a fallback, never an error."""
    if device.type != "cuda" or allreduce_mode() != "auto":
        return False
    name = group.group_name
    if name in _symm_handles:
        return True
    try:
        import torch.distributed._symmetric_memory as symm_mem

        from engine.model import allreduce_triton  # noqa: F401 - needs Triton

        buf = symm_mem.empty(SYMM_MEM_MAX_BYTES, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(buf, name)
        usable = handle.world_size == group.size() and group.size() * allreduce_triton.MAX_PROGRAMS * 4 <= (
            handle.signal_pad_size
        )
    except Exception:  # noqa: BLE001 - fall back to NCCL, which always works
        usable = False
    ok = torch.tensor([int(usable)], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)  # use it only if every rank has it
    if int(ok.item()) == 1:
        _symm_handles[name] = (buf, handle)
    return name in _symm_handles


def release_symm_mem() -> None:
    _symm_handles.clear()


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of ``x`` over the group's ranks (may be ``x`` itself, reduced in place)."""
    mode = allreduce_mode()
    if mode == "none":
        return x
    nbytes = x.numel() * x.element_size()
    symm = _symm_handles.get(group.group_name) if group is not None and mode == "auto" else None
    if symm is not None and nbytes <= SYMM_MEM_MAX_BYTES and x.is_contiguous():
        from engine.model.allreduce_triton import one_shot_all_reduce

        return one_shot_all_reduce(x, symm[1])
    dist.all_reduce(x, group=group)
    return x
