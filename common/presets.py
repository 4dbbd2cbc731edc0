"""Model presets and model shapes, without torch.

A preset is ``configs/models/<name>.yaml`` (``configs`` finds and parses it); this module checks it has a
``model`` mapping and turns a preset or a Hugging Face ``config.json`` into a ``Shape``: the numbers a
profile records and the parameter count, counted once here for the engine, the profiler and the planner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import configs


class PresetError(ValueError):
    """A model that is neither a preset nor a Hugging Face directory, or a malformed preset file."""


def preset(name: str) -> dict[str, Any]:
    """Preset ``name``: its ``model`` mapping (shape, numerics, hf_id, max_position_embeddings) and where
    its weights and tokenizer come from."""
    data = configs.load_preset(name)
    if data is None:
        raise PresetError(f"model {name!r}: no such preset (presets: {', '.join(configs.preset_names())})")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise PresetError(f"preset file {configs.preset_file(name)}: expected a mapping with a 'model' key")
    return data


def param_count(
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    vocab: int,
    tied: bool,
    qkv_bias: bool,
) -> int:
    """Parameters of a Llama-family decoder: attention (with Qwen's q/k/v biases), gated MLP, two norms per
    layer, the final norm, the embedding and the LM head (counted once when tied)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = hidden * (q + 2 * kv) + q * hidden + (q + 2 * kv if qkv_bias else 0)
    per_layer = attn + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + vocab * hidden * (1 if tied else 2) + hidden


@dataclass(frozen=True)
class Shape:
    """What step time depends on, and the parameter count derived from it."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False

    @property
    def params(self) -> int:
        return param_count(
            layers=self.layers, hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads,
            head_dim=self.head_dim, intermediate=self.intermediate, vocab=self.vocab, tied=self.tied,
            qkv_bias=self.qkv_bias,
        )  # fmt: skip

    def profile_fields(self) -> dict[str, int]:
        """The fields of a profile's model shape (``planner.profile.ModelShape``)."""
        return {
            "layers": self.layers, "hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads,
            "head_dim": self.head_dim, "vocab": self.vocab, "params": self.params,
        }  # fmt: skip


def preset_shape(name: str) -> Shape:
    """The shape of preset ``name`` (keys as ``configs/models/*.yaml`` write them)."""
    m = preset(name)["model"]
    return Shape(
        name=m.get("name", name), layers=m["num_layers"], hidden=m["hidden_size"], heads=m["num_heads"],
        kv_heads=m["num_kv_heads"], head_dim=m.get("head_dim") or m["hidden_size"] // m["num_heads"],
        intermediate=m["intermediate_size"], vocab=m["vocab_size"],
        tied=bool(m.get("tie_word_embeddings", False)), qkv_bias=bool(m.get("qkv_bias", False)),
    )  # fmt: skip


def hf_shape(config: dict[str, Any], name: str) -> Shape:
    """The shape in a Hugging Face ``config.json`` (Qwen2 has q/k/v biases unless it says otherwise)."""
    heads = config["num_attention_heads"]
    return Shape(
        name=name, layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate=config["intermediate_size"], vocab=config["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
    )  # fmt: skip


def model_shape(model: str) -> Shape:
    """The shape of ``model``: a directory with a Hugging Face ``config.json``, or a preset name."""
    path = Path(model)
    if (path / "config.json").is_file():
        return hf_shape(json.loads((path / "config.json").read_text()), path.name)
    if configs.preset_file(model) is None:
        raise PresetError(
            f"field 'model': {model!r} is neither a directory with config.json nor a preset "
            f"in {configs.MODELS}"
        )
    return preset_shape(model)
