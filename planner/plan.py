"""Choose (tp, method, k, max concurrency, replicas) under an ITL/TTFT SLA from a profile's surfaces.

For every measured (tp, method, k) the planner evaluates the interpolated step time at every integer
concurrency of the measured range, at the mean decode context ``isl + osl / 2``; ITL is step time over
tokens per step (from acceptance), throughput per GPU is ``c * tokens_per_step / step / tp``. A
concurrency is feasible when its ITL meets the SLA and the KV pool holds that many sequences at the
peak context ``isl + osl`` with ``k`` lookahead slots each (``kvbm.capacity``); TTFT (prefill of ``isl``)
must meet ``ttft_ms`` when given. The answer is the feasible configuration with the highest decode
throughput per GPU, at the concurrency that maximises it.

Acceptance comes from live counters > a given value > the profile's measurement for the workload > the
literature prior (``resolve_acceptance``), and its source is part of every answer. A context beyond the
model's maximum is infeasible rather than extrapolated; an infeasible answer names its binding limit and
carries no serve command. A speculative choice also gets the best k per batch size (planner.schedule).
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, Field, PrivateAttr

from common.methods import DRAFTER_METHODS
from common.metrics import tokens_per_step as _tokens_per_step
from kvbm import capacity
from planner.commands import engine_args, join, lookup_window, model_max_context, served_model, vllm_args
from planner.priors import MIX, check_workload, load_priors, prior_acceptance, prior_drafter, workloads
from planner.profile import Acceptance, AcceptanceSource, Profile
from planner.schedule import GPU_NOTE, KCurve, Schedule, k_schedule
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
    workload: str = Field(default="mix", description="Spec-Bench category the acceptance is for; mix = all")
    assumptions: list[str] = Field(default_factory=list)


class Prediction(BaseModel):
    itl_ms: float
    step_ms: float
    tokens_per_step: float
    throughput_per_gpu: float = Field(description="decode output tokens/s per GPU")
    ttft_ms: float | None = Field(default=None, description="prefill of isl tokens, unloaded")
    prefill_stall_ms: float = Field(
        default=0.0,
        description="part of itl_ms: the prefills of arriving requests, which run in the decode batch's "
        "steps (concurrency x ttft_ms / osl per output token); 0 without prefill points",
    )


def prefill_stall_ms(concurrency: np.ndarray, ttft_ms: float | None, osl: int) -> np.ndarray:
    """ITL each request pays for the prefills of the others (aggregated serving, as ``vllm serve`` and
    ``engine serve`` run): with ``c`` requests in flight, each producing ``osl`` tokens, a new request
    arrives every ``osl / c`` output tokens of one request, and its prefill (``ttft_ms``, measured
    unloaded) holds every decoding request's next token back for about that long. Per output token:
    ``c * ttft_ms / osl``. Short outputs at high concurrency make it the largest part of ITL (vicuna-7b,
    H200, isl 848, osl 64, c 32: ~11 ms on an 8.6 ms decode step). 0 where no TTFT was measured."""
    if ttft_ms is None or not np.isfinite(ttft_ms):
        return np.zeros_like(concurrency, dtype=float)
    return concurrency * ttft_ms / max(1, osl)


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
    acceptance_kind: str | None = Field(default=None, description="live, given, measured or prior")
    replicas: Replicas | None = None
    speculation_breakeven: Breakeven | None = None
    k_schedule: list[list[int]] | None = Field(
        default=None,
        description="best k per batch-size band [first, last, k] (vLLM "
        "num_speculative_tokens_per_batch_size, engine serve --spec-schedule); null when one k is best "
        "at every concurrency",
    )
    serve_command: str | None = Field(
        default=None, description="command for the backend that was profiled; null for an infeasible plan"
    )
    serve_backend: str | None = Field(default=None, description="'engine' or 'vllm': what serve_command runs")
    vllm_serve_args: list[str] = Field(default_factory=list)
    vllm_serve_command: str | None = Field(
        default=None, description="vLLM command (a translation for an engine profile); null when infeasible"
    )
    flags: list[str] = Field(default_factory=list, description="extrapolation and range warnings")


class Rejected(BaseModel):
    tp: int
    method: str
    k: int
    reason: str
    limit: str = Field(default="sla", description="acceptance, kv, max_gpus, ttft, sla or context")
    meets_itl: bool = Field(default=False, description="ITL SLA met: another limit excluded it")
    best_itl_ms: float | None = None


class MethodSummary(BaseModel):
    """Why a speculative method won, lost or was excluded: the text answer's 'speculation:' section."""

    method: str
    status: str = Field(description="chosen, lost or excluded")
    tp: int | None = None
    k: int | None = None
    max_concurrency: int | None = None
    itl_ms: float | None = None
    throughput_per_gpu: float | None = None
    acceptance_source: str | None = None
    reason: str
    k_schedule: list[list[int]] | None = None


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
    binding: str | None = Field(
        default=None,
        description="what bounds the answer: sla, kv, measured_range, throughput (feasible: what stopped "
        "concurrency); sla, ttft, max_gpus, kv, context or acceptance (infeasible: what excluded it)",
    )
    speculation: list[MethodSummary] = Field(default_factory=list)
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
    acc: ResolvedAcceptance
    c_kv: int
    kv: KvBound
    ttft: float | None
    flags: list[str]
    stall: np.ndarray  # ms per output token the prefills of arriving requests add (prefill_stall_ms)

    @cached_property
    def admitted(self) -> np.ndarray:
        """Concurrencies the KV pool holds whose ITL is finite: the only ones a plan may choose."""
        return (self.c <= self.c_kv) & np.isfinite(self.itl)

    @cached_property
    def lowest_itl_index(self) -> int | None:
        """Index of the lowest ITL among the admitted concurrencies (None: the KV admits none)."""
        if not self.admitted.any():
            return None
        return int(np.argmin(np.where(self.admitted, self.itl, np.inf)))


