"""Choose (tp, method, k, max concurrency, replicas) under an ITL/TTFT SLA from a profile's surfaces.

For every measured (tp, method, k) the planner evaluates the interpolated step time at every integer
concurrency of the measured range, at the mean decode context ``isl + osl / 2``; ITL is step time over
tokens per step (from acceptance), throughput per GPU is ``c * tokens_per_step / step / tp``. A
concurrency is feasible when its ITL meets the SLA and the KV pool holds that many sequences at the
peak context ``isl + osl`` with ``k`` lookahead slots each (``kvbm.capacity``); TTFT (prefill of ``isl``)
must meet ``ttft_ms`` when given. The answer is the feasible configuration with the highest decode
throughput per GPU, at the concurrency that maximises it.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, Field, PrivateAttr

from kvbm import capacity
from planner.metrics_def import tokens_per_step as _tokens_per_step
from planner.profile import Acceptance, AcceptanceSource, Profile
from planner.surface import ConfigKey, DecodeSurface, Surfaces

DEFAULT_OSL = 256
SYNTHETIC_WARNING = (
    "profile source is 'synthetic': numbers come from an analytic model, not a measurement; "
    "replace it with a measured profile (profiler sweep)"
)


class PlanInputError(ValueError):
    """A plan input that cannot be planned for; ``field`` names it."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"{field}={value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class Inputs(BaseModel):
    """The SLA and workload the plan was made for, with defaults resolved."""

    itl_ms: float
    ttft_ms: float | None = None
    isl: int
    osl: int
    request_rate: float | None = None
    max_gpus: int | None = None
    decode_context: float = Field(description="mean context during decode: isl + osl / 2")
    peak_context: int = Field(description="context at the last token: isl + osl (KV bound)")
    itl_correction: float = 1.0
    assumptions: list[str] = Field(default_factory=list)


class Prediction(BaseModel):
    itl_ms: float
    step_ms: float
    tokens_per_step: float
    throughput_per_gpu: float = Field(description="decode output tokens/s per GPU")
    ttft_ms: float | None = Field(default=None, description="prefill of isl tokens, unloaded")


class KvBound(BaseModel):
    blocks_per_replica: int
    block_size: int
    blocks_per_sequence: int = Field(
        description="blocks one sequence holds at its last step, every draft present"
    )
    max_concurrency: int = Field(
        description="largest concurrency the KV pool serves without preemption (for ngram: whose "
        "simulated preemption risk is at most max_preemption_risk)"
    )
    model: Literal["engine", "vllm"] = Field(description="whose KV rule applies (kvbm.capacity)")
    rule: str = Field(description="the rule in words")
    worst_case_concurrency: int = Field(description="every sequence at its peak with every draft at once")
    preemption_onset: int | None = Field(
        default=None, description="ngram: smallest concurrency whose simulated preemption risk is >= 50%"
    )
    max_preemption_risk: float | None = None
    concurrency: int | None = Field(default=None, description="the concurrency preemption_risk is for")
    preemption_risk: float | None = Field(
        default=None, description="simulated probability that a burst of closed-loop clients preempts"
    )
    _risk: capacity.DynamicBound | None = PrivateAttr(default=None)

    def at(self, concurrency: int) -> KvBound:
        """This bound with the preemption risk at ``concurrency`` filled in (0 when it can never preempt)."""
        risk = (
            self._risk.probability(concurrency) if self._risk else float(concurrency > self.max_concurrency)
        )
        return self.model_copy(update={"concurrency": concurrency, "preemption_risk": risk})


class Replicas(BaseModel):
    """Sizing for ``request_rate`` (Little's law on the decode side, token rate on the prefill side)."""

    request_rate: float
    decode_requests_per_s_per_replica: float
    decode_replicas: int
    prefill_tokens_per_s_per_gpu: float | None = None
    prefill_replicas: int | None = None
    gpus_decode: int
    gpus_prefill: int | None = None
    gpus_total: int


class Breakeven(BaseModel):
    """Concurrency from which speculation (method, k) is no faster than no speculation at this tp."""

    tp: int
    method: str
    k: int
    concurrency: int | None = Field(
        description="smallest measured concurrency where ITL with speculation >= ITL without; "
        "null when speculation pays across the whole common measured range"
    )
    checked_up_to: int


class Choice(BaseModel):
    tp: int
    method: str
    k: int
    max_concurrency: int = Field(description="max concurrent sequences per replica (--max-num-seqs)")
    limited_by: str = Field(description="what stopped concurrency: sla, kv, measured_range or throughput")
    predicted: Prediction
    kv: KvBound
    acceptance_source: str | None = None
    replicas: Replicas | None = None
    speculation_breakeven: Breakeven | None = None
    vllm_serve_args: list[str]
    vllm_serve_command: str
    flags: list[str] = Field(default_factory=list, description="extrapolation and range warnings")


class Rejected(BaseModel):
    tp: int
    method: str
    k: int
    reason: str
    best_itl_ms: float | None = None


class PlanResult(BaseModel):
    feasible: bool
    profile: str
    source: str = Field(description="'measured' or 'synthetic' (from the profile's metadata)")
    warning: str | None = None
    model: str
    hardware: str
    inputs: Inputs
    choice: Choice | None = Field(description="best feasible config; when infeasible, the lowest-ITL one")
    alternatives: list[Choice] = Field(default_factory=list, description="next best feasible configs")
    lowest_achievable_itl_ms: float | None = None
    rejected: list[Rejected] = Field(default_factory=list)
    message: str


AcceptanceOverride = float | Mapping[tuple[str, int], Acceptance] | None


@dataclass
class _Eval:
    key: ConfigKey
    c: np.ndarray
    step: np.ndarray
    itl: np.ndarray
    thr: np.ndarray
    tps: float
    acc_source: str | None
    c_kv: int
    kv: KvBound
    ttft: float | None
    flags: list[str]


def resolve_acceptance(
    profile: Profile, method: str, k: int, override: AcceptanceOverride, coverage: float | None
) -> tuple[float, str] | str:
    """Tokens per step and its source for (method, k), or a reason why there is none."""
    if method == "none":
        return 1.0, "none"
    if isinstance(override, float | int) and not isinstance(override, bool):
        cov = 1.0 if coverage is None else coverage
        per_pos = [float(override) ** (i + 1) for i in range(k)]
        return _tokens_per_step(cov, per_pos), f"given: alpha={override} coverage={cov}"
    candidates: list[Acceptance] = []
    if isinstance(override, Mapping):
        candidates += [a for (m, _), a in override.items() if m == method]
    candidates += [a for a in profile.acceptance if a.method == method]
    for acc in candidates:  # overrides first, then the exact k, then derived from a larger k
        if acc.k == k:
            return acc.tokens_per_step, _describe_source(acc.source)
    for acc in sorted(candidates, key=lambda a: a.k):
        if acc.k > k:
            tps = _tokens_per_step(acc.draft_coverage, acc.accepted_per_pos[:k])
            return tps, f"{_describe_source(acc.source)} (first {k} positions of k={acc.k})"
    if profile.metadata.weights == "real":  # a sweep with real weights measured tokens per step itself
        measured = [p for p in profile.decode if p.ok and p.method == method and p.k == k and p.samples > 0]
        if measured:
            steps = sum(p.samples for p in measured)
            tps = sum(p.tokens_per_step * p.samples for p in measured) / steps  # type: ignore[operator]
            return tps, f"measured in the sweep's decode points ({len(measured)} points, real weights)"
    return f"no acceptance for method={method} k={k}: pass acceptance= or measure it"


def _describe_source(src: AcceptanceSource) -> str:
    parts = [src.kind] + [f"{n}={v}" for n in ("dataset", "model", "drafter") if (v := getattr(src, n))]
    if src.detail:
        parts.append(src.detail)
    return ", ".join(parts)


MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


@lru_cache(maxsize=64)
def served_model(name: str) -> str:
    """The model to pass to ``vllm serve``: a preset's Hugging Face id (configs/models/), else the name."""
    cfg = MODEL_CONFIGS / f"{name}.yaml"
    if "/" in name or not cfg.is_file():
        return name
    try:
        hf_id = (yaml.safe_load(cfg.read_text()) or {}).get("model", {}).get("hf_id")
    except (OSError, yaml.YAMLError, AttributeError):
        return name
    return hf_id if isinstance(hf_id, str) and hf_id else name


def _spec_config_json(method: str, k: int, drafter: str | None) -> str:
    cfg: dict[str, object] = {"method": method, "num_speculative_tokens": k}
    if method == "ngram":
        cfg.update(prompt_lookup_max=4, prompt_lookup_min=1)
    elif drafter:
        cfg["model"] = drafter
    return json.dumps(cfg, separators=(",", ":"))


class Planner:
    """Plans for one profile; build once (splines are fitted here), call ``plan`` many times."""

    def __init__(self, profile: Profile, name: str = "profile") -> None:
        self.profile = profile
        self.name = name
        self.surfaces = Surfaces(profile)
        self._memo: dict[tuple, object] = {}  # step curves, TTFT and KV bounds per workload shape
        if not self.surfaces.decode:
            raise ValueError(f"{name}: profile has no successful decode point to plan from")

    # ------------------------------------------------------------------ helpers
    def _cached(self, key: tuple, compute):
        """Memoise pure functions of the profile (bounded: a server sees few distinct isl/osl pairs)."""
        hit = self._memo.get(key)
        if hit is None:
            if len(self._memo) > 8192:
                self._memo.clear()
            hit = self._memo[key] = compute()
        return hit

    def _curve(self, surf: DecodeSurface, ctx: float) -> tuple[np.ndarray, np.ndarray]:
        """Every integer concurrency of the measured range at ``ctx`` and its interpolated step time."""

        def compute() -> tuple[np.ndarray, np.ndarray]:
            lo, hi = surf.concurrency_bounds(ctx)
            c = np.arange(lo, hi + 1, dtype=float)
            return c, surf.step_ms(c, ctx)

        return self._cached(("curve", surf.key, ctx), compute)

    def _drafter(self, method: str) -> str | None:
        for a in self.profile.acceptance:
            if a.method == method and a.source.drafter:
                return a.source.drafter
        return None

    @property
    def kv_model(self) -> capacity.CapacityModel:
        """Whose KV rule applies: the profile's kv_capacity_model, else the engine's for an engine
        profile and vLLM's for one measured through a server."""
        meta = self.profile.metadata
        return meta.kv_capacity_model or ("engine" if meta.backend == "engine" else "vllm")

    def _kv_acceptance(
        self, method: str, k: int, override: AcceptanceOverride = None, coverage: float | None = None
    ) -> tuple[float, list[float]] | None:
        """Draft coverage and per-position acceptance for the KV onset (the ITL's own source order)."""
        if isinstance(override, float | int) and not isinstance(override, bool):
            return (1.0 if coverage is None else coverage), [float(override) ** (i + 1) for i in range(k)]
        found = [a for (m, _), a in override.items() if m == method] if isinstance(override, Mapping) else []
        found += [a for a in self.profile.acceptance if a.method == method and a.k >= k]
        for acc in sorted(found, key=lambda a: a.k != k):  # the exact k first, then a larger one
            if acc.k >= k:
                return acc.draft_coverage, list(acc.accepted_per_pos[:k])
        return None

    def kv_bound(
        self,
        tp: int,
        k: int,
        context: int,
        method: str | None = None,
        isl: int | None = None,
        acceptance: tuple[float, list[float]] | None = None,
    ) -> KvBound:
        """Concurrency the KV pool of a tp replica serves at peak context ``isl + osl``.

        Without ``method`` a speculative k counts as a chain drafter that drafts at every step. For
        ngram with known ``isl`` and acceptance, the onset is simulated (kvbm.capacity.dynamic_bound)."""
        meta = self.profile.metadata
        blocks = self.profile.kv_blocks_per_replica(tp)
        model = self.kv_model
        method = method or ("none" if k == 0 else "draft")
        static = capacity.static_bound(model, method, k, blocks, context, meta.block_size)
        bound = KvBound(
            blocks_per_replica=blocks,
            block_size=meta.block_size,
            blocks_per_sequence=static.blocks_per_sequence,
            max_concurrency=static.max_concurrency,
            model=model,
            rule=capacity.describe_rule(model, method, k),
            worst_case_concurrency=static.max_concurrency,
        )
        if method in capacity.DYNAMIC_METHODS and k and isl is not None and 1 <= isl < context:
            acc = acceptance or self._kv_acceptance(method, k)
            if acc is None:
                bound.rule += " (no acceptance known: worst case, every draft at the peak)"
                return bound
            dyn = capacity.dynamic_bound(
                model, blocks, meta.block_size, isl, context - isl, k, acc[0], acc[1], method=method
            )
            bound.max_concurrency = dyn.max_concurrency
            bound.preemption_onset = dyn.onset
            bound.max_preemption_risk = dyn.max_risk
            bound._risk = dyn
        return bound

    def resolve_inputs(
        self,
        itl_ms: float,
        ttft_ms: float | None,
        isl: int | None,
        osl: int | None,
        request_rate: float | None,
        max_gpus: int | None,
        itl_correction: float,
    ) -> Inputs:
        for field, value, lo in (
            ("itl_ms", itl_ms, 0.0),
            ("ttft_ms", ttft_ms, 0.0),
            ("request_rate", request_rate, 0.0),
            ("itl_correction", itl_correction, 0.0),
        ):
            if value is not None and (not math.isfinite(value) or value <= lo):
                raise PlanInputError(field, value, "must be a finite number > 0")
        for field, value in (("isl", isl), ("osl", osl), ("max_gpus", max_gpus)):
            if value is not None and value < 1:
                raise PlanInputError(field, value, "must be >= 1")
        notes = []
        if isl is None:
            isl = max(1, int(self.surfaces.median_context) - (osl or DEFAULT_OSL) // 2)
            notes.append(f"isl not given: {isl} (median measured context minus osl/2)")
        if osl is None:
            osl = DEFAULT_OSL
            notes.append(f"osl not given: {DEFAULT_OSL}")
        if itl_correction != 1.0:
            notes.append(f"step times multiplied by the live correction factor {itl_correction:.3f}")
        return Inputs(
            itl_ms=itl_ms,
            ttft_ms=ttft_ms,
            isl=isl,
            osl=osl,
            request_rate=request_rate,
            max_gpus=max_gpus,
            decode_context=isl + osl / 2,
            peak_context=isl + osl,
            itl_correction=itl_correction,
            assumptions=notes,
        )

    def _evaluate(
        self, surf: DecodeSurface, inp: Inputs, override: AcceptanceOverride, coverage: float | None
    ) -> _Eval | str:
        tp, method, k = surf.key
        acc = resolve_acceptance(self.profile, method, k, override, coverage)
        if isinstance(acc, str):
            return acc
        tps, src = acc
        ctx = inp.decode_context
        flags: list[str] = []
        if not surf.context_range.contains(ctx):
            flags.append(
                f"decode context {ctx:g} outside measured [{surf.context_range.lo:g}, "
                f"{surf.context_range.hi:g}]: step time extrapolated linearly in context"
            )
        c, step = self._curve(surf, ctx)
        step = step * inp.itl_correction
        itl = step / tps
        thr = c * tps / (step / 1000.0) / tp
        kv_acc = self._kv_acceptance(method, k, override, coverage) if method != "none" else None
        kv = self._cached(
            ("kv", tp, method, k, inp.isl, inp.peak_context, str(kv_acc)),
            lambda: self.kv_bound(tp, k, inp.peak_context, method, inp.isl, kv_acc),
        )
        ttft = None
        pre = self.surfaces.prefill.get(tp)
        if pre is not None:
            ttft = self._cached(("ttft", tp, inp.isl), lambda: pre.ttft_ms(inp.isl))
            if not pre.input_range.contains(inp.isl):
                flags.append(
                    f"isl {inp.isl} outside measured prefill input lengths [{pre.input_range.lo:g}, "
                    f"{pre.input_range.hi:g}] for tp={tp}: TTFT extrapolated"
                )
        return _Eval(surf.key, c, step, itl, thr, tps, src, kv.max_concurrency, kv, ttft, flags)

    def _choice(self, ev: _Eval, idx: int, inp: Inputs, limited_by: str) -> Choice:
        tp, method, k = ev.key
        c = int(ev.c[idx])
        pred = Prediction(
            itl_ms=float(ev.itl[idx]),
            step_ms=float(ev.step[idx]),
            tokens_per_step=ev.tps,
            throughput_per_gpu=float(ev.thr[idx]),
            ttft_ms=ev.ttft,
        )
        flags = list(ev.flags)
        if limited_by == "measured_range":
            flags.append(
                f"concurrency {c} is the largest measured at this context; the SLA and KV would "
                "admit more (not extrapolated: measure higher concurrency)"
            )
        args = ["--tensor-parallel-size", str(tp), "--max-num-seqs", str(c)]
        if method != "none":
            args += ["--speculative-config", _spec_config_json(method, k, self._drafter(method))]
            if method != "ngram" and not self._drafter(method):
                flags.append(f'no drafter recorded for {method}: add "model" to --speculative-config')
        args += ["--max-model-len", str(inp.peak_context)]
        model = served_model(self.profile.metadata.model.name)
        return Choice(
            tp=tp,
            method=method,
            k=k,
            max_concurrency=c,
            limited_by=limited_by,
            predicted=pred,
            kv=ev.kv.at(c),
            acceptance_source=None if method == "none" else ev.acc_source,
            vllm_serve_args=args,
            vllm_serve_command=shlex.join(["vllm", "serve", model, *args]),
            flags=flags,
        )

    def _replicas(self, tp: int, concurrency: int, itl_ms: float, inp: Inputs) -> Replicas | None:
        if inp.request_rate is None:
            return None
        per_replica = concurrency / (inp.osl * itl_ms / 1000.0)
        decode = math.ceil(inp.request_rate / per_replica - 1e-9)
        pre = self.surfaces.prefill.get(tp)
        ptps = self._cached(("ptps", tp, inp.isl), lambda: pre.tokens_per_s_per_gpu(inp.isl)) if pre else None
        prefill = math.ceil(inp.request_rate * inp.isl / (ptps * tp) - 1e-9) if ptps else None
        gpus_prefill = prefill * tp if prefill is not None else None
        return Replicas(
            request_rate=inp.request_rate,
            decode_requests_per_s_per_replica=per_replica,
            decode_replicas=decode,
            prefill_tokens_per_s_per_gpu=ptps,
            prefill_replicas=prefill,
            gpus_decode=decode * tp,
            gpus_prefill=gpus_prefill,
            gpus_total=decode * tp + (gpus_prefill or 0),
        )

    def breakeven(self, tp: int, method: str, k: int, evals: dict[ConfigKey, _Eval]) -> Breakeven:
        """The concurrency from which (method, k) no longer beats no speculation at ``tp`` anywhere
        up to the largest common measured concurrency (None: it still pays there). Measured curves
        can cross more than once (noise, kernel shape changes); operators need the point past which
        running without speculation is never worse, so the last crossing counts, not the first."""
        spec, base = evals.get((tp, method, k)), evals.get((tp, "none", 0))
        if spec is None or base is None:
            raise KeyError((tp, method, k))
        lo = int(max(spec.c[0], base.c[0]))
        hi = int(min(spec.c[-1], base.c[-1]))
        cs = np.arange(lo, hi + 1)
        better = np.flatnonzero(spec.itl[cs - int(spec.c[0])] < base.itl[cs - int(base.c[0])])
        if better.size and better[-1] == cs.size - 1:
            crossing = None
        else:
            crossing = int(cs[better[-1] + 1]) if better.size else lo
        return Breakeven(tp=tp, method=method, k=k, concurrency=crossing, checked_up_to=hi)

    def _breakeven_for(self, ch: Choice, evals: dict[ConfigKey, _Eval]) -> Breakeven | None:
        if (ch.tp, "none", 0) not in evals:
            return None
        if ch.method != "none":
            return self.breakeven(ch.tp, ch.method, ch.k, evals)
        # chosen without speculation: say where the fastest speculative config at this tp stops paying
        specs = [e for key, e in evals.items() if key[0] == ch.tp and key[1] != "none"]
        if not specs:
            return None
        best = min(specs, key=lambda e: float(np.nanmin(e.itl)))
        return self.breakeven(ch.tp, best.key[1], best.key[2], evals)

    def evaluations(self, inp: Inputs) -> dict[ConfigKey, _Eval]:
        """Every config that has acceptance, evaluated over its measured concurrency range."""
        out = {}
        for key, surf in self.surfaces.decode.items():
            ev = self._evaluate(surf, inp, None, None)
            if not isinstance(ev, str):
                out[key] = ev
        return out

    def curves(self, inp: Inputs) -> dict[ConfigKey, tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
        """(concurrency, ITL ms, throughput/GPU, KV max concurrency) per config with acceptance."""
        return {key: (ev.c, ev.itl, ev.thr, ev.c_kv) for key, ev in self.evaluations(inp).items()}

    # ------------------------------------------------------------------ entry point
    def plan(
        self,
        itl_ms: float,
        ttft_ms: float | None = None,
        isl: int | None = None,
        osl: int | None = None,
        request_rate: float | None = None,
        max_gpus: int | None = None,
        acceptance: AcceptanceOverride = None,
        *,
        draft_coverage: float | None = None,
        itl_correction: float = 1.0,
        alternatives: int = 3,
    ) -> PlanResult:
        """The feasible config with the highest throughput per GPU; see the module docstring."""
        is_number = isinstance(acceptance, float | int) and not isinstance(acceptance, bool)
        if is_number and not 0.0 <= acceptance <= 1.0:  # type: ignore[operator]
            raise PlanInputError("acceptance", acceptance, "must be within [0, 1]")
        if draft_coverage is not None and not 0.0 <= draft_coverage <= 1.0:
            raise PlanInputError("draft_coverage", draft_coverage, "must be within [0, 1]")
        inp = self.resolve_inputs(itl_ms, ttft_ms, isl, osl, request_rate, max_gpus, itl_correction)
        evals: dict[ConfigKey, _Eval] = {}
        rejected: list[Rejected] = []
        lowest: tuple[float, _Eval, int] | None = None
        feasible: list[tuple[float, _Eval, int, str, Replicas | None]] = []
        for key, surf in self.surfaces.decode.items():
            tp, method, k = key
            ev = self._evaluate(surf, inp, acceptance, draft_coverage)
            if isinstance(ev, str):
                rejected.append(Rejected(tp=tp, method=method, k=k, reason=ev))
                continue
            evals[key] = ev
            fits_kv = ev.c <= ev.c_kv
            valid = fits_kv & np.isfinite(ev.itl)
            if not valid.any():
                rejected.append(
                    Rejected(
                        tp=tp, method=method, k=k,
                        reason=f"KV holds {ev.c_kv} sequences at context {inp.peak_context} with k={k}, "
                        f"below the smallest measured concurrency {int(ev.c[0])}",
                    )
                )  # fmt: skip
                continue
            i_min = int(np.argmin(np.where(valid, ev.itl, np.inf)))
            best_itl = float(ev.itl[i_min])
            if (max_gpus is None or tp <= max_gpus) and (lowest is None or best_itl < lowest[0]):
                lowest = (best_itl, ev, i_min)
            reason = None
            if max_gpus is not None and tp > max_gpus:
                reason = f"tp={tp} exceeds max_gpus={max_gpus}"
            elif inp.ttft_ms is not None and ev.ttft is not None and ev.ttft > inp.ttft_ms:
                reason = f"TTFT {ev.ttft:.1f} ms at isl={inp.isl} exceeds ttft_ms={inp.ttft_ms:g}"
            elif inp.ttft_ms is not None and ev.ttft is None:
                reason = f"no prefill measured for tp={tp}: cannot check ttft_ms"
            ok = valid & (ev.itl <= inp.itl_ms)
            if reason is None and not ok.any():
                reason = f"lowest ITL {best_itl:.2f} ms exceeds itl_ms={inp.itl_ms:g}"
            if reason is not None:
                rejected.append(Rejected(tp=tp, method=method, k=k, reason=reason, best_itl_ms=best_itl))
                continue
            thr = np.where(ok, ev.thr, -np.inf)
            idx = int(np.flatnonzero(thr == thr.max())[-1])
            last_ok = int(np.flatnonzero(ok)[-1])
            if idx < last_ok:
                limited = "throughput"
            elif idx == len(ev.c) - 1:
                limited = "measured_range"
            elif not fits_kv[idx + 1]:
                limited = "kv"
            else:
                limited = "sla"
            reps = self._replicas(tp, int(ev.c[idx]), float(ev.itl[idx]), inp)
            if max_gpus is not None and reps is not None and reps.gpus_total > max_gpus:
                rejected.append(
                    Rejected(
                        tp=tp, method=method, k=k, best_itl_ms=best_itl,
                        reason=f"request_rate={inp.request_rate:g} needs {reps.gpus_total} GPUs "
                        f"> max_gpus={max_gpus}",
                    )
                )  # fmt: skip
                continue
            feasible.append((float(ev.thr[idx]), ev, idx, limited, reps))
        feasible.sort(key=lambda f: (-f[0], f[1].key[0], f[1].key[2]))
        choices = []
        for _, ev, idx, limited, reps in feasible[: 1 + alternatives]:
            ch = self._choice(ev, idx, inp, limited)
            ch.replicas = reps
            choices.append(ch)
        meta = self.profile.metadata
        common = {
            "profile": self.name,
            "source": meta.source,
            "warning": SYNTHETIC_WARNING if meta.source == "synthetic" else None,
            "model": meta.model.name,
            "hardware": f"{meta.hardware.gpu_name} x{meta.hardware.gpu_count}",
            "inputs": inp,
            "rejected": rejected,
        }
        if choices:
            best = choices[0]
            best.speculation_breakeven = self._breakeven_for(best, evals)
            return PlanResult(
                feasible=True,
                choice=best,
                alternatives=choices[1:],
                lowest_achievable_itl_ms=lowest[0] if lowest else None,
                message=(
                    f"tp={best.tp} {best.method} k={best.k} at up to {best.max_concurrency} concurrent "
                    f"sequences per replica: ITL {best.predicted.itl_ms:.2f} ms, "
                    f"{best.predicted.throughput_per_gpu:.0f} tok/s/GPU"
                ),
                **common,
            )
        choice = None
        if lowest is not None:
            _, ev, i_min = lowest
            choice = self._choice(ev, i_min, inp, "sla")
            choice.speculation_breakeven = self._breakeven_for(choice, evals)
            choice.replicas = self._replicas(choice.tp, choice.max_concurrency, choice.predicted.itl_ms, inp)
        return PlanResult(
            feasible=False,
            choice=choice,
            lowest_achievable_itl_ms=lowest[0] if lowest else None,
            message=(
                f"infeasible: the lowest achievable ITL is {lowest[0]:.2f} ms "
                f"(tp={choice.tp} {choice.method} k={choice.k} at concurrency {choice.max_concurrency})"
                if lowest and choice
                else "infeasible: no configuration of this profile can run the requested context"
            ),
            **common,
        )
