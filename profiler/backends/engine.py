"""In-process step timing through the engine's profiler-facing API (``engine.step_profiler``).

One ``StepProfiler`` per (tp, method, k): it builds ``c`` sequences at context ``L`` with their KV
filled directly and times warm-up-excluded decode (k=0) or draft + verify (k>0) steps. Step time is the
median over timed steps (robust to a stray slow step); ITL per sequence is step time over tokens per
step. With random weights there is no meaningful acceptance, so tokens per step is recorded as 1 and the
planner combines step time with a measured or given acceptance (the profile says ``weights: random``).
"""

from __future__ import annotations

import statistics
from typing import Any

from planner import metrics_def as md
from planner.profile import DecodePoint, PrefillPoint


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
    ):
        self.model, self.dtype, self.draft_model, self.seed = model, dtype, draft_model, seed
        self.max_context = max_context
        self.max_num_seqs = max_num_seqs  # the grid's largest concurrency: sizes the CPU KV pool to it
        self.sp: Any = None
        self._key: tuple[int, str, int] | None = None

    def configure(self, tp: int, method: str, k: int) -> None:
        if self._key == (tp, method, k):
            return
        self.close()
        from engine.step_profiler import StepProfiler

        kwargs: dict[str, Any] = dict(dtype=self.dtype, tp=tp, method=method, k=k, seed=self.seed)
        if self.max_context is not None:
            kwargs["max_context"] = self.max_context
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if method == "draft" and self.draft_model:
            kwargs["spec_options"] = {"draft_model": self.draft_model}
        self.sp = StepProfiler(self.model, **kwargs)
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

    def start_context(self, spec, steps: int, warmup: int) -> int:
        """Context to measure at: ``L``, unless a speculative point's lookahead (every timed and warm-up
        step reserves up to ``1 + k`` slots, plus ``k`` for the last draft) would run past the model's
        maximum length; then early enough that it ends there, so a point at the model's own limit stays
        measurable (at most ``(steps + warmup) * (1 + k) + k`` tokens short of ``L``)."""
        limit = int(getattr(self.sp.runner, "max_model_len", 1 << 30))
        lookahead = 0 if spec.k == 0 else (steps + warmup) * (1 + spec.k) + spec.k
        return max(2, min(spec.context_len, limit - lookahead))

    def measure(self, spec, *, steps: int, warmup: int, power=None) -> DecodePoint:
        """One decode point (``spec``: profiler.grid.PointSpec); raises on failure (the sweep records it)."""
        self.configure(spec.tp, spec.method, spec.k)
        if power is not None:
            power.start()
        timing = self.sp.measure_decode(
            spec.concurrency, self.start_context(spec, steps, warmup), steps=steps, warmup=warmup
        )
        watts = power.stop() if power is not None else None
        step_ms = statistics.median(timing.step_ms)
        real = self.sp.model_info.get("weights") == "real"
        tps = max(1.0, float(getattr(timing, "tokens_per_step", 1.0))) if real else 1.0
        itl = md.summarize([s / tps for s in timing.step_ms])
        thr = md.decode_throughput_per_gpu(spec.concurrency, step_ms, tps, spec.tp)
        return DecodePoint(
            tp=spec.tp,
            method=spec.method,
            k=spec.k,
            concurrency=spec.concurrency,
            context_len=spec.context_len,
            draft_ms=statistics.median(timing.draft_ms) if timing.draft_ms else None,
            verify_ms=statistics.median(timing.verify_ms) if timing.verify_ms else None,
            step_ms=step_ms,
            tokens_per_step=tps,
            itl_ms=itl,
            throughput_per_gpu=thr,
            kv_usage=min(1.0, max(0.0, timing.kv_usage)),
            samples=len(timing.step_ms),
            power_w=watts,
            joules_per_token=(watts / (thr * spec.tp)) if watts and thr > 0 else None,
        )

    def measure_prefill(self, tp: int, input_len: int, *, repeats: int = 3) -> PrefillPoint:
        self.configure(tp, "none", 0)
        ms = statistics.median(self.sp.measure_prefill(input_len, repeats=repeats))
        return PrefillPoint(
            tp=tp,
            input_len=input_len,
            ttft_ms=ms,
            prefill_tokens_per_s_per_gpu=input_len / (ms / 1000.0) / tp,
            samples=repeats,
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
