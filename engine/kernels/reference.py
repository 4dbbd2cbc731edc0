"""PyTorch reference for the fused kernels: exactly the eager math the Llama model has always used.

The CPU path (and ``SPECPLAN_FUSED_KERNELS=0``) runs these, so CPU results stay bit-identical to the
unfused model (the SmolLM2 float32 greedy == transformers tests depend on it). Each op is written the
way HF Llama writes it; do not "simplify" the casts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention import write_kv


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Statistics in float32 as HF does, then back to the activation dtype before the scale."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual); with no residual, (rmsnorm(x), x)."""
    if residual is not None:
        x = residual + x
    return rms_norm_ref(x, weight, eps), x


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate first) -> silu(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rotate_half RoPE: q [T, Hq, D], k [T, Hkv, D] -> rotated (same dtype, tables cast first)."""
    cos = cos_table[positions].unsqueeze(1).to(q.dtype)
    sin = sin_table[positions].unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_and_write_kv_ref(
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
    """Rotate q and k, store k/v at their cache slots; returns the rotated q."""
    q, k = rope_ref(positions, q, k, cos_table, sin_table)
    write_kv(k_cache, v_cache, k, v, slot_mapping)
    return q
