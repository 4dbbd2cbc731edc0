"""The embedded engine: a paged-KV Llama-family engine on kvbm (see DESIGN.md, engine).

``from engine import LLM, SamplingParams`` for offline generation; ``engine.llm_engine.LLMEngine``
for step-level serving; ``engine.step_profiler.StepProfiler`` for the profiler. Imports are lazy so
``import engine`` stays cheap (torch loads on first use).
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "LLMEngine", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "SamplingParams":
        from engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
