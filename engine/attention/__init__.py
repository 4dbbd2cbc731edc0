"""Paged attention: write this step's K/V into the block cache, then attend over it.

One interface, two backends: ``torch`` (reference.py; CPU, tests, honours ``tree_mask``) and
``triton`` (triton_paged.py, GPU; reads K/V in place). ``auto`` picks triton on CUDA when the module
and Triton are available, else torch.
"""

from __future__ import annotations

import functools

import torch

from engine.attention.metadata import AttentionMetadata

BACKENDS = ("auto", "torch", "triton")


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store k/v [T, Hkv, D] at their slots of caches [num_blocks, block_size, Hkv, D] (in place;
    index_copy_ keeps it capturable in a CUDA graph)."""
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


@functools.cache
def _triton_impl():  # noqa: ANN202 - returns the backend function or None
    try:
        from engine.attention.triton_paged import paged_attention_triton
    except ImportError:
        return None
    return paged_attention_triton


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``auto`` means on ``device``; a bad name is a ValueError naming it."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_impl() is not None else "torch"
    if backend == "triton" and _triton_impl() is None:
        raise ValueError(
            "attention backend 'triton' requested but engine.attention.triton_paged is unavailable"
        )
    return backend


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of q [T, Hq, D] over the paged cache; returns [T, Hq, D]."""
    name = resolve_backend(backend, q.device) if backend == "auto" else backend
    if name == "triton":
        impl = _triton_impl()
        if impl is None:
            raise ValueError(
                "attention backend 'triton' requested but engine.attention.triton_paged is unavailable"
            )
        return impl(q, k_cache, v_cache, meta, scale)
    if name != "torch":
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    from engine.attention.reference import paged_attention_ref

    return paged_attention_ref(q, k_cache, v_cache, meta, scale)


__all__ = ["AttentionMetadata", "BACKENDS", "paged_attention", "resolve_backend", "write_kv"]
