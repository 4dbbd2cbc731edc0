"""The all-reduce of the tensor-parallel layers, with a low-latency path for small messages.

A decode step at batch 1 all-reduces 65 tensors of a few KiB (vicuna-7b): each costs NCCL's fixed
latency, not bandwidth. On CUDA, ``enable_symm_mem`` gives a group a symmetric-memory buffer, and
messages up to ``SYMM_MEM_MAX_BYTES`` then go through PyTorch's one-shot all-reduce (every rank reads
its peers' buffers over NVLink in one kernel; no NVLink multicast needed); larger ones, CPU (gloo) and
groups without the buffer use ``dist.all_reduce``. Both are captured by CUDA graphs.

``SPECPLAN_TP_ALLREDUCE`` picks the path for every rank (spawned ranks inherit the environment):
``auto`` (default: symmetric memory where it was set up), ``nccl`` (always ``dist.all_reduce``), or
``none`` - no communication at all, so results are WRONG; it exists only for benchmarks, which time a
step with and without its collectives to learn what the collectives cost.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

MODES = ("auto", "nccl", "none")
SYMM_MEM_MAX_BYTES = 1 << 20  # one-shot beats NCCL's ring/tree only while latency dominates

_symm_buffers: dict[str, torch.Tensor] = {}  # group name -> this rank's symmetric buffer (bytes)


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
    if name in _symm_buffers:
        return True
    try:
        import torch.distributed._symmetric_memory as symm_mem

        if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out"):
            return False
        with contextlib.suppress(Exception):  # older torch needs this; newer ones deprecate it
            symm_mem.enable_symm_mem_for_group(name)
        buf = symm_mem.empty(SYMM_MEM_MAX_BYTES, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(buf, name)
    except Exception:  # noqa: BLE001 - fall back to NCCL, which always works
        return False
    ok = torch.tensor([1], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)  # use it only if every rank has it
    if int(ok.item()) == 1:
        _symm_buffers[name] = buf
    return name in _symm_buffers


def release_symm_mem() -> None:
    _symm_buffers.clear()


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of ``x`` over the group's ranks (may be ``x`` itself, reduced in place)."""
    mode = allreduce_mode()
    if mode == "none":
        return x
    nbytes = x.numel() * x.element_size()
    buf = _symm_buffers.get(group.group_name) if group is not None and mode == "auto" else None
    if buf is not None and nbytes <= SYMM_MEM_MAX_BYTES and x.is_contiguous():
        staged = buf[:nbytes].view(x.dtype).view(x.shape)
        staged.copy_(x)
        out = torch.empty_like(x)
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", group.group_name, out)
        return out
    dist.all_reduce(x, group=group)
    return x
