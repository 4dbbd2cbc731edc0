"""Shipped configuration data: model presets (``models/``), sweep grids (``sweeps/``), profiles.

Read through ``importlib.resources`` so an installed wheel finds them as well as a clone does. This is the one
place that knows where they live and reads a preset's YAML; it imports nothing of ours and no torch.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml


def config_path(*parts: str) -> Path:
    """A file or folder of the shipped configuration (package data, installed unzipped)."""
    return Path(str(files(__name__).joinpath(*parts)))


MODELS = config_path("models")
SWEEPS = config_path("sweeps")
PROFILES = config_path("profiles")
DEFAULT_SWEEP = SWEEPS / "default.yaml"


def preset_names() -> list[str]:
    return sorted(p.stem for p in MODELS.glob("*.yaml"))


def preset_file(name: str) -> Path | None:
    """The YAML of preset ``name``, or None when there is no such preset."""
    if not name or "/" in name or "\\" in name:
        return None
    path = MODELS / f"{name}.yaml"
    return path if path.is_file() else None


def load_preset(name: str) -> dict[str, Any] | None:
    """The parsed YAML of preset ``name``, or None when there is no such preset."""
    path = preset_file(name)
    return None if path is None else yaml.safe_load(path.read_text())
