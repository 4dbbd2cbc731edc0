"""Hugging Face checkpoint weights: ``model.safetensors`` or a sharded set listed by
``model.safetensors.index.json``. Tensors are yielded one at a time so a 7B checkpoint never has to
fit in host memory twice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.errors import ConfigError


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, in index order when an index exists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{str(index)!r}: not a valid safetensors index ({exc})") from exc
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{str(index)!r} names missing shard(s): {missing}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model directory {str(path)!r} has no *.safetensors files")
    return files


def iter_hf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every shard, in the checkpoint's stored dtype."""
    from safetensors import safe_open

    for file in safetensors_files(Path(path)):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_tensor(name)
