"""Fused elementwise ops of the Llama layer: residual add + RMSNorm, SiLU * mul, RoPE + K/V store.

Eager PyTorch spends ~1,150 tiny kernels per decode step on these (vicuna-7b); the Triton versions in
``fused_triton.py`` make a layer about ten kernels. Dispatch: Triton for CUDA tensors when Triton
imports and ``SPECPLAN_FUSED_KERNELS`` is not ``0``; otherwise ``reference.py``, which is exactly the
eager math the model always used (so CPU results are bit-identical to the unfused model).

The choice is made once per process (``fused_enabled``); after changing the environment variable call
``fused_enabled.cache_clear()``.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from engine.kernels.reference import fused_add_rmsnorm_ref, rope_and_write_kv_ref, silu_and_mul_ref

ENV_VAR = "SPECPLAN_FUSED_KERNELS"


@functools.cache
def _triton_module() -> ModuleType | None:
    try:
        from engine.kernels import fused_triton
    except ImportError:
        return None
    return fused_triton


@functools.cache
def fused_enabled() -> bool:
    """Whether the Triton kernels may be used at all (Triton importable, env switch not ``0``)."""
    return os.environ.get(ENV_VAR, "1") != "0" and _triton_module() is not None


def _use_fused(t: torch.Tensor) -> bool:
    return t.is_cuda and fused_enabled()


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual); with ``residual`` None, (rmsnorm(x) * weight, x).
    Statistics in float32, the normalised value rounded to x's dtype before the weight (HF Llama)."""
    if _use_fused(x):
        return _triton_module().fused_add_rmsnorm(x, residual, weight, eps)
    return fused_add_rmsnorm_ref(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate first, then up) -> silu(gate) * up [T, I]."""
    if _use_fused(gate_up):
        return _triton_module().silu_and_mul(gate_up)
    return silu_and_mul_ref(gate_up)


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
    """rotate_half RoPE of q [T, Hq, D] and k [T, Hkv, D] (cos/sin tables [max_pos, D] float32), then
    store k and v at ``slot_mapping`` of caches [num_blocks, block_size, Hkv, D] like
    ``engine.attention.write_kv``. Returns the rotated q, which may be q itself rotated in place."""
    if _use_fused(q):
        return _triton_module().rope_and_write_kv(
            positions, q, k, v, cos_table, sin_table, k_cache, v_cache, slot_mapping
        )
    return rope_and_write_kv_ref(positions, q, k, v, cos_table, sin_table, k_cache, v_cache, slot_mapping)


__all__ = ["ENV_VAR", "fused_add_rmsnorm", "fused_enabled", "rope_and_write_kv", "silu_and_mul"]
