"""Check that a model's weights fit the device before any tensor is allocated.

Without it a 7B model on a 24 GB CPU host dies in the allocator with a raw traceback halfway through
initialisation. The estimate is the parameter count times the element size, per tensor-parallel rank,
plus a 10% margin for activations and the allocator; the available memory is ``MemAvailable`` of
``/proc/meminfo`` on CPU and the free memory of the GPU on CUDA.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.presets import preset
from engine.config import ModelConfig
from engine.errors import CapacityError

MARGIN = 1.10
GIB = 2**30


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can use on ``device``; None when it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def weight_bytes(config: ModelConfig, element_size: int, tp_size: int = 1) -> int:
    return config.num_params * element_size // max(1, tp_size)


def check_weights_fit(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    tp_size: int = 1,
    available: int | None = None,
) -> None:
    """Raise ``CapacityError`` naming the need, what is available and which presets would fit."""
    free = available_bytes(device) if available is None else available
    if free is None:
        return
    elem = torch.empty((), dtype=dtype).element_size()
    need = int(weight_bytes(config, elem, tp_size) * MARGIN)
    if need <= free:
        return
    raise CapacityError(
        f"model {config.name!r} ({config.num_params / 1e9:.2f}B parameters, {dtype}"
        f"{f', tp={tp_size}' if tp_size > 1 else ''}) needs about {need / GIB:.1f} GiB for its weights per "
        f"{'GPU' if device.type == 'cuda' else 'host'}, but {device} has {free / GIB:.1f} GiB available. "
        f"Presets that fit here in {dtype}: {', '.join(presets_that_fit(elem, free, tp_size)) or 'none'}"
        f"{'; a smaller --dtype (float16/bfloat16) halves the need' if elem > 2 else ''}"
        f"{'; more GPUs (--tp) split it' if device.type == 'cuda' else ''}."
    )


def presets_that_fit(element_size: int, free: int, tp_size: int = 1) -> list[str]:
    import configs

    out = []
    for name in configs.preset_names():
        cfg = ModelConfig.from_dict(preset(name)["model"])
        if weight_bytes(cfg, element_size, tp_size) * MARGIN <= free:
            out.append(name)
    return out
