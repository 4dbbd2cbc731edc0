"""Llama-family decoder (Llama, Vicuna, Mistral, Qwen2, SmolLM) over a paged KV cache.

The batch is flattened ([T] tokens of many sequences), projections are fused (one QKV GEMM, one
gate/up GEMM) and built from the tensor-parallel layers of ``engine.model.parallel``, so the same
module is every rank of a TP group. ``forward`` returns final-normed hidden states; the caller
picks which rows need logits (last token of each sequence, or every verify position).

The residual stream is passed vLLM-style: each layer takes and returns ``(hidden, residual)`` and the
residual add is fused into the next RMSNorm; the elementwise work (add + norm, RoPE + K/V store,
SiLU * mul) goes through ``engine.kernels``, which is Triton on CUDA and the exact eager math elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from engine.attention import paged_attention, resolve_backend
from engine.attention.metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.kernels import fused_add_rmsnorm, rope_and_write_kv, silu_and_mul
from engine.model.allreduce import all_reduce_add_rmsnorm, can_fuse_add_norm
from engine.model.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)

KVCache = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); with no residual, (norm(x), x). Always a pair."""
        return fused_add_rmsnorm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """rotate_half RoPE tables (cos/sin per position, float32) read by engine.kernels.rope_and_write_kv,
    so no step computes trigonometry."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds: split when there are enough, else one replicated head per rank."""
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ConfigError(f"num_kv_heads={num_kv_heads} is not divisible by tp_size={tp_size}")
        return num_kv_heads // tp_size
    if tp_size % num_kv_heads:
        raise ConfigError(f"tp_size={tp_size} is not a multiple of num_kv_heads={num_kv_heads}")
    return 1


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, *, tp_rank: int, tp_size: int, group, attn_backend: str) -> None:  # noqa: ANN001
        super().__init__()
        if config.num_heads % tp_size:
            raise ConfigError(f"num_heads={config.num_heads} is not divisible by tp_size={tp_size}")
        d = config.head_dim
        self.num_heads = config.num_heads // tp_size
        self.num_kv_heads = kv_heads_per_rank(config.num_kv_heads, tp_size)
        self.head_dim = d
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.scale = d**-0.5
        self.attn_backend = attn_backend
        replicate_kv = config.num_kv_heads < tp_size
        kv_out = self.kv_size if replicate_kv else config.kv_size
        # first KV head this rank owns when KV heads are replicated across ranks
        self.kv_start = (tp_rank * config.num_kv_heads // tp_size) * d if replicate_kv else None
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size,
            [config.q_size, kv_out, kv_out],
            bias=config.qkv_bias,
            tp_rank=tp_rank,
            tp_size=tp_size,
            group=group,
            replicate=[False, replicate_kv, replicate_kv],
        )
        self.o_proj = RowParallelLinear(
            config.q_size, config.hidden_size, tp_rank=tp_rank, tp_size=tp_size, group=group
        )

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        *,
        reduce: bool = True,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        q = rope_and_write_kv(positions, q, k, v, rope.cos, rope.sin, k_cache, v_cache, meta.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, meta, self.scale, backend=self.attn_backend)
        return self.o_proj(out.reshape(t, self.q_size), reduce=reduce)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, *, tp_rank: int, tp_size: int, group) -> None:  # noqa: ANN001
        super().__init__()
        i = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size, [i, i], tp_rank=tp_rank, tp_size=tp_size, group=group
        )
        self.down_proj = RowParallelLinear(
            i, config.hidden_size, tp_rank=tp_rank, tp_size=tp_size, group=group
        )

    def forward(self, x: torch.Tensor, *, reduce: bool = True) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)), reduce=reduce)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, *, tp_rank: int, tp_size: int, group, attn_backend: str) -> None:  # noqa: ANN001
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(
            config, tp_rank=tp_rank, tp_size=tp_size, group=group, attn_backend=attn_backend
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, tp_rank=tp_rank, tp_size=tp_size, group=group)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RotaryEmbedding,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        *,
        fuse_allreduce: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) -> (mlp output, residual before it); the residual stream is
        ``hidden + residual`` (``residual`` None on the first layer: the stream is ``hidden``), and
        each add is fused into the following norm. With ``fuse_allreduce`` (tensor parallel, see
        engine.model.allreduce) the row-parallel outputs stay per-rank partial sums, and their all-reduce
        happens inside the next add+norm: ``hidden`` comes in, and goes out, unreduced (except on
        the first layer, whose input is the embedding)."""
        norm_in = self._add_norm_reduced if fuse_allreduce and residual is not None else _add_norm
        hidden, residual = norm_in(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(hidden, positions, rope, kv_cache, meta, reduce=not fuse_allreduce)
        norm_post = self._add_norm_reduced if fuse_allreduce else _add_norm
        hidden, residual = norm_post(self.post_attention_layernorm, hidden, residual)
        return self.mlp(hidden, reduce=not fuse_allreduce), residual

    def _add_norm_reduced(
        self, norm: RMSNorm, partial: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return all_reduce_add_rmsnorm(partial, residual, norm.weight, norm.eps, self.mlp.down_proj.group)


def _add_norm(
    norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return norm.add_norm(hidden, residual)


class LlamaForCausalLM(nn.Module):
    """The decoder plus LM head. Parameters are created empty; ``load_weights`` fills them."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        group: dist.ProcessGroup | None = None,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ConfigError(f"tp_rank={tp_rank} must be in [0, tp_size={tp_size})")
        self.config = config
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.attn_backend = attn_backend
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, tp_rank=tp_rank, tp_size=tp_size, group=group
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                config, tp_rank=tp_rank, tp_size=tp_size, group=group, attn_backend=attn_backend
            )
            for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, tp_rank=tp_rank, tp_size=tp_size, group=group
        )
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)

    @property
    def num_kv_heads_per_rank(self) -> int:
        return self.layers[0].self_attn.num_kv_heads

    def set_attn_backend(self, backend: str) -> None:
        """Pin the attention backend (``auto`` resolved once, so the hot path does not re-decide)."""
        device = self.embed_tokens.weight.device
        concrete = resolve_backend(backend, device)
        self.attn_backend = concrete
        for layer in self.layers:
            layer.self_attn.attn_backend = concrete

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids/positions [T] -> final-normed hidden [T, H]."""
        hidden = self.embed_tokens(input_ids)
        residual = None
        fuse = self.tp_size > 1 and can_fuse_add_norm(self.group, hidden)  # one choice per forward
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, self.rope, cache, meta, fuse_allreduce=fuse)
        if fuse:
            return all_reduce_add_rmsnorm(hidden, residual, self.norm.weight, self.norm.eps, self.group)[0]
        return self.norm.add_norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] in float32 (full vocabulary on every rank)."""
        return self.lm_head.logits(hidden).float()

    # -- weights ----------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill parameters from full HF-named tensors, fusing q/k/v and gate/up and keeping this
        rank's shard. Every parameter must be written exactly once (else ConfigError)."""
        qkv_part = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
        loaded: set[str] = set()
        for name, full in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # shares embed_tokens
            with torch.no_grad():
                key = self._load_one(name, full, qkv_part)
            loaded.add(key)
        expected = self._expected_keys()
        missing = sorted(expected - loaded)
        if missing:
            raise ConfigError(
                f"model {self.config.name!r}: weights missing for {missing[:6]} ({len(missing)} total)"
            )

    def _load_one(self, name: str, full: torch.Tensor, qkv_part: dict[str, int]) -> str:
        top = {
            "model.embed_tokens.weight": self.embed_tokens,
            "lm_head.weight": self.lm_head,
        }
        if name in top:
            top[name].load_shard(full)
            return name
        if name == "model.norm.weight":
            self.norm.weight.data.copy_(full)
            return name
        parts = name.split(".")
        if parts[:2] != ["model", "layers"] or len(parts) < 5:
            raise ConfigError(f"model {self.config.name!r}: unexpected weight {name!r}")
        idx = int(parts[2])
        if idx >= len(self.layers):
            raise ConfigError(
                f"model {self.config.name!r}: weight {name!r} is past num_layers={len(self.layers)}"
            )
        layer = self.layers[idx]
        sub = ".".join(parts[3:])
        if sub in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            getattr(layer, parts[3]).weight.data.copy_(full)
            return name
        module, proj, kind = parts[3], parts[4], parts[-1]
        is_bias = kind == "bias"
        if module == "self_attn" and proj in qkv_part:
            attn = layer.self_attn
            part = qkv_part[proj]
            start = attn.kv_start if part > 0 else None
            attn.qkv_proj.load_shard(part, full, is_bias=is_bias, start=start)
            return f"model.layers.{idx}.self_attn.{proj}.{kind}"
        if module == "self_attn" and proj == "o_proj":
            layer.self_attn.o_proj.load_shard(full)
            return name
        if module == "mlp" and proj in ("gate_proj", "up_proj"):
            layer.mlp.gate_up_proj.load_shard(0 if proj == "gate_proj" else 1, full)
            return name
        if module == "mlp" and proj == "down_proj":
            layer.mlp.down_proj.load_shard(full)
            return name
        raise ConfigError(f"model {self.config.name!r}: unexpected weight {name!r}")

    def _expected_keys(self) -> set[str]:
        from engine.weights.random import hf_shapes

        return {n for n, _ in hf_shapes(self.config)}
