"""Seeded random weights at a model's exact shape.

Step time depends on shapes, not values, so these give true timings for presets whose weights do not
ship here. Each tensor has its own seed derived from (seed, name), so the values do not depend on
iteration order or on which tensor-parallel rank asks: every rank cuts its shard from the same full
tensor. Scales keep activations O(1) through many layers in float16 (linear weights ~ N(0, 1/in)).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch

from engine.config import ModelConfig


def hf_shapes(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama/Qwen2 checkpoint in HF naming."""
    h, q, kv, i = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    yield "model.embed_tokens.weight", (config.vocab_size, h)
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (q, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        if config.qkv_bias:
            yield p + "self_attn.q_proj.bias", (q,)
            yield p + "self_attn.k_proj.bias", (kv,)
            yield p + "self_attn.v_proj.bias", (kv,)
        yield p + "self_attn.o_proj.weight", (h, q)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (config.vocab_size, h)


def random_tensor(
    name: str,
    shape: tuple[int, ...],
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    std = 0.02 if len(shape) == 1 or "embed_tokens" in name else shape[1] ** -0.5
    out = torch.empty(shape, dtype=dtype, device=device)
    out.normal_(0.0, std, generator=gen)
    return out


def iter_random_weights(
    config: ModelConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (unsharded) tensors generated on ``device`` one at a time."""
    for name, shape in hf_shapes(config):
        yield name, random_tensor(name, shape, seed=seed, dtype=dtype, device=device)
