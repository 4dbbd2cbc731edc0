"""A documented analytic cost model, and the synthetic profiles generated from it.

Why it exists: the planner must be testable against a ground truth (the planner's choice is checked
against the optimum of this closed-form model, and interpolation error is measured at held-out points),
and a fresh clone should be able to answer ``GET /plan`` before anyone has measured a profile. Every
profile made here carries ``source: synthetic`` and ``weights: none``; every plan made from one says so.

The model (all times in milliseconds, ``c`` concurrency, ``L`` context length, ``k`` draft tokens):

    verify_ms = a / tp + comm * log2(tp) + b * c * (1 + k) / tp + d * c * L / tp
    draft_ms  = 0                                  for method none
              = ngram_ms * c                       for ngram (prompt lookup on the host)
              = k * (da + db * c + dd * c * L)     for draft (a small model run k times)
    step_ms   = draft_ms + verify_ms
    TTFT(isl) = p0 + (p1 * isl + p2 * isl**2) / tp

``a`` is the weight-read floor of a decode step, ``b`` the per-token compute, ``d`` the KV read per
token of context, ``comm`` the tensor-parallel all-reduce cost. Acceptance is given per method:
draft coverage and per-position acceptance ``accepted_per_pos[i] = prod_{j<=i} alpha_j``.
The defaults approximate vicuna-7b in fp16 on an H100 80GB (13.5 GB of weights at 3.35 TB/s gives the
~4-6 ms floor; 0.5 MB of KV per token); they are illustrative, not measurements.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from common.metrics import LatencyStats, decode_throughput_per_gpu, itl_from_step
from common.presets import preset_shape
from planner.profile import (
    Acceptance,
    AcceptanceSource,
    DecodePoint,
    EngineInfo,
    Hardware,
    Metadata,
    ModelInfo,
    ModelShape,
    PrefillPoint,
    Profile,
    new_profile,
    now_utc,
)

GIB = 1024**3


@dataclass(frozen=True)
class AnalyticModel:
    """Closed-form step-time, TTFT, KV-capacity and acceptance model (see the module docstring)."""

    a: float = 5.5
    b: float = 0.08
    d: float = 0.00016
    comm: float = 0.45
    ngram_ms: float = 0.004
    da: float = 0.8
    db: float = 0.002
    dd: float = 0.000004
    p0: float = 8.0
    p1: float = 0.06
    p2: float = 0.000004
    gpu_memory_gib: float = 80.0
    gpu_memory_utilization: float = 0.9
    weight_bytes: float = 13.5e9
    kv_bytes_per_token: float = 2 * 32 * 4096 * 2  # K and V, 32 layers, hidden 4096, fp16
    block_size: int = 16
    acceptance: dict[str, tuple[float, tuple[float, ...]]] = field(
        default_factory=lambda: {
            "ngram": (0.55, (0.62, 0.72, 0.78, 0.8, 0.8, 0.8, 0.8, 0.8)),
            "draft": (1.0, (0.78, 0.8, 0.82, 0.83, 0.84, 0.85, 0.85, 0.85)),
        }
    )

    def draft_ms(self, method: str, k: int, c: float, ctx: float) -> float:
        if method == "none":
            return 0.0
        if method == "ngram":
            return self.ngram_ms * c
        if method == "draft":
            return k * (self.da + self.db * c + self.dd * c * ctx)
        raise ValueError(f"method {method!r} has no analytic draft cost")

    def verify_ms(self, tp: int, k: int, c: float, ctx: float) -> float:
        return self.a / tp + self.comm * math.log2(tp) + self.b * c * (1 + k) / tp + self.d * c * ctx / tp

    def step_ms(self, tp: int, method: str, k: int, c: float, ctx: float) -> float:
        return self.draft_ms(method, k, c, ctx) + self.verify_ms(tp, k, c, ctx)

    def accepted_per_pos(self, method: str, k: int) -> list[float]:
        _, alphas = self.acceptance[method]
        if k > len(alphas):
            raise ValueError(f"k={k} exceeds the {len(alphas)} positions modelled for {method!r}")
        out, p = [], 1.0
        for alpha in alphas[:k]:
            p *= alpha
            out.append(p)
        return out

    def coverage(self, method: str) -> float:
        return self.acceptance[method][0]

    def tokens_per_step(self, method: str, k: int) -> float:
        if method == "none":
            return 1.0
        return 1.0 + self.coverage(method) * sum(self.accepted_per_pos(method, k))

    def itl_ms(self, tp: int, method: str, k: int, c: float, ctx: float) -> float:
        return self.step_ms(tp, method, k, c, ctx) / self.tokens_per_step(method, k)

    def served_itl_ms(self, tp: int, method: str, k: int, c: float, isl: float, osl: float) -> float:
        """ITL in aggregated serving: the decode ITL at the mean context plus the prefills of the requests
        that arrive while one request decodes (``c`` arrivals per ``osl`` tokens, each ``ttft_ms`` long)."""
        return self.itl_ms(tp, method, k, c, isl + osl / 2) + c * self.ttft_ms(tp, isl) / osl

    def served_throughput_per_gpu(
        self, tp: int, method: str, k: int, c: float, isl: float, osl: float
    ) -> float:
        return c / (self.served_itl_ms(tp, method, k, c, isl, osl) / 1000.0) / tp

    def ttft_ms(self, tp: int, isl: float) -> float:
        return self.p0 + (self.p1 * isl + self.p2 * isl**2) / tp

    def kv_blocks_per_replica(self, tp: int) -> int:
        free = tp * self.gpu_memory_gib * GIB * self.gpu_memory_utilization - self.weight_bytes
        return max(0, int(free // (self.kv_bytes_per_token * self.block_size)))


DEFAULT_TPS = (1, 2)
DEFAULT_CONFIGS = (("none", 0), ("ngram", 2), ("ngram", 4), ("draft", 2), ("draft", 4))
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DEFAULT_CONTEXTS = (256, 512, 1024, 1536)
DEFAULT_INPUT_LENS = (128, 256, 512, 1024, 2048)

VICUNA_7B_SHAPE = ModelShape(**preset_shape("vicuna-7b").profile_fields())


def synthetic_profile(
    model: AnalyticModel | None = None,
    *,
    model_name: str = "vicuna-7b",
    shape: ModelShape = VICUNA_7B_SHAPE,
    gpu_name: str = "NVIDIA H100 80GB HBM3 (analytic)",
    tps: Iterable[int] = DEFAULT_TPS,
    configs: Iterable[tuple[str, int]] = DEFAULT_CONFIGS,
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    input_lens: Sequence[int] = DEFAULT_INPUT_LENS,
    command: str = "planner synthetic",
    drafters: dict[str, str] | None = None,
) -> Profile:
    """A profile whose every number comes from ``model``; points the KV pool cannot hold are errors."""
    m = model or AnalyticModel()
    tps = tuple(tps)
    configs = tuple(configs)
    drafters = drafters if drafters is not None else {"draft": "JackFram/llama-68m"}
    meta = Metadata(
        model=ModelInfo(name=model_name, shape=shape),
        hardware=Hardware(gpu_name=gpu_name, gpu_count=max(tps), gpu_memory_gib=m.gpu_memory_gib),
        engine=EngineInfo(name="analytic", version="1"),
        backend="engine",
        dtype="float16",
        block_size=m.block_size,
        kv_capacity_blocks_per_gpu=m.kv_blocks_per_replica(1),
        kv_capacity_blocks_by_tp={tp: m.kv_blocks_per_replica(tp) for tp in tps},
        weights="none",
        source="synthetic",
        created_at=now_utc(),
        command=command,
        notes="generated by planner.synthetic.AnalyticModel; no model was run",
    )
    prof = new_profile(meta)
    for tp in tps:
        blocks = m.kv_blocks_per_replica(tp)
        for method, k in configs:
            tps_ = m.tokens_per_step(method, k)
            for ctx in contexts:
                for c in concurrency:
                    per_seq = math.ceil((ctx + 1 + k) / m.block_size)
                    if c * per_seq > blocks:
                        prof.upsert(
                            DecodePoint(
                                tp=tp, method=method, k=k, concurrency=c, context_len=ctx,
                                error=f"capacity: {c} x {per_seq} blocks > {blocks} KV blocks",
                            )
                        )  # fmt: skip
                        continue
                    step = m.step_ms(tp, method, k, c, ctx)
                    itl = itl_from_step(step, tps_)
                    prof.upsert(
                        DecodePoint(
                            tp=tp,
                            method=method,
                            k=k,
                            concurrency=c,
                            context_len=ctx,
                            draft_ms=m.draft_ms(method, k, c, ctx),
                            verify_ms=m.verify_ms(tp, k, c, ctx),
                            step_ms=step,
                            tokens_per_step=tps_,
                            itl_ms=LatencyStats(mean=itl, p50=itl, p90=itl, p99=itl),
                            throughput_per_gpu=decode_throughput_per_gpu(c, step, tps_, tp),
                            kv_usage=min(1.0, c * per_seq / blocks) if blocks else None,
                            samples=1,
                        )
                    )
        for isl in input_lens:
            ttft = m.ttft_ms(tp, isl)
            prof.upsert(
                PrefillPoint(
                    tp=tp,
                    input_len=isl,
                    ttft_ms=ttft,
                    prefill_tokens_per_s_per_gpu=isl / (ttft / 1000.0) / tp,
                    samples=1,
                )
            )
    for method, k in configs:
        if method == "none":
            continue
        prof.upsert(
            Acceptance(
                method=method,
                k=k,
                draft_coverage=m.coverage(method),
                accepted_per_pos=m.accepted_per_pos(method, k),
                source=AcceptanceSource(
                    kind="given",
                    drafter=drafters.get(method),
                    detail="synthetic: AnalyticModel.acceptance (illustrative, not measured)",
                ),
                samples=0,
            )
        )
    return prof
