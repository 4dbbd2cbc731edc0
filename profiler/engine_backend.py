"""The in-process ``engine`` backend: step-level timing through ``engine.step_profiler.StepProfiler``.

Each decode point is ``c`` sequences at context ``L`` with KV filled directly (no prefill), warm-up steps
excluded, then timed decode (k=0) or draft+verify (k>0) steps; the engine times them with device events
on a GPU and perf_counter + synchronize on CPU. Draft and verify times are recorded separately.

Tokens per step: the profiler pads every draft to k tokens (so the verify cost at k is what is timed).
With random weights acceptance means nothing, so a point records 1 token per step (ITL = step time)
and the planner takes acceptance from ``profiler acceptance`` or a given number; with real weights the
same holds here (the padded drafts are not a real acceptance measurement either), and the metadata says
so. ``engine`` (and torch) are imported lazily: the rest of the profiler runs without them.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable
from typing import Any

from planner.metrics_def import decode_throughput_per_gpu, itl_from_step, summarize
from planner.profile import (
    DecodePoint,
    EngineInfo,
    Hardware,
    Metadata,
    ModelInfo,
    ModelShape,
    PrefillPoint,
    now_utc,
)
from profiler.grid import DecodeKey, SweepGrid

ACCEPTANCE_NOTE = (
    "step times come from drafts padded to k tokens; tokens_per_step is recorded as 1 (no acceptance "
    "assumed), so itl_ms is the step time; acceptance comes from `profiler acceptance` or is given to "
    "the planner"
)
RANDOM_NOTE = "random weights: timing depends on shapes only; acceptance from these weights is meaningless"


def check_model(model: str) -> None:
    """Fail before any measurement when ``model`` is neither a preset nor a readable path."""
    from engine.presets import resolve_model

    resolve_model(model)


def engine_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("specplan")
    except PackageNotFoundError:
        return "unknown"


class EngineBackend:
    """Opens one StepProfiler per (tp, method, k) and measures that config's points on it."""

    name = "engine"

    def __init__(self, grid: SweepGrid, *, device: str | None = None, num_blocks: int | None = None) -> None:
        self.grid = grid
        self.device = device
        self.num_blocks = num_blocks
        self._sp: Any = None
        self._key: tuple[int, str, int] | None = None
        self.info: dict[str, Any] | None = None

    def _profiler(self, tp: int, method: str, k: int) -> Any:
        if self._key == (tp, method, k):
            return self._sp
        self.close()
        from engine.step_profiler import StepProfiler

        max_ctx = max(self.grid.context + self.grid.prefill_lengths) + max(self.grid.k) + 8
        self._sp = StepProfiler(
            self.grid.model,
            dtype=self.grid.dtype,
            device=self.device,
            tp=tp,
            method=method,
            k=k,
            num_blocks=self.num_blocks,
            max_context=max_ctx,
        )
        self._key = (tp, method, k)
        if self.info is None:
            self.info = {
                "model_info": self._sp.model_info,
                "device_name": self._sp.device_name,
                "dtype": self._sp.dtype,
                "block_size": self._sp.block_size,
                "kv_blocks": self._sp.kv_capacity_blocks,
            }
        return self._sp

    def metadata(self, command: str, tp: int) -> Metadata:
        """Profile metadata; opens the first config's engine to read the model and device."""
        if self.info is None:
            self._profiler(tp, "none", 0)
        info = self.info
        assert info is not None
        mi = info["model_info"]
        hw = _hardware(info["device_name"], tp)
        notes = ACCEPTANCE_NOTE
        if mi.get("weights") == "random":
            notes = f"{RANDOM_NOTE}; {ACCEPTANCE_NOTE}"
        return Metadata(
            model=ModelInfo(name=str(mi["name"]), shape=ModelShape(**mi["shape"])),
            hardware=hw,
            engine=EngineInfo(name="specplan-engine", version=engine_version()),
            backend="engine",
            dtype=str(info["dtype"]),
            block_size=int(info["block_size"]),
            kv_capacity_blocks_per_gpu=int(info["kv_blocks"]),
            weights=mi.get("weights", "random"),
            source="measured",
            created_at=now_utc(),
            command=command,
            notes=notes,
        )

    def measure_decode(self, key: DecodeKey) -> DecodePoint:
        sp = self._profiler(key.tp, key.method, key.k)
        t = sp.measure_decode(key.concurrency, key.context, steps=self.grid.steps, warmup=self.grid.warmup)
        return decode_point(key, t.step_ms, t.draft_ms, t.verify_ms, t.kv_usage)

    def measure_prefill(self, tp: int, input_len: int) -> PrefillPoint:
        sp = self._profiler(tp, "none", 0) if self._key is None or self._key[0] != tp else self._sp
        times = sp.measure_prefill(input_len, repeats=max(2, min(self.grid.steps, 5)))
        ms = statistics.median(times)
        return PrefillPoint(
            tp=tp,
            input_len=input_len,
            ttft_ms=ms,
            prefill_tokens_per_s_per_gpu=input_len / (ms / 1000.0) / tp,
            samples=len(times),
        )

    def close(self) -> None:
        if self._sp is not None:
            self._sp.close()
        self._sp, self._key = None, None


def decode_point(
    key: DecodeKey,
    step_ms: list[float],
    draft_ms: list[float],
    verify_ms: list[float],
    kv_usage: float | None,
    tokens_per_step: float = 1.0,
) -> DecodePoint:
    """A DecodePoint from per-step times, with ITL and throughput per planner.metrics_def."""
    step = statistics.median(step_ms)
    return DecodePoint(
        tp=key.tp,
        method=key.method,  # type: ignore[arg-type]
        k=key.k,
        concurrency=key.concurrency,
        context_len=key.context,
        draft_ms=statistics.median(draft_ms) if draft_ms else None,
        verify_ms=statistics.median(verify_ms) if verify_ms else None,
        step_ms=step,
        tokens_per_step=tokens_per_step,
        itl_ms=summarize([itl_from_step(s, tokens_per_step) for s in step_ms]),
        throughput_per_gpu=decode_throughput_per_gpu(key.concurrency, step, tokens_per_step, key.tp),
        kv_usage=None if kv_usage is None else min(1.0, max(0.0, float(kv_usage))),
        samples=len(step_ms),
    )


def _hardware(device_name: str, tp: int) -> Hardware:
    mem = None
    if device_name.lower() != "cpu" and not device_name.lower().startswith("cpu"):
        try:
            import torch

            mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        except Exception:  # noqa: BLE001 - memory is optional metadata
            mem = None
        return Hardware(gpu_name=device_name, gpu_count=tp, gpu_memory_gib=mem)
    return Hardware(gpu_name="cpu", gpu_count=tp, gpu_memory_gib=None)


def cpu_description() -> str:
    return f"{platform.processor() or platform.machine()}"


BackendFactory = Callable[[SweepGrid], EngineBackend]
