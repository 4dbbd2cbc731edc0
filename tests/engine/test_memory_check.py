"""Weights that do not fit are refused before allocation, with the need, what is free and what fits."""

from __future__ import annotations

import pytest
import torch

from engine import memory
from engine.config import ModelConfig
from engine.errors import CapacityError
from engine.presets import load_preset_dict

GIB = 2**30


def _preset(name: str) -> ModelConfig:
    return ModelConfig.from_dict(load_preset_dict(name)["model"])


def test_a_7b_model_in_float32_does_not_fit_24_gib_and_says_what_does() -> None:
    with pytest.raises(CapacityError) as err:
        memory.check_weights_fit(_preset("vicuna-7b"), torch.float32, torch.device("cpu"), available=24 * GIB)
    text = str(err.value)
    assert "'vicuna-7b'" in text and "6.74B parameters" in text and "27.6 GiB" in text and "24.0 GiB" in text
    assert "tiny" in text and "smollm2-135m" in text and "qwen2.5-7b" not in text
    assert "halves the need" in text


def test_it_fits_in_half_precision_on_a_big_enough_device_and_tp_splits_the_need() -> None:
    cfg = _preset("vicuna-7b")
    memory.check_weights_fit(cfg, torch.float16, torch.device("cpu"), available=16 * GIB)
    with pytest.raises(CapacityError):
        memory.check_weights_fit(cfg, torch.float16, torch.device("cpu"), available=8 * GIB)
    memory.check_weights_fit(cfg, torch.float16, torch.device("cpu"), tp_size=2, available=8 * GIB)


def test_the_runner_checks_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.runner import ModelRunner

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    with pytest.raises(CapacityError, match="model 'tiny'"):
        ModelRunner("tiny", device="cpu", weights="random", num_blocks=8)
