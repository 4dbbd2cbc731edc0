"""Model shape description shared by every loader (preset YAML, HF config.json, GGUF metadata)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from common.presets import param_count
from engine.errors import ConfigError

_ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder.

    The same object drives the model, the KV-cache sizing, the profiler's model_info and the
    planner's byte counts, so it is the one place a shape is written down.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0  # 0 = hidden_size // num_heads
    architecture: str = "llama"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    hf_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        positive = (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config {self.name!r}: {name} must be a positive int, got {value!r}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"model config {self.name!r}: hidden_size {self.hidden_size} is not divisible by "
                    f"num_heads {self.num_heads}; give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config {self.name!r}: num_heads {self.num_heads} is not a multiple of "
                f"num_kv_heads {self.num_kv_heads}"
            )
        if self.architecture not in _ARCHITECTURES:
            raise ConfigError(
                f"model config {self.name!r}: architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(_ARCHITECTURES)})"
            )
        if self.rope_theta <= 0:
            raise ConfigError(f"model config {self.name!r}: rope_theta must be > 0, got {self.rope_theta}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        return param_count(
            layers=self.num_layers, hidden=self.hidden_size, heads=self.num_heads, kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, intermediate=self.intermediate_size, vocab=self.vocab_size,
            tied=self.tie_word_embeddings, qkv_bias=self.qkv_bias,
        )  # fmt: skip

    def weight_bytes_per_step(self, dtype_bytes: int) -> int:
        """Bytes of weights a decode step reads: every linear layer and the LM head (not the embedding
        table, of which a step reads only a few rows)."""
        h, i = self.hidden_size, self.intermediate_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        return (self.num_layers * per_layer + self.vocab_size * h + h) * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes one token occupies over all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def shape_dict(self) -> dict[str, int]:
        return {
            "layers": self.num_layers,
            "hidden": self.hidden_size,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate": self.intermediate_size,
            "vocab": self.vocab_size,
            "params": self.num_params,
        }

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, name: str | None = None) -> ModelConfig:
        """Build from a preset dict; unknown keys are an error naming the key."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        if name is not None:
            data.setdefault("name", name)
        eos = data.pop("eos_token_id", None)
        if eos is not None and "eos_token_ids" not in data:
            data["eos_token_ids"] = tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)
        elif "eos_token_ids" in data:
            data["eos_token_ids"] = tuple(int(e) for e in data["eos_token_ids"])
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config {data.get('name')!r}: unknown field(s) {unknown}")
        if "name" not in data:
            raise ConfigError("model config: field 'name' is required")
        return cls(**data)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, name: str) -> ModelConfig:
        """Build from a Hugging Face config.json (LlamaForCausalLM, Qwen2ForCausalLM, Mistral)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in _ARCHITECTURES:
            raise ConfigError(f"{name}: config.json model_type {model_type!r} is not supported")
        if hf.get("rope_scaling"):
            raise ConfigError(f"{name}: config.json rope_scaling={hf['rope_scaling']!r} is not supported")
        eos = hf.get("eos_token_id", 2)
        num_heads = int(hf["num_attention_heads"])
        return cls(
            name=name,
            architecture=model_type,
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=int(hf["hidden_size"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or 0),
            intermediate_size=int(hf["intermediate_size"]),
            vocab_size=int(hf["vocab_size"]),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            qkv_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),),
        )
