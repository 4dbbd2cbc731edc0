"""In-process step timing through the engine's profiler-facing API (``engine.step_profiler``).

One ``StepProfiler`` per (tp, method, k): it runs ``c`` sequences at context ``L`` (KV filled directly)
through ``LLMEngine.step``, the step that serves requests, and times whole steps, with a median per
phase (``phases_ms``). Speculative points are measured at the grid's draft coverage. Timed steps come in
repeats until the median settles (``Repeats``); step time is the median of the repeat medians and the
point records its repeats, spread and whether it is stable. ITL per sequence is step time over tokens
per step. With random weights there is no meaningful acceptance, so tokens per step is recorded as 1
and the planner combines step time with a measured or given acceptance (the profile says
``weights: random``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from common import metrics as md
from planner.profile import DecodePoint, PrefillPoint


@dataclass(frozen=True)
class Repeats:
    """Repeats of ``steps`` timed steps per point: at least ``min``, at most ``max``, stopping once the
    running median of the repeat medians moves by less than ``tol`` (relative)."""

    min: int = 1
    max: int = 1
    tol: float = 0.02


class EngineBackend:
    """Wraps one ``StepProfiler`` at a time; ``configure`` switches (tp, method, k)."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        draft_model: str | None = None,
        seed: int = 0,
        max_context: int | None = None,
        max_num_seqs: int | None = None,
        repeats: Repeats | None = None,
    ):
        self.model, self.dtype, self.draft_model, self.seed = model, dtype, draft_model, seed
        self.max_context = max_context
        self.max_num_seqs = max_num_seqs  # the grid's largest concurrency: sizes the CPU KV pool to it
        self.repeats = repeats or Repeats()
        self.sp: Any = None
        self._key: tuple[int, str, int] | None = None

    def configure(self, tp: int, method: str, k: int) -> None:
        if self._key == (tp, method, k):
            return
        self.close()
        from engine.engine_config import EngineConfig
        from engine.spec import SpecConfig
        from engine.step_profiler import StepProfiler

        spec = None
        if method != "none":
            drafter = {"draft_model": self.draft_model} if method == "draft" and self.draft_model else {}
            spec = SpecConfig(method=method, k=k, seed=self.seed, **drafter)
        sizes = {"max_num_seqs": self.max_num_seqs} if self.max_num_seqs is not None else {}
        config = EngineConfig(
            self.model,
            dtype=self.dtype,
            tp=tp,
            seed=self.seed,
            max_model_len=self.max_context,
            spec=spec,
            **sizes,
        )
        self.sp = StepProfiler(config)
        self._key = (tp, method, k)

    @property
    def info(self) -> dict[str, Any]:
        sp = self.sp
        return {
            "model_info": sp.model_info,
            "kv_capacity_blocks": sp.kv_capacity_blocks,
            "block_size": sp.block_size,
            "device_name": sp.device_name,
            "dtype": sp.dtype,
        }

    def measure(self, spec, *, steps: int, warmup: int, power=None) -> DecodePoint:
        """One decode point (``spec``: profiler.grid.PointSpec); raises on failure (the sweep records it)."""
        self.configure(spec.tp, spec.method, spec.k)
        if power is not None:
            power.start()
        r = self.repeats
        timing = self.sp.measure_decode(
            spec.concurrency,
            spec.context_len,
            steps=steps,
            warmup=warmup,
            coverage=spec.coverage,
            min_repeats=r.min,
            max_repeats=r.max,
            rel_tol=r.tol,
        )
        watts = power.stop() if power is not None else None
        step_ms = timing.median_ms
        tps = 1.0  # random token contexts and padded drafts: acceptance is measured elsewhere
        itl = md.summarize([s / tps for s in timing.step_ms])
        thr = md.decode_throughput_per_gpu(spec.concurrency, step_ms, tps, spec.tp)
        phases = timing.phases_ms
        return DecodePoint(
            tp=spec.tp,
            method=spec.method,
            k=spec.k,
            concurrency=spec.concurrency,
            context_len=spec.context_len,
            draft_ms=phases.get("propose") if spec.k else None,
            verify_ms=sum(v for n, v in phases.items() if n != "propose") if spec.k else None,
            step_ms=step_ms,
            tokens_per_step=tps,
            itl_ms=itl,
            throughput_per_gpu=thr,
            kv_usage=min(1.0, max(0.0, timing.kv_usage)),
            samples=len(timing.step_ms),
            power_w=watts,
            joules_per_token=(watts / (thr * spec.tp)) if watts and thr > 0 else None,
            phases_ms=phases,
            repeats=len(timing.repeat_medians),
            step_ms_spread=timing.spread,
            stable=timing.stable,
            draft_coverage=timing.draft_coverage,
        )

    def measure_prefill(self, tp: int, input_len: int, *, repeats: int = 7) -> PrefillPoint:
        """Median TTFT of ``repeats`` prefills, with their spread: an eager prefill's time is mostly
        kernel launches from Python, which the host's load moves (2x between two H200 sweeps), and every
        plan's prefill stall inherits it, so a noisy point is flagged (``stable``)."""
        self.configure(tp, "none", 0)
        samples = self.sp.measure_prefill(input_len, repeats=repeats)
        ms = statistics.median(samples)
        spread = md.timing_spread(samples)
        return PrefillPoint(
            tp=tp,
            input_len=input_len,
            ttft_ms=ms,
            prefill_tokens_per_s_per_gpu=input_len / (ms / 1000.0) / tp,
            samples=repeats,
            ttft_ms_spread=spread,
            stable=spread <= md.MAX_TIMING_SPREAD,
        )

    def close(self) -> None:
        if self.sp is not None:
            self.sp.close()
        self.sp, self._key = None, None
        import gc

        gc.collect()  # the next configuration needs the device memory this one held
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
