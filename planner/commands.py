"""Serve commands a plan names: ``engine serve`` for an engine profile, ``vllm serve`` for a vLLM one.

Every speculative setting the acceptance depended on is stated explicitly (vLLM's own defaults differ
from the engine's: ``prompt_lookup_min`` defaults to ``prompt_lookup_max`` when only the latter is
from common.methods import vllm_method
given), a draft method names its drafter, and a k schedule per batch size travels as vLLM's
``num_speculative_tokens_per_batch_size`` or the engine's ``--spec-schedule`` (same list format).
"""

from __future__ import annotations

import json
import shlex
from functools import lru_cache

import yaml

from common.methods import vllm_method
from common.presets import PresetError, preset

ENGINE_LOOKUP_DEFAULTS = {"prompt_lookup_min": 1, "prompt_lookup_max": 4}  # engine/spec/flags.py
Schedule = list[list[int]]


@lru_cache(maxsize=64)
def _model_config(name: str) -> dict:
    """The preset's ``model`` mapping; empty for a model without a (readable) preset."""
    try:
        return preset(name)["model"]
    except (PresetError, OSError, yaml.YAMLError):
        return {}


def served_model(name: str) -> str:
    """The model to pass to ``vllm serve``: a preset's Hugging Face id (configs/models/), else the name."""
    hf_id = _model_config(name).get("hf_id")
    return hf_id if isinstance(hf_id, str) and hf_id else name


def model_max_context(name: str) -> int | None:
    """The preset's maximum position (configs/models/<name>.yaml), None for a model without a preset."""
    value = _model_config(name).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def lookup_window(settings: dict | None) -> tuple[dict[str, int], bool]:
    """The n-gram lookup window to emit and whether it was recorded with the acceptance."""
    keys = ("prompt_lookup_min", "prompt_lookup_max")
    if settings and all(key in settings for key in keys):
        return {key: int(settings[key]) for key in keys}, True
    return dict(ENGINE_LOOKUP_DEFAULTS), False


def vllm_spec_config(
    method: str, k: int, drafter: str | None, settings: dict | None, schedule: Schedule | None
) -> str:
    """``--speculative-config`` JSON with every setting explicit."""
    cfg: dict[str, object] = {"method": vllm_method(method), "num_speculative_tokens": k}
    if method == "ngram":
        window, _ = lookup_window(settings)
        cfg.update(
            prompt_lookup_max=window["prompt_lookup_max"], prompt_lookup_min=window["prompt_lookup_min"]
        )
    elif drafter:
        cfg["model"] = drafter
    if schedule:
        cfg["num_speculative_tokens_per_batch_size"] = schedule
    return json.dumps(cfg, separators=(",", ":"))


def vllm_args(
    tp: int, concurrency: int, max_len: int, method: str, k: int, drafter: str | None,
    settings: dict | None, schedule: Schedule | None,
) -> list[str]:  # fmt: skip
    args = ["--tensor-parallel-size", str(tp), "--max-num-seqs", str(concurrency)]
    if method != "none":
        args += ["--speculative-config", vllm_spec_config(method, k, drafter, settings, schedule)]
    return [*args, "--max-model-len", str(max_len)]


def engine_args(
    model: str, tp: int, concurrency: int, max_len: int, method: str, k: int, drafter: str | None,
    settings: dict | None, schedule: Schedule | None,
) -> list[str]:  # fmt: skip
    args = ["engine", "serve", "--model", model, "--tp", str(tp), "--max-num-seqs", str(concurrency)]
    args += ["--max-model-len", str(max_len)]
    if method == "none":
        return args
    args += ["--spec", method, "--k", str(k)]
    if method == "ngram":
        window, _ = lookup_window(settings)
        args += ["--prompt-lookup-min", str(window["prompt_lookup_min"])]
        args += ["--prompt-lookup-max", str(window["prompt_lookup_max"])]
    elif method == "draft" and drafter:
        args += ["--draft-model", drafter]
    elif method == "medusa" and drafter:
        args += ["--medusa-heads", drafter]
    if schedule:
        args += ["--spec-schedule", json.dumps(schedule, separators=(",", ":"))]
    return args


def join(argv: list[str]) -> str:
    return shlex.join(argv)
