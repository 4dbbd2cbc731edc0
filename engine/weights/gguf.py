"""GGUF weights and metadata via the ``gguf`` package (dequantized to float32 at load).

llama.cpp's converter permutes the rows of Q and K so that its rope pairs adjacent elements
(GPT-J style); HF Llama pairs element i with i + head_dim/2 (rotate_half). We undo the permutation
so the tensors are exactly the HF ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from engine.config import ModelConfig
from engine.errors import ConfigError

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _reader(path: Path):  # noqa: ANN202 - gguf has no type stubs
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises bare ValueErrors on malformed files
        raise ConfigError(f"GGUF file {str(path)!r} cannot be read: {exc}") from exc


def field_value(reader, key: str, default=None):  # noqa: ANN001, ANN201
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf_config(path: Path) -> ModelConfig:
    """Model shape from GGUF metadata (llama and qwen2 architectures)."""
    r = _reader(path)
    arch = field_value(r, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ConfigError(
            f"GGUF {str(path)!r}: general.architecture {arch!r} is not supported (llama, qwen2)"
        )

    def get(key: str, default=None):  # noqa: ANN001, ANN202
        value = field_value(r, f"{arch}.{key}", default)
        if value is None:
            raise ConfigError(f"GGUF {str(path)!r}: metadata {arch}.{key} is missing")
        return value

    names = {t.name for t in r.tensors}
    heads = int(get("attention.head_count"))
    vocab = field_value(r, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    eos = field_value(r, "tokenizer.ggml.eos_token_id", 2)
    return ModelConfig(
        name=path.stem,
        architecture=arch,
        num_layers=int(get("block_count")),
        hidden_size=int(get("embedding_length")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        intermediate_size=int(get("feed_forward_length")),
        vocab_size=int(vocab),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(get("context_length")),
        qkv_bias="blk.0.attn_q.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        torch_dtype="bfloat16",
        bos_token_id=field_value(r, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),),
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permute for Q/K rows (weights or biases)."""
    shape = w.shape
    # convert permutes with reshape(n_head, 2, d // 2).swapaxes(1, 2); undo it the other way round
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def iter_gguf_weights(path: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantized float32 tensors in HF naming."""
    from gguf.quants import dequantize

    r = _reader(path)
    for t in r.tensors:
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))
        arr = np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)
        if t.name in _TOP_MAP:
            name = _TOP_MAP[t.name]
        else:
            parts = t.name.split(".", 2)
            if parts[0] != "blk" or parts[2] not in _LAYER_MAP:
                raise ConfigError(f"GGUF {str(path)!r}: unexpected tensor {t.name!r}")
            name = f"model.layers.{parts[1]}.{_LAYER_MAP[parts[2]]}"
            if parts[2].startswith("attn_q") and config.architecture == "llama":
                arr = _unpermute(arr, config.num_heads)
            elif parts[2].startswith("attn_k") and config.architecture == "llama":
                arr = _unpermute(arr, config.num_kv_heads)
        if not arr.flags.writeable:  # F32/F16 tensors come back as views of the memory map
            arr = arr.copy()
        yield name, torch.from_numpy(arr)
