"""Build a model on its device in its dtype and fill it from the source's weights (real or seeded
random), one tensor at a time so peak memory stays near the model's own size."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TextIO

import torch
import torch.distributed as dist

from engine.errors import ConfigError
from engine.model.llama import LlamaForCausalLM
from engine.presets import ModelSource
from engine.weights import iter_weights

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None = cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a valid torch device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype, source: ModelSource, device: torch.device) -> torch.dtype:
    """``auto``: the checkpoint's dtype on GPU, float32 on CPU (CPU half GEMMs are slow and inexact)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(source.config.torch_dtype, torch.float16)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(
    source: ModelSource,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    group: dist.ProcessGroup | None = None,
    seed: int = 0,
    attn_backend: str = "auto",
) -> LlamaForCausalLM:
    """A ready-to-run model (eval mode, no grads) holding this rank's shard."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, source, dev)
    with torch.device(dev), _default_dtype(torch_dtype):
        model = LlamaForCausalLM(
            source.config, tp_rank=tp_rank, tp_size=tp_size, group=group, attn_backend=attn_backend
        )
    # random weights: generate each full tensor on the device itself, in the target dtype
    tensors = iter_weights(source, seed=seed, dtype=torch_dtype, device=dev)
    model.load_weights(_with_progress(tensors, source, show=tp_rank == 0))
    model.set_attn_backend(attn_backend)
    return model.eval().requires_grad_(False)


def _with_progress(
    tensors: Iterator[tuple[str, torch.Tensor]],
    source: ModelSource,
    *,
    show: bool,
    file: TextIO | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """A progress bar (stderr, terminals only) over the tensors as they load: a 7B model takes tens of
    seconds, which a user should see move. The total is the model's Hugging Face tensor count."""
    from tqdm import tqdm

    from engine.weights.random import hf_shapes

    total = sum(1 for _ in hf_shapes(source.config))
    desc = f"loading {source.config.name} ({source.weights} weights)"
    bar = tqdm(
        tensors, total=total, desc=desc, unit="tensor", disable=None if show else True, leave=False, file=file
    )
    yield from bar
