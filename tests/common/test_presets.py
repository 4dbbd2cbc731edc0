"""Presets and model shapes: parameter counts equal the published ones, errors name the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common import presets
from planner.profile import ModelShape


@pytest.mark.parametrize(
    "name,published",
    [
        ("qwen2.5-7b", 7_615_616_512),  # Qwen/Qwen2.5-7B: q/k/v projections carry biases
        ("vicuna-7b", 6_738_415_616),  # lmsys/vicuna-7b-v1.5 = Llama-2-7B's shape
    ],
)
def test_preset_params_equal_the_published_count(name: str, published: int) -> None:
    assert presets.preset_shape(name).params == published


def test_qwen_bias_is_counted_once_per_projection_output() -> None:
    shape = presets.preset_shape("qwen2.5-7b")
    no_bias = presets.Shape(**{**shape.__dict__, "qkv_bias": False})
    assert shape.params - no_bias.params == shape.layers * shape.head_dim * (shape.heads + 2 * shape.kv_heads)


def test_hf_config_of_qwen2_has_biases_unless_it_says_otherwise() -> None:
    hf = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=9)
    assert presets.hf_shape({**hf, "model_type": "qwen2"}, "q").qkv_bias
    assert not presets.hf_shape({**hf, "model_type": "qwen2", "attention_bias": False}, "q").qkv_bias
    assert not presets.hf_shape({**hf, "model_type": "llama"}, "l").qkv_bias


def test_a_directory_with_config_json_is_read_before_presets(tmp_path: Path) -> None:
    model = tmp_path / "tiny"  # a preset's name: the directory still wins
    model.mkdir()
    hf = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=7)
    (model / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": True}))
    shape = presets.model_shape(str(model))
    assert (shape.name, shape.layers, shape.kv_heads, shape.head_dim, shape.tied) == ("tiny", 3, 2, 16, True)
    assert set(shape.profile_fields()) == set(ModelShape.model_fields)


def test_unknown_or_malformed_presets_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(presets.PresetError, match="field 'model': 'nope'"):
        presets.model_shape("nope")
    with pytest.raises(presets.PresetError, match="model 'nope': no such preset"):
        presets.preset("nope")
    (tmp_path / "broken.yaml").write_text("weights: random\n")
    monkeypatch.setattr(presets.configs, "MODELS", tmp_path)
    with pytest.raises(presets.PresetError, match="broken.yaml: expected a mapping with a 'model' key"):
        presets.preset("broken")
