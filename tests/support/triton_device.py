"""Where the Triton kernel tests run: a CUDA device, or the CPU under Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch


def triton_test_device() -> torch.device:
    """CUDA when present, else the CPU if ``TRITON_INTERPRET=1``; otherwise the calling test module
    is skipped (call it at module level)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (or TRITON_INTERPRET=1 with Triton installed)", allow_module_level=True)
