"""Model shapes for remote profiles: the torch-free count equals the engine's for presets and HF configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import configs
from engine.config import ModelConfig
from engine.presets import load_preset_dict
from profiler.grid import GridError
from profiler.shapes import model_shape


@pytest.mark.parametrize("name", configs.preset_names())
def test_preset_params_match_the_engine(name: str) -> None:
    engine_cfg = ModelConfig.from_dict(load_preset_dict(name)["model"])
    _, shape = model_shape(name)
    assert shape["params"] == engine_cfg.num_params
    assert shape["head_dim"] == engine_cfg.head_dim


def test_qwen_hf_config_counts_its_qkv_bias(tmp_path: Path) -> None:
    hf = {
        "model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1000, "tie_word_embeddings": True,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf))
    _, shape = model_shape(str(tmp_path))
    engine_cfg = ModelConfig.from_hf_config(hf, name="q")
    assert engine_cfg.qkv_bias and shape["params"] == engine_cfg.num_params
    biases = 2 * 16 * (4 + 2 * 2)  # layers * head_dim * (q + k + v heads)
    no_bias = ModelConfig.from_hf_config({**hf, "attention_bias": False}, name="q").num_params
    assert shape["params"] - no_bias == biases


def test_unknown_model_names_the_field() -> None:
    with pytest.raises(GridError, match="field 'model': 'nope'"):
        model_shape("nope")
