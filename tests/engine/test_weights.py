"""Weight sources: seeded random weights, HF safetensors (single file and sharded), and errors."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import ConfigError
from engine.model.loader import build_model
from engine.presets import resolve_model
from engine.runner import ModelRunner, SeqBatchEntry
from engine.weights import iter_weights
from engine.weights.random import hf_shapes


def _hf_config(cfg) -> dict:
    return {
        "model_type": "llama",
        "num_hidden_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "torch_dtype": "float32",
        "eos_token_id": 257,
        "bos_token_id": 256,
    }


def test_random_weights_are_seeded_and_complete():
    src = resolve_model("tiny")
    a = dict(iter_weights(src, seed=3))
    b = dict(iter_weights(src, seed=3))
    c = dict(iter_weights(src, seed=4))
    assert set(a) == {n for n, _ in hf_shapes(src.config)}
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(
        a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"]
    )
    assert src.weights_label == "random"


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_directory_matches_random_source(tmp_path, sharded):
    src = resolve_model("tiny")
    tensors = dict(iter_weights(src, seed=7))
    (tmp_path / "config.json").write_text(json.dumps(_hf_config(src.config)))
    if sharded:
        names = sorted(tensors)
        half = len(names) // 2
        files = {
            "model-00001-of-00002.safetensors": names[:half],
            "model-00002-of-00002.safetensors": names[half:],
        }
        weight_map = {}
        for fname, part in files.items():
            save_file({n: tensors[n] for n in part}, str(tmp_path / fname))
            weight_map.update(dict.fromkeys(part, fname))
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(tensors, str(tmp_path / "model.safetensors"))
    hf_src = resolve_model(str(tmp_path))
    assert hf_src.weights == "hf" and hf_src.weights_label == "real"
    ids = [1, 2, 3, 4, 5]
    outs = []
    for s in (src, hf_src):
        r = ModelRunner(s, device="cpu", num_blocks=4, block_size=4, seed=7)
        i, p, m = r.prepare([SeqBatchEntry(ids, [0, 1], 0)])
        outs.append(r.execute(i, p, m, None)[1])
    torch.testing.assert_close(outs[0], outs[1])


def test_missing_weight_is_named(tmp_path):
    src = resolve_model("tiny")
    tensors = dict(iter_weights(src))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    (tmp_path / "config.json").write_text(json.dumps(_hf_config(src.config)))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="down_proj"):
        build_model(resolve_model(str(tmp_path)), device="cpu")


def test_bad_model_names_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such preset"):
        resolve_model("no-such-model")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model(str(tmp_path / "missing" / "x"))
    with pytest.raises(ConfigError, match="weights must be one of"):
        resolve_model("tiny", weights="bogus")
    with pytest.raises(ConfigError, match="no real weights"):
        resolve_model("vicuna-7b", weights="real")
    with pytest.raises(ConfigError, match="dtype"):
        build_model(resolve_model("tiny"), dtype="int8", device="cpu")


@pytest.mark.parametrize(
    "name", ["vicuna-7b", "llama-3-8b", "qwen2.5-7b", "llama-68m", "smollm2-135m", "tiny"]
)
def test_presets_have_public_shapes(name):
    cfg = resolve_model(name, weights="random").config
    expected_params = {
        "vicuna-7b": 6_738_415_616,
        "llama-3-8b": 8_030_261_248,
        "qwen2.5-7b": 7_615_616_512,
        "llama-68m": 68_030_208,
        "smollm2-135m": 134_515_008,
    }
    if name in expected_params:
        assert cfg.num_params == expected_params[name]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_loading_shows_progress_on_a_terminal_only() -> None:
    """Weights pass through unchanged while a bar counts them to the model's tensor total; no bar for
    a log file (not a terminal) or for tensor-parallel ranks other than 0."""
    from engine.model.loader import _with_progress

    source = resolve_model("tiny")
    names = [name for name, _ in hf_shapes(source.config)]
    tensors = [(n, torch.zeros(1)) for n in names]
    term = _Terminal()
    assert [n for n, _ in _with_progress(iter(tensors), source, show=True, file=term)] == names
    assert f"0/{len(names)} " in term.getvalue() and "loading tiny (random weights)" in term.getvalue()
    log, other_rank = io.StringIO(), _Terminal()
    list(_with_progress(iter(tensors), source, show=True, file=log))
    list(_with_progress(iter(tensors), source, show=False, file=other_rank))
    assert log.getvalue() == other_rank.getvalue() == ""