@dataclass
class _Feasible:
    """A config that meets every limit, at the concurrency that maximises its throughput per GPU."""

    ev: _Eval
    idx: int
    limited_by: str
    replicas: Replicas | None

    @property
    def throughput(self) -> float:
        return float(self.ev.thr[self.idx])


@dataclass
class _Survey:
    """Every config of the profile judged against the inputs: what a plan chooses from and explains."""

    evals: dict[ConfigKey, _Eval] = dataclasses.field(default_factory=dict)
    feasible: list[_Feasible] = dataclasses.field(default_factory=list)  # best first once sorted
    rejected: list[Rejected] = dataclasses.field(default_factory=list)
    lowest: tuple[float, _Eval, int] | None = None  # lowest ITL within max_gpus, its config and index

    def note_lowest(self, ev: _Eval, max_gpus: int | None) -> None:
        """Keep ``ev`` as the lowest-ITL config when it beats the one kept (the first of equals wins)."""
        i = ev.lowest_itl_index
        if i is None or (max_gpus is not None and ev.key[0] > max_gpus):
            return
        if self.lowest is None or float(ev.itl[i]) < self.lowest[0]:
            self.lowest = (float(ev.itl[i]), ev, i)


class ResolvedAcceptance(NamedTuple):
    """Acceptance a plan used for (method, k): tokens per step, its printed source, and the drafter
    settings it was measured or published with (the emitted serve command states exactly these)."""

    tokens_per_step: float
    source: str
    draft_coverage: float | None = None
    kind: str = "none"
    drafter: str | None = None
    drafter_settings: dict[str, str | int | float] | None = None


def _from_entry(acc: Acceptance, k: int) -> ResolvedAcceptance:
    """(method, k) from an entry of the same k, or from the first k positions of a larger k."""
    src = _describe_source(acc.source)
    if acc.k == k:
        tps = acc.tokens_per_step
    else:
        tps = _tokens_per_step(acc.draft_coverage, acc.accepted_per_pos[:k])
        src = f"{src} (first {k} positions of k={acc.k})"
    settings = acc.drafter_settings
    drafter = acc.source.drafter or (str(settings["model"]) if settings and "model" in settings else None)
    return ResolvedAcceptance(tps, src, acc.draft_coverage, acc.source.kind, drafter, settings)


def _pick(candidates: list[Acceptance], k: int) -> ResolvedAcceptance | None:
    for acc in candidates:  # the exact k first, then derived from the smallest larger k
        if acc.k == k:
            return _from_entry(acc, k)
    for acc in sorted(candidates, key=lambda a: a.k):
        if acc.k > k:
            return _from_entry(acc, k)
    return None


def _measured_for_workload(entries: list[Acceptance], k: int, workload: str) -> ResolvedAcceptance | None:
    """A measured acceptance for ``workload``; the mix falls back to the weighted mean of the categories
    measured (weights of the shipped prompt set) when no whole-mix entry exists."""
    if workload != MIX:
        hit = _pick([a for a in entries if a.workload == workload], k)
        whole = None if hit else _pick([a for a in entries if a.workload is None], k)
        return hit or (
            whole._replace(source=f"{whole.source} (whole mix: {workload} not measured)") if whole else None
        )
    whole = _pick([a for a in entries if a.workload is None], k)
    if whole is not None:
        return whole
    weights = load_priors().workload_weights
    parts = [(w, r) for w in weights if (r := _pick([a for a in entries if a.workload == w], k)) is not None]
    if not parts:
        return None
    total = sum(weights[w] for w, _ in parts)
    tps = sum(weights[w] * r.tokens_per_step for w, r in parts) / total
    cov = sum(weights[w] * (r.draft_coverage or 0.0) for w, r in parts) / total
    first = parts[0][1]
    names = ", ".join(w for w, _ in parts)
    src = f"{first.source.split(' (first')[0]}; mix of {names} weighted as the prompt set"
    return first._replace(tokens_per_step=tps, draft_coverage=cov, source=src)


