"""Model shape for profiles of remote servers (http/vllm backends), in the profiler's terms.

The shape and its parameter count come from ``common.presets``; an unknown model is a grid error here.
"""

from __future__ import annotations

from common.presets import PresetError
from common.presets import model_shape as _model_shape
from profiler.grid import GridError


def model_shape(model: str) -> tuple[str, dict[str, int]]:
    """(name, shape dict with the fields of planner.profile.ModelShape) for a preset or HF directory."""
    try:
        shape = _model_shape(model)
    except PresetError as exc:
        raise GridError(str(exc)) from None
    return shape.name, shape.profile_fields()
