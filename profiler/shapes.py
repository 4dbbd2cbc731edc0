"""Model shape for profiles of remote servers (http/vllm backends), without importing torch.

Read from a Hugging Face directory's ``config.json`` or a preset in ``configs/models/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import configs
from profiler.grid import GridError

PRESETS = configs.MODELS


def _params(
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    inter: int,
    vocab: int,
    tied: bool,
    qkv_bias: bool,
) -> int:
    """Parameter count as ``engine.config.ModelConfig.num_params`` counts it (embedding once when tied)."""
    attn = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    if qkv_bias:
        attn += head_dim * (heads + 2 * kv_heads)
    mlp = 3 * hidden * inter
    return vocab * hidden * (1 if tied else 2) + layers * (attn + mlp + 2 * hidden) + hidden


def model_shape(model: str) -> tuple[str, dict[str, int]]:
    """(name, shape dict with the fields of planner.profile.ModelShape) for a preset or HF directory."""
    p = Path(model)
    if (p / "config.json").is_file():
        c = json.loads((p / "config.json").read_text())
        name = p.name
        fields = dict(
            layers=c["num_hidden_layers"], hidden=c["hidden_size"], heads=c["num_attention_heads"],
            kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]), inter=c["intermediate_size"],
            vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")),
        )  # fmt: skip
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    elif (preset := configs.load_preset(model)) is not None:
        c = preset["model"]
        name = c["name"]
        fields = dict(
            layers=c["num_layers"], hidden=c["hidden_size"], heads=c["num_heads"], kv_heads=c["num_kv_heads"],
            inter=c["intermediate_size"], vocab=c["vocab_size"],
            tied=bool(c.get("tie_word_embeddings", False)), qkv_bias=bool(c.get("qkv_bias", False)),
        )  # fmt: skip
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_heads"]
    else:
        raise GridError(
            f"field 'model': {model!r} is neither a directory with config.json nor a preset in {PRESETS}"
        )
    params = _params(head_dim=head_dim, **fields)
    shape = {k: fields[k] for k in ("layers", "hidden", "heads", "kv_heads", "vocab")}
    return name, {**shape, "head_dim": head_dim, "params": params}