def resolve_acceptance(
    profile: Profile,
    method: str,
    k: int,
    override: AcceptanceOverride,
    coverage: float | None,
    *,
    workload: str | None = None,
    prior_model: str | None = None,
) -> ResolvedAcceptance | str:
    """Tokens per step, coverage and source for (method, k), or the reason there is none.

    Precedence: live (the daemon's override) > given (``acceptance=``) > measured (the profile's entries
    for ``workload``, emitted with the drafter settings they were measured with) > literature prior
    (planner.priors, for the profile's model). A sweep's decode points never stand in for acceptance:
    their sequences decode from random tokens at a forced draft coverage, real weights or not."""
    if method == "none":
        return ResolvedAcceptance(1.0, "none")
    wl = check_workload(workload)
    if _is_number(override):
        return _given(override, k, coverage)  # type: ignore[arg-type]
    measured = [a for a in profile.acceptance if a.method == method]
    hit = (
        _from_override(override, method, k)
        or _measured_for_workload([a for a in measured if a.source.kind != "prior"], k, wl)
        or _measured_for_workload([a for a in measured if a.source.kind == "prior"], k, wl)
    )
    if hit is not None:
        return hit
    prior = prior_acceptance(profile.metadata.model.name, method, k, wl, prior_model)
    if isinstance(prior, str):
        return f"no acceptance for method={method} k={k}: pass acceptance= or measure it ({prior})"
    return _from_entry(prior, k)


def _is_number(override: object) -> bool:
    """A given per-position acceptance rate (a bool is not one)."""
    return isinstance(override, float | int) and not isinstance(override, bool)


def _given(alpha: float, k: int, coverage: float | None) -> ResolvedAcceptance:
    """A given per-position rate ``alpha``: the i-th draft position is accepted at alpha^(i+1)."""
    cov = 1.0 if coverage is None else coverage
    per_pos = [float(alpha) ** (i + 1) for i in range(k)]
    return ResolvedAcceptance(
        _tokens_per_step(cov, per_pos), f"given: alpha={alpha} coverage={cov}", cov, "given"
    )


def _from_override(override: AcceptanceOverride, method: str, k: int) -> ResolvedAcceptance | None:
    """The daemon's entries for ``method``, live counters first."""
    if not isinstance(override, Mapping):
        return None
    entries = [a for a in override.values() if a.method == method]
    for kind in ("live", "given", "measured", "prior"):
        hit = _pick([a for a in entries if a.source.kind == kind], k)
        if hit is not None:
            return hit
    return None


def _describe_source(src: AcceptanceSource) -> str:
    if src.kind == "prior":
        return f"literature prior ({src.citation}): {src.detail}"
    parts = [src.kind] + [f"{n}={v}" for n in ("dataset", "model", "drafter") if (v := getattr(src, n))]
    if src.detail:
        parts.append(src.detail)
    return ", ".join(parts)


# Longest output the ngram KV occupancy model (kvbm.capacity.dynamic_bound) is run for; longer outputs
# get the static worst case. The chain's cost grows with osl squared (osl states over ~2 osl steps).
DYNAMIC_KV_MAX_OSL = 4096
MEMO_BYTES = 64 * 2**20  # per planner: a few hundred step curves of a wide measured range


