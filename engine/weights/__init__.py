"""Weight loaders. Each yields (name, tensor) pairs in Hugging Face Llama naming
(``model.layers.{i}.self_attn.q_proj.weight`` ...), so one fusing step in the model serves them all
and tests can load the very same tensors into transformers."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from engine.presets import ModelSource


def iter_weights(
    source: ModelSource,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (unsharded) tensors of the model in HF naming.

    Real weights come on CPU in their stored dtype (float32 when dequantized from GGUF); the model's
    ``load_weights`` casts and moves them. Random weights are generated directly in ``dtype`` on
    ``device`` (a 7B model is never materialised on the host)."""
    if source.weights == "gguf":
        from engine.weights.gguf import iter_gguf_weights

        assert source.path is not None
        return iter_gguf_weights(source.path, source.config)
    if source.weights == "hf":
        from engine.weights.hf import iter_hf_weights

        assert source.path is not None
        return iter_hf_weights(source.path)
    from engine.weights.random import iter_random_weights

    return iter_random_weights(source.config, seed=seed, dtype=dtype, device=device)


__all__ = ["iter_weights"]
