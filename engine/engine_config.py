"""EngineConfig: every option of an engine in one frozen, picklable object, and the flags that set it.

The command lines (``engine generate``/``bench``/``serve``), the offline ``LLM``, the step profiler and
the tensor-parallel workers all read the same validated object, so a bad value fails once, before any
model loads or process starts, with the field and the value named. Torch-free: a spawned worker or a
flag parser imports it without loading the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.methods import WEIGHT_CHOICES
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.spec.config import SpecConfig

DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


def _check_int(name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """What an ``LLMEngine`` runs and how.

    ``model``: preset name, HF directory or .gguf file; ``weights``: auto|real|random. ``num_gpu_blocks``:
    KV-cache blocks (None: sized from device memory at ``gpu_memory_utilization``, or on CPU from
    ``max_num_seqs`` full-length sequences). ``max_model_len``: None = the model's context.
    ``max_num_batched_tokens``: tokens per step (None: 2048). ``spec``: speculative decoding, or None.
    ``pad_drafts``: pad every decoding sequence's draft (none, or shorter than its batch-mates') to one
    verify width (``LLMEngine._pad_drafts``); None = where that width replays a CUDA graph, True = also
    without a graph (CPU tests), False = never.
    """

    model: str
    dtype: str = "auto"
    device: str | None = None
    max_num_seqs: int = 64
    num_gpu_blocks: int | None = None
    block_size: int = 16
    max_model_len: int | None = None
    spec: SpecConfig | None = None
    tp: int = 1
    seed: int = 0
    weights: str = "auto"
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True
    gpu_memory_utilization: float = 0.9
    pad_drafts: bool | None = None

    def __post_init__(self) -> None:
        _check_int("tp", self.tp)
        _check_int("max_num_seqs", self.max_num_seqs)
        _check_int("block_size", self.block_size)
        _check_int("num_gpu_blocks", self.num_gpu_blocks, optional=True)
        _check_int("max_model_len", self.max_model_len, optional=True)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, optional=True)
        if self.weights not in WEIGHT_CHOICES:
            raise ConfigError(f"weights must be one of {WEIGHT_CHOICES}, got {self.weights!r}")
        util = self.gpu_memory_utilization
        if not isinstance(util, int | float) or isinstance(util, bool) or not 0.0 < util <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
        if self.pad_drafts not in (None, True, False):
            raise ConfigError(f"pad_drafts must be None, True or False, got {self.pad_drafts!r}")

    @property
    def token_budget(self) -> int:
        """Tokens one step may schedule."""
        return self.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS

    @classmethod
    def from_args(cls, args: argparse.Namespace, command: str, **overrides: Any) -> EngineConfig:
        """The config the flags of ``add_engine_args`` describe. ``overrides``: what a command derives
        itself (``engine generate``: max_num_seqs from its prompts); ``command`` prefixes flag errors."""
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        if "spec" in given:  # the flag names the method; the spec flags together make the SpecConfig
            from engine.spec.flags import spec_config

            given["spec"] = spec_config(args, command)
        return cls(**(given | overrides))


def add_engine_args(parser: argparse.ArgumentParser, *, kv_cache: bool = True, spec: bool = True) -> None:
    """Register the flags of ``EngineConfig`` (each flag's dest is its field) on ``parser``.

    ``kv_cache=False`` leaves out the KV-pool and scheduling flags, ``spec=False`` the speculative ones,
    for commands that set those themselves. Names follow ``vllm serve`` where one exists."""
    parser.add_argument("--model", required=True, help="preset name, HF directory or .gguf file")
    parser.add_argument(
        "--weights",
        choices=WEIGHT_CHOICES,
        default="auto",
        help="real: the preset's shipped weights (error if none); random: seeded random weights at the "
        "model's shape (true timing, meaningless text); auto: real when available",
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto | float32 | float16 | bfloat16 (auto: the model's)"
    )
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument(
        "--tp",
        "--tensor-parallel-size",
        dest="tp",
        type=int,
        default=1,
        help="tensor-parallel size (one process per GPU)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling")
    if kv_cache:
        parser.add_argument(
            "--max-num-seqs", type=int, default=64, help="most requests running at once; more wait"
        )
        parser.add_argument(
            "--num-gpu-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)"
        )
        parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
        parser.add_argument(
            "--enable-prefix-caching",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="reuse the KV blocks of a prompt prefix seen before (vLLM's flag; default on)",
        )
        parser.add_argument(
            "--max-model-len", type=int, default=None, help="context length (default: the model's)"
        )
    if spec:
        from engine.spec.flags import add_spec_arguments

        add_spec_arguments(parser)