def _nbytes(value: object) -> int:
    """Approximate memory of a memoised value: its arrays, plus a small constant for the rest."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, tuple):
        return 64 + sum(_nbytes(v) for v in value)
    return 256


class Planner:
    """Plans for one profile; build once (splines are fitted here), call ``plan`` many times."""

    def __init__(self, profile: Profile, name: str = "profile", memo_bytes: int = MEMO_BYTES) -> None:
        self.profile = profile
        self.name = name
        self.surfaces = Surfaces(profile)
        # step curves, TTFT and KV bounds per workload shape: LRU bounded by bytes, shared by the
        # threads a server plans on
        self._memo: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self._memo_limit = memo_bytes
        self.memo_bytes = 0
        self._memo_lock = threading.Lock()
        if not self.surfaces.decode:
            raise ValueError(f"{name}: profile has no successful decode point to plan from")

    # ------------------------------------------------------------------ helpers
    def _cached(self, key: tuple, compute):
        """Memoise pure functions of the profile; evict the least recently used past ``memo_bytes``."""
        with self._memo_lock:
            hit = self._memo.get(key)
            if hit is not None:
                self._memo.move_to_end(key)
                return hit[0]
        value = compute()
        size = _nbytes(value)
        with self._memo_lock:
            if key not in self._memo:
                self._memo[key] = (value, size)
                self.memo_bytes += size
                while self.memo_bytes > self._memo_limit and len(self._memo) > 1:
                    _, (_, freed) = self._memo.popitem(last=False)
                    self.memo_bytes -= freed
        return value

    def _curve(
        self, surf: DecodeSurface, ctx: float, coverage: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every integer concurrency of the measured range at ``ctx`` and its interpolated step time at
        the workload's draft ``coverage`` (None: as measured with every sequence drafting)."""

        def compute() -> tuple[np.ndarray, np.ndarray]:
            lo, hi = surf.concurrency_bounds(ctx)
            c = np.arange(lo, hi + 1, dtype=float)
            return c, surf.step_ms(c, ctx, coverage)

        return self._cached(("curve", surf.key, ctx, coverage), compute)

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
        if _is_number(override):
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
            if context - isl > DYNAMIC_KV_MAX_OSL:  # the occupancy chain costs O(osl^2): keep plans fast
                bound.rule += f" (osl > {DYNAMIC_KV_MAX_OSL}: worst case, every draft at the peak)"
                return bound
            acc = acceptance or self._kv_acceptance(method, k)
            if acc is None:
                bound.rule += " (no acceptance known: worst case, every draft at the peak)"
                return bound
            dyn = capacity.dynamic_bound(
                model,
                blocks,
                meta.block_size,
                isl,
                context - isl,
                k,
                acc[0],
                acc[1],
                method=method,
                up_to=self.surfaces.max_concurrency,
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
        workload: str | None = None,
    ) -> Inputs:
        try:
            wl = check_workload(workload)
        except ValueError:
            raise PlanInputError("workload", workload, f"not one of {', '.join(workloads())}") from None
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
            limit = model_max_context(self.profile.metadata.model.name)
            capped = limit is not None and isl + (osl or DEFAULT_OSL) > limit
            isl = max(1, limit - (osl or DEFAULT_OSL)) if capped else isl  # type: ignore[operator]
            how = "the model's maximum context minus osl" if capped else "median measured context minus osl/2"
            notes.append(f"isl not given: {isl} ({how})")
        if osl is None:
            osl = DEFAULT_OSL
            notes.append(f"osl not given: {DEFAULT_OSL}")
        if workload is None:
            notes.append("workload not given: mix (Spec-Bench categories weighted as the shipped prompt set)")
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
            workload=wl,
            assumptions=notes,
        )

    def _evaluate(
        self,
        surf: DecodeSurface,
        inp: Inputs,
        override: AcceptanceOverride,
        coverage: float | None,
        prior_model: str | None = None,
    ) -> _Eval | str:
        tp, method, k = surf.key
        acc = resolve_acceptance(
            self.profile, method, k, override, coverage, workload=inp.workload, prior_model=prior_model
        )
        if isinstance(acc, str):
            return acc
        tps = acc.tokens_per_step
        ctx = inp.decode_context
        flags: list[str] = []
        if not surf.context_range.contains(ctx):
            flags.append(
                f"decode context {ctx:g} outside measured [{surf.context_range.lo:g}, "
                f"{surf.context_range.hi:g}]: step time extrapolated linearly in context"
            )
        # step time is read at the workload's draft coverage: the given one, else the acceptance's
        coverage_read = None if method == "none" else coverage if coverage is not None else acc.draft_coverage
        c, step = self._curve(surf, ctx, coverage_read)
        step = step * inp.itl_correction
        kv_acc = self._kv_acceptance(method, k, override, coverage) if method != "none" else None
        kv = self._cached(
            ("kv", tp, method, k, inp.isl, inp.peak_context, str(kv_acc)),
            lambda: self.kv_bound(tp, k, inp.peak_context, method, inp.isl, kv_acc),
        )
        ttft = None
        pre = self.surfaces.prefill.get(tp)
        if pre is not None:
            ttft = self._cached(("ttft", tp, inp.isl), lambda: pre.ttft_ms(inp.isl))
            flags.extend(pre.flags)
            if not pre.input_range.contains(inp.isl):
                flags.append(
                    f"isl {inp.isl} outside measured prefill input lengths [{pre.input_range.lo:g}, "
                    f"{pre.input_range.hi:g}] for tp={tp}: TTFT extrapolated"
                )
        stall = prefill_stall_ms(c, ttft, inp.osl) * inp.itl_correction
        itl = step / tps + stall
        thr = c / (itl / 1000.0) / tp
        return _Eval(surf.key, c, step, itl, thr, tps, acc, kv.max_concurrency, kv, ttft, flags, stall)

    def _choice(
        self, ev: _Eval, idx: int, inp: Inputs, limited_by: str, evals: dict[ConfigKey, _Eval] | None = None
    ) -> Choice:
        tp, method, k = ev.key
        c = int(ev.c[idx])
        pred = Prediction(
            itl_ms=float(ev.itl[idx]),
            step_ms=float(ev.step[idx]),
            tokens_per_step=ev.tps,
            throughput_per_gpu=float(ev.thr[idx]),
            ttft_ms=ev.ttft,
            prefill_stall_ms=float(ev.stall[idx]),
        )
        flags = list(ev.flags)
        flags += [
            f"relies on a doubtful point ({f})"
            for f in self.surfaces.decode[ev.key].flags_near(c, inp.decode_context)
        ]
        if limited_by == "measured_range":
            flags.append(
                f"concurrency {c} is the largest measured at this context; the SLA and KV would "
                "admit more (not extrapolated: measure higher concurrency)"
            )
        ch = Choice(
            tp=tp,
            method=method,
            k=k,
            max_concurrency=c,
            limited_by=limited_by,
            predicted=pred,
            kv=ev.kv.at(c),
            acceptance_source=None if method == "none" else ev.acc.source,
            acceptance_kind=None if method == "none" else ev.acc.kind,
            flags=flags,
        )
        if evals is not None and method != "none":
            sched = self.schedule(tp, method, c, inp, evals)
            ch.k_schedule = sched if len({band[2] for band in sched}) > 1 else None
        return ch

    def schedule(
        self, tp: int, method: str, up_to: int, inp: Inputs, evals: dict[ConfigKey, _Eval]
    ) -> Schedule:
        """Best k of ``method`` (or 0: no speculation) per batch size 1..``up_to`` at ``tp``."""
        curves = {
            key[2]: KCurve(ev.c, ev.itl, ev.c_kv)
            for key, ev in evals.items()
            if key[0] == tp and key[1] in (method, "none")
        }
        return k_schedule(curves, up_to, inp.itl_ms)

    def _attach_commands(self, ch: Choice, ev: _Eval, inp: Inputs) -> None:
        """Serve commands for a feasible choice: for the profiled backend, plus a vLLM translation."""
        meta = self.profile.metadata
        acc = ev.acc
        drafter = acc.drafter or self._drafter(ch.method)
        if drafter is None and ch.method in DRAFTER_METHODS:
            drafter = prior_drafter(meta.model.name, ch.method)
            if drafter:
                ch.flags.append(f"drafter {drafter}: the one the literature prior was published with")
        settings = acc.drafter_settings
        sched = ch.k_schedule
        k = max(band[2] for band in sched) if sched else ch.k
        if ch.method == "ngram" and not lookup_window(settings)[1]:
            ch.flags.append(
                "the acceptance records no lookup window: the command states the engine's defaults "
                "prompt_lookup_min=1 prompt_lookup_max=4 explicitly; measure with the window you serve"
            )
        if ch.method in DRAFTER_METHODS and not drafter:
            ch.flags.append(f'no drafter recorded for {ch.method}: name it ("model" in --speculative-config)')
        if sched:
            ch.flags.append(
                f"k schedule {json.dumps(sched, separators=(',', ':'))}: num_speculative_tokens={k} is its "
                f"largest k; {GPU_NOTE}"
            )
        args = vllm_args(ch.tp, ch.max_concurrency, inp.peak_context, ch.method, k, drafter, settings, sched)
        ch.vllm_serve_args = args
        ch.vllm_serve_command = join(["vllm", "serve", served_model(meta.model.name), *args])
        if meta.backend == "engine":
            model = getattr(meta, "served_model", None) or meta.model.name
            ch.serve_backend = "engine"
            ch.serve_command = join(
                engine_args(
                    model, ch.tp, ch.max_concurrency, inp.peak_context, ch.method, k, drafter, settings, sched
                )
            )
            ch.flags.append("vllm_serve_command is a translation: the step times were measured on the engine")
        else:
            ch.serve_backend = "vllm"
            ch.serve_command = ch.vllm_serve_command
            if meta.backend != "vllm":
                ch.flags.append(
                    f"profiled with the {meta.backend} backend: the vLLM command is a translation"
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

    def evaluations(
        self,
        inp: Inputs,
        acceptance: AcceptanceOverride = None,
        draft_coverage: float | None = None,
        prior_model: str | None = None,
    ) -> dict[ConfigKey, _Eval]:
        """Every config that has acceptance (for ``inp.workload``), evaluated over its measured range."""
        candidates = self._candidates(inp, acceptance, draft_coverage, prior_model)
        return {ev.key: ev for ev in candidates if isinstance(ev, _Eval)}

    def curves(
        self, inp: Inputs, acceptance: AcceptanceOverride = None, draft_coverage: float | None = None
    ) -> dict[ConfigKey, tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
        """(concurrency, ITL ms, throughput/GPU, KV max concurrency) per config with acceptance."""
        evals = self.evaluations(inp, acceptance, draft_coverage)
        return {key: (ev.c, ev.itl, ev.thr, ev.c_kv) for key, ev in evals.items()}

    def _context_limit(self, inp: Inputs) -> str | None:
        """Why ``isl + osl`` cannot run on this model (beyond its maximum position), or None."""
        name = self.profile.metadata.model.name
        limit = model_max_context(name)
        if limit is not None and inp.peak_context > limit:
            return (
                f"context isl+osl={inp.peak_context} exceeds {name}'s maximum of {limit} tokens "
                f"(configs/models/{name}.yaml max_position_embeddings): not extrapolated"
            )
        return None

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
        workload: str | None = None,
        prior_model: str | None = None,
    ) -> PlanResult:
        """The feasible config with the highest throughput per GPU; see the module docstring.

        Steps: check the inputs; evaluate every measured config (candidates); judge each against the
        SLA, TTFT, KV and GPU limits, naming the binding one; choose by throughput per GPU; size the
        replicas; explain per speculative method why it won, lost or was excluded."""
        _check_acceptance_inputs(acceptance, draft_coverage, prior_model)
        inp = self.resolve_inputs(itl_ms, ttft_ms, isl, osl, request_rate, max_gpus, itl_correction, workload)
        header = self._header(inp)
        too_long = self._context_limit(inp)
        if too_long is not None:
            return PlanResult(
                feasible=False,
                choice=None,
                binding="context",
                message=f"infeasible (context): {too_long}",
                **header,
            )
        survey = self._survey(inp, acceptance, draft_coverage, prior_model)
        choices = self._choose(survey, inp, alternatives)
        if choices:
            return self._feasible_result(choices, survey, inp, header)
        return self._infeasible_result(survey, inp, header)

    def _header(self, inp: Inputs) -> dict[str, object]:
        """The fields every answer carries, feasible or not: which profile, its provenance, the inputs."""
        meta = self.profile.metadata
        return {
            "profile": self.name,
            "source": meta.source,
            "warning": SYNTHETIC_WARNING if meta.source == "synthetic" else None,
            "model": meta.model.name,
            "hardware": f"{meta.hardware.gpu_name} x{meta.hardware.gpu_count}",
            "inputs": inp,
        }

    def _candidates(
        self,
        inp: Inputs,
        acceptance: AcceptanceOverride,
        draft_coverage: float | None,
        prior_model: str | None,
    ) -> Iterator[_Eval | Rejected]:
        """Every measured (tp, method, k) evaluated over its measured range, or rejected for want of
        acceptance."""
        for (tp, method, k), surf in self.surfaces.decode.items():
            ev = self._evaluate(surf, inp, acceptance, draft_coverage, prior_model)
            if isinstance(ev, str):
                yield Rejected(tp=tp, method=method, k=k, reason=ev, limit="acceptance")
            else:
                yield ev

    def _survey(
        self,
        inp: Inputs,
        acceptance: AcceptanceOverride,
        draft_coverage: float | None,
        prior_model: str | None,
    ) -> _Survey:
        """Every candidate judged: feasible ones sorted best first, rejected ones with their reason."""
        survey = _Survey()
        for ev in self._candidates(inp, acceptance, draft_coverage, prior_model):
            if isinstance(ev, Rejected):
                survey.rejected.append(ev)
                continue
            survey.evals[ev.key] = ev
            survey.note_lowest(ev, inp.max_gpus)
            verdict = self._judge(ev, inp)
            if isinstance(verdict, Rejected):
                survey.rejected.append(verdict)
            else:
                survey.feasible.append(verdict)
        survey.feasible.sort(key=lambda f: (-f.throughput, f.ev.key[0], f.ev.key[2]))
        return survey

    def _judge(self, ev: _Eval, inp: Inputs) -> _Feasible | Rejected:
        """Whether one config meets every limit; a rejection names the binding one."""
        tp, method, k = ev.key
        i_min = ev.lowest_itl_index
        if i_min is None:
            return Rejected(
                tp=tp, method=method, k=k, limit="kv",
                reason=f"KV holds {ev.c_kv} sequences at context {inp.peak_context} with k={k}, "
                f"below the smallest measured concurrency {int(ev.c[0])}",
            )  # fmt: skip
        best_itl = float(ev.itl[i_min])
        ok = ev.admitted & (ev.itl <= inp.itl_ms)
        meets = bool(ok.any())
        excluded = _excluded_by(ev, inp, best_itl, meets)
        if excluded is not None:
            reason, limit = excluded
            return Rejected(
                tp=tp, method=method, k=k, reason=reason, limit=limit, meets_itl=meets, best_itl_ms=best_itl
            )
        idx, limited_by = _operating_point(ev, ok)
        reps = self._replicas(tp, int(ev.c[idx]), float(ev.itl[idx]), inp)
        if inp.max_gpus is not None and reps is not None and reps.gpus_total > inp.max_gpus:
            return Rejected(
                tp=tp, method=method, k=k, best_itl_ms=best_itl, limit="max_gpus", meets_itl=True,
                reason=f"request_rate={inp.request_rate:g} needs {reps.gpus_total} GPUs "
                f"> max_gpus={inp.max_gpus}",
            )  # fmt: skip
        return _Feasible(ev, idx, limited_by, reps)

    def _choose(self, survey: _Survey, inp: Inputs, alternatives: int) -> list[Choice]:
        """The best feasible config and up to ``alternatives`` runners-up, each with its serve commands."""
        choices = []
        for f in survey.feasible[: 1 + alternatives]:
            ch = self._choice(f.ev, f.idx, inp, f.limited_by, survey.evals)
            ch.replicas = f.replicas
            self._attach_commands(ch, f.ev, inp)
            choices.append(ch)
        return choices

    def _feasible_result(
        self, choices: list[Choice], survey: _Survey, inp: Inputs, header: dict[str, object]
    ) -> PlanResult:
        best = choices[0]
        best.speculation_breakeven = self._breakeven_for(best, survey.evals)
        return PlanResult(
            feasible=True,
            choice=best,
            alternatives=choices[1:],
            lowest_achievable_itl_ms=survey.lowest[0] if survey.lowest else None,
            rejected=survey.rejected,
            binding=best.limited_by,
            speculation=self._speculation(best, survey, inp),
            message=(
                f"tp={best.tp} {best.method} k={best.k} at up to {best.max_concurrency} concurrent "
                f"sequences per replica: ITL {best.predicted.itl_ms:.2f} ms, "
                f"{best.predicted.throughput_per_gpu:.0f} tok/s/GPU "
                f"(concurrency bound: {LIMIT_LABELS.get(best.limited_by, best.limited_by)})"
            ),
            **header,  # type: ignore[arg-type]
        )

    def _infeasible_result(self, survey: _Survey, inp: Inputs, header: dict[str, object]) -> PlanResult:
        """No config meets every limit: the lowest-ITL one for reference (no command, no replicas)."""
        choice = None
        if survey.lowest is not None:
            _, ev, i_min = survey.lowest
            choice = self._choice(ev, i_min, inp, "sla")
            choice.speculation_breakeven = self._breakeven_for(choice, survey.evals)
        binding, message = self._why_infeasible(survey.rejected, inp, survey.lowest)
        return PlanResult(
            feasible=False,
            choice=choice,
            lowest_achievable_itl_ms=survey.lowest[0] if survey.lowest else None,
            rejected=survey.rejected,
            binding=binding,
            speculation=self._speculation(None, survey, inp),
            message=message,
            **header,  # type: ignore[arg-type]
        )

    def _why_infeasible(
        self, rejected: list[Rejected], inp: Inputs, lowest: tuple[float, _Eval, int] | None
    ) -> tuple[str, str]:
        """The binding limit of an infeasible plan and a headline that names it."""
        blocked = [r for r in rejected if r.meets_itl]
        if blocked:  # the ITL SLA can be met: another limit excluded every config that meets it
            first = min(blocked, key=lambda r: r.best_itl_ms or math.inf)
            return first.limit, (
                f"infeasible ({LIMIT_LABELS[first.limit]}): {len(blocked)} configuration(s) meet "
                f"ITL <= {inp.itl_ms:g} ms, but {first.reason} (tp={first.tp} {first.method} k={first.k})"
            )
        if lowest is not None:
            best_itl, ev, i_min = lowest
            tp, method, k = ev.key
            return "sla", (
                f"infeasible (ITL SLA): the lowest achievable ITL is {best_itl:.2f} ms "
                f"(tp={tp} {method} k={k} at concurrency {int(ev.c[i_min])}) > itl_ms={inp.itl_ms:g}"
            )
        limits = {r.limit for r in rejected}
        if limits == {"acceptance"}:
            return "acceptance", f"infeasible (acceptance): {rejected[0].reason}"
        if "kv" in limits:
            kv = next(r for r in rejected if r.limit == "kv")
            return "kv", f"infeasible (KV): {kv.reason}"
        first = rejected[0] if rejected else None
        return (first.limit if first else "sla"), (
            f"infeasible ({LIMIT_LABELS.get(first.limit, first.limit)}): {first.reason}"
            if first
            else "infeasible: no configuration of this profile can run the requested context"
        )

    def _speculation(self, best: Choice | None, survey: _Survey, inp: Inputs) -> list[MethodSummary]:
        """Per speculative method in the profile: its best config and why it won, lost or was excluded."""
        out = []
        for method in sorted({key[1] for key in self.surfaces.decode} - {"none"}):
            mine = next((f for f in survey.feasible if f.ev.key[1] == method), None)  # sorted best first
            if mine is not None:
                out.append(self._method_feasible(mine, best, survey.evals, inp))
                continue
            rej = [r for r in survey.rejected if r.method == method]
            if rej:
                out.append(_method_excluded(method, rej, survey.evals))
        return out

    def _method_feasible(
        self, mine: _Feasible, best: Choice | None, evals: dict[ConfigKey, _Eval], inp: Inputs
    ) -> MethodSummary:
        """A method with a feasible config: chosen, or lost to ``best`` on throughput per GPU."""
        ev, idx, thr = mine.ev, mine.idx, mine.throughput
        tp, method, k = ev.key
        sched = self.schedule(tp, method, int(ev.c[idx]), inp, evals)
        common = dict(
            method=method, tp=tp, k=k, max_concurrency=int(ev.c[idx]), itl_ms=float(ev.itl[idx]),
            throughput_per_gpu=thr, acceptance_source=ev.acc.source,
            k_schedule=sched if len({b[2] for b in sched}) > 1 else None,
        )  # fmt: skip
        assert best is not None  # a feasible config exists, so a choice was made
        if (best.tp, best.method, best.k) == ev.key:
            return MethodSummary(status="chosen", reason="highest throughput per GPU", **common)
        reason = (
            f"lost to {best.method} k={best.k} (tp={best.tp}): {thr:.0f} vs "
            f"{best.predicted.throughput_per_gpu:.0f} tok/s/GPU within the SLA"
        )
        return MethodSummary(status="lost", reason=reason, **common)


def _method_excluded(method: str, rej: list[Rejected], evals: dict[ConfigKey, _Eval]) -> MethodSummary:
    """A method every config of which was rejected: its lowest-ITL config and what excluded it."""
    scored = [r for r in rej if r.best_itl_ms is not None]
    top = min(scored, key=lambda r: r.best_itl_ms) if scored else rej[0]  # type: ignore[arg-type,return-value]
    ev = evals.get((top.tp, method, top.k))
    ks = sorted({r.k for r in rej})
    return MethodSummary(
        method=method, status="excluded", tp=top.tp, k=top.k, itl_ms=top.best_itl_ms,
        acceptance_source=ev.acc.source if ev else None,
        reason=f"k={ks[0]}..{ks[-1]} excluded; best k={top.k}: {top.reason}",
    )  # fmt: skip


def _check_acceptance_inputs(
    acceptance: AcceptanceOverride, draft_coverage: float | None, prior_model: str | None
) -> None:
    """Reject an acceptance, coverage or prior model a plan cannot use, naming the field."""
    if _is_number(acceptance) and not 0.0 <= acceptance <= 1.0:  # type: ignore[operator]
        raise PlanInputError("acceptance", acceptance, "must be within [0, 1]")
    if draft_coverage is not None and not 0.0 <= draft_coverage <= 1.0:
        raise PlanInputError("draft_coverage", draft_coverage, "must be within [0, 1]")
    if prior_model is not None and prior_model not in load_priors().models:
        known = ", ".join(sorted(load_priors().models))
        raise PlanInputError("prior_model", prior_model, f"no literature prior for it; known: {known}")


def _excluded_by(ev: _Eval, inp: Inputs, best_itl: float, meets_itl: bool) -> tuple[str, str] | None:
    """(reason, limit) of the first limit that excludes a config the KV admits, or None: max_gpus, then
    TTFT, then the ITL SLA."""
    tp = ev.key[0]
    if inp.max_gpus is not None and tp > inp.max_gpus:
        return f"tp={tp} exceeds max_gpus={inp.max_gpus}", "max_gpus"
    if inp.ttft_ms is not None and ev.ttft is not None and ev.ttft > inp.ttft_ms:
        return f"TTFT {ev.ttft:.1f} ms at isl={inp.isl} exceeds ttft_ms={inp.ttft_ms:g}", "ttft"
    if inp.ttft_ms is not None and ev.ttft is None:
        return f"no prefill measured for tp={tp}: cannot check ttft_ms", "ttft"
    if not meets_itl:
        return f"lowest ITL {best_itl:.2f} ms exceeds itl_ms={inp.itl_ms:g}", "sla"
    return None


def _operating_point(ev: _Eval, ok: np.ndarray) -> tuple[int, str]:
    """The concurrency index with the highest throughput among ``ok`` (the largest on ties), and what
    stopped concurrency there: the throughput peak, the measured range, the KV pool or the SLA."""
    thr = np.where(ok, ev.thr, -np.inf)
    idx = int(np.flatnonzero(thr == thr.max())[-1])
    if idx < int(np.flatnonzero(ok)[-1]):
        return idx, "throughput"
    if idx == len(ev.c) - 1:
        return idx, "measured_range"
    if ev.c[idx + 1] > ev.c_kv:
        return idx, "kv"
    return idx, "sla"


LIMIT_LABELS = {
    "sla": "ITL SLA",
    "ttft": "TTFT",
    "max_gpus": "max_gpus",
    "kv": "KV",
    "context": "context",
    "acceptance": "acceptance",
    "measured_range": "largest measured concurrency",
    "throughput": "throughput peak",
}
