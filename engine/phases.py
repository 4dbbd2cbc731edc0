"""Phase clock of one engine step: where a step's time goes (schedule, propose, forward, ...).

``LLMEngine.step`` marks the end of each phase on the clock it is given (none while serving, so a
served step pays one ``None`` check per phase). The step profiler hands it one, so a profile's
per-phase breakdown comes from the very step code that serves requests. On CUDA the marks are
device events (no synchronisation inside the step: a phase is the stream time between two marks);
on CPU, where operations are synchronous, ``perf_counter``.
"""

from __future__ import annotations

import time

import torch

# every phase a step may mark, in the order a step runs them (a plain engine has no propose or
# proposer_update)
PHASES = ("propose", "schedule", "prepare", "forward", "sample_verify", "commit", "proposer_update", "output")


class PhaseClock:
    """Marks of one step at a time: ``start()``, ``mark(phase)`` after each phase, ``stop()``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.trace: list[str] = []  # phase names of the last step, in order
        self._marks: list[object] = []
        self._t0: object = None

    def _now(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> None:
        self.trace, self._marks = [], []
        self._t0 = self._now()

    def mark(self, phase: str) -> None:
        self.trace.append(phase)
        self._marks.append(self._now())

    def stop(self) -> dict[str, float]:
        """Milliseconds per phase of the step just run (waits for the device on CUDA)."""
        if self._t0 is None:
            raise RuntimeError("PhaseClock.stop() before start()")
        out: dict[str, float] = {}
        prev = self._t0
        if self.cuda and self._marks:
            self._marks[-1].synchronize()  # type: ignore[attr-defined]
        for phase, m in zip(self.trace, self._marks, strict=True):
            ms = prev.elapsed_time(m) if self.cuda else (m - prev) * 1e3  # type: ignore[attr-defined,operator]
            out[phase] = out.get(phase, 0.0) + ms
            prev = m
        self._t0 = None
        return out
