"""The correction loop: scrape, take a window of deltas, correct ITL and acceptance, re-plan, decide.

Per window (two consecutive good scrapes):
- observed ITL = ITL-histogram sum / (generated tokens - first tokens): the sum of a request's gaps is
  ``last - first token time`` whether the engine observes one gap per token or one per step, so this is
  the per-token ITL of the shared definition (common.metrics). First tokens = TTFT observations.
- decode steps = generated - accepted - first tokens (vLLM counts only steps that carried a draft);
  live draft coverage = drafts / decode steps, acceptance given a draft = accepted_per_pos / drafts,
  accumulated over all windows since the daemon started (reset-safe).
- predicted ITL = interpolated step time at the observed concurrency and context / the window's own
  tokens per step (decode tokens / decode steps of that window, not the cumulative figure, which lags
  whenever acceptance moves), so the factor captures step-time error only; it is smoothed with an
  exponential moving average.
Every observation is checked before it counts: a scrape with a NaN, infinite or negative counter, a window
whose ITL sum is 0 while tokens were decoded, and a raw factor outside [1/max_factor, max_factor] are
skipped with a warning; a raw factor more than ``outlier_ratio`` away from the smoothed one is held until
``outlier_ratio`` windows in a row agree (a real shift), so one absurd scrape cannot move the factor.
A failed, oversized or empty scrape (no vLLM series) marks the state stale and keeps the last plan; the
next good scrape clears it. An unexpected error in a tick is recorded (stale, ``last_error``) and the loop
goes on; ``/healthz`` shows the stale state. Each tick logs one line (observed vs predicted ITL, factor,
live acceptance, concurrency, context), and the decision is re-sent when the configuration or the
predicted ITL of the plan changes materially (``resend_rel``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from pydantic import BaseModel, Field

from common.metrics import acceptance_given_draft, draft_coverage, tokens_per_step, vllm_decode_steps
from planner.daemon.connectors import Connector, LogConnector
from planner.daemon.scrape import (
    MetricsSnapshot,
    Window,
    fetch_bounded,
    has_series,
    invalid_snapshot,
    invalid_window,
    parse_metrics,
    window,
)
from planner.plan import Planner, PlanResult, prefill_stall_ms, resolve_acceptance
from planner.profile import Acceptance, AcceptanceSource

log = logging.getLogger("planner.daemon")


@dataclass
class DaemonConfig:
    metrics_url: str
    itl_ms: float
    interval_s: float = 10.0
    ttft_ms: float | None = None
    isl: int | None = None
    osl: int | None = None
    request_rate: float | None = None
    max_gpus: int | None = None
    tp: int | None = None  # the running config; default: the uncorrected plan's choice
    method: str | None = None
    k: int | None = None
    smoothing: float = 0.3  # EMA weight of the newest window
    min_tokens: int = 16  # a window with fewer decode tokens does not move the factor
    timeout_s: float = 5.0
    max_factor: float = 10.0  # a raw factor outside [1/max_factor, max_factor] is rejected as absurd
    outlier_ratio: float = 3.0  # raw/smoothed beyond this (either way) is held as an outlier ...
    outlier_windows: int = 3  # ... until this many in a row agree (then it is a real shift)
    resend_rel: float = 0.1  # re-send the decision when the plan's predicted ITL moves by this much
    max_bytes: int = 8 << 20  # a larger /metrics response is refused (vLLM's is ~100 kB)
    plan_kwargs: dict = field(default_factory=dict)


class LiveAcceptance(BaseModel):
    draft_coverage: float
    accepted_per_pos: list[float]
    tokens_per_step: float
    tokens_per_draft: float
    drafts: float
    decode_steps: float


class Observed(BaseModel):
    itl_ms: float | None = None
    concurrency: float | None = None
    context: float | None = None
    kv_usage: float | None = None
    predicted_itl_ms: float | None = None
    raw_factor: float | None = None
    tokens_per_step: float | None = Field(None, description="this window's own decode tokens per step")
    skipped: str | None = Field(None, description="why this window did not move the factor")


class CorrectionState(BaseModel):
    """What ``GET /correction`` shows."""

    enabled: bool = True
    metrics_url: str
    profile: str
    running_config: dict
    interval_s: float
    factor: float = Field(1.0, description="smoothed observed / predicted ITL (1.0 until measured)")
    factor_windows: int = Field(0, description="windows that moved the factor")
    decode_tokens: float = 0
    acceptance: LiveAcceptance | None = None
    last_window: Observed = Field(default_factory=Observed)
    stale: bool = True
    last_success: float | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    scrapes: int = 0
    skipped_windows: int = Field(0, description="windows or scrapes rejected as invalid or outliers")
    loop: str = Field("not started", description="not started | running | stopped")
    counter_resets: int = 0
    notes: list[str] = Field(default_factory=list)
    last_decision: dict | None = None
    connector: str = "log"
    connector_error: str | None = None


class CorrectionDaemon:
    """Owns the scrape loop for one profile's planner; ``corrected_plan`` is what the API serves."""

    def __init__(self, planner: Planner, cfg: DaemonConfig, connector: Connector | None = None) -> None:
        self.planner = planner
        self.cfg = cfg
        self.connector = connector or LogConnector()
        base = planner.plan(**self._sla())
        if cfg.tp is None or cfg.method is None or cfg.k is None:
            if base.choice is None:
                raise ValueError("the profile has no configuration to correct; pass tp, method and k")
            cfg.tp, cfg.method, cfg.k = base.choice.tp, base.choice.method, base.choice.k
        key = (cfg.tp, cfg.method, cfg.k)
        if key not in planner.surfaces.decode:
            raise ValueError(
                f"running config tp={cfg.tp} method={cfg.method} k={cfg.k} is not in the profile"
            )
        self.surface = planner.surfaces.decode[key]
        self.state = CorrectionState(
            metrics_url=cfg.metrics_url,
            profile=planner.name,
            running_config={"tp": cfg.tp, "method": cfg.method, "k": cfg.k},
            interval_s=cfg.interval_s,
            connector=self.connector.name,
        )
        self.corrected: PlanResult = base
        self._prev: MetricsSnapshot | None = None
        self._drafts = 0.0
        self._steps = 0.0
        self._per_pos: dict[int, float] = {}
        self._last_key: tuple | None = None
        self._last_sent_itl: float | None = None
        self._held: list[float] = []  # consecutive outlier raw factors
        self._ticks = 0

    def _sla(self) -> dict:
        c = self.cfg
        return dict(
            itl_ms=c.itl_ms, ttft_ms=c.ttft_ms, isl=c.isl, osl=c.osl,
            request_rate=c.request_rate, max_gpus=c.max_gpus, **c.plan_kwargs,
        )  # fmt: skip

    # ---------------------------------------------------------------- window maths
    def _live_acceptance(self) -> LiveAcceptance | None:
        if self.cfg.method == "none" or self._steps <= 0:
            return None
        k = int(self.cfg.k or 0)
        counts = [self._per_pos.get(i, 0.0) for i in range(k)]
        per_pos = [min(1.0, a) for a in acceptance_given_draft(counts, self._drafts)]
        cov = draft_coverage(self._drafts, self._steps)
        return LiveAcceptance(
            draft_coverage=cov,
            accepted_per_pos=per_pos,
            tokens_per_step=tokens_per_step(cov, per_pos),
            tokens_per_draft=1.0 + sum(per_pos),
            drafts=self._drafts,
            decode_steps=self._steps,
        )

    def _tokens_per_step(self) -> float:
        live = self.state.acceptance
        if live is not None and live.drafts > 0:
            return live.tokens_per_step
        acc = resolve_acceptance(
            self.planner.profile, self.cfg.method or "none", int(self.cfg.k or 0), None, None
        )
        return acc[0] if isinstance(acc, tuple) else 1.0

    def _skip(self, obs: Observed, reason: str) -> None:
        obs.skipped = reason
        self.state.skipped_windows += 1
        log.warning("window skipped: %s", reason)

    def _window_tokens_per_step(self, w: Window, decode_tokens: float) -> float:
        """Decode tokens per decode step in this window alone (vLLM counts only steps with a draft)."""
        if self.cfg.method == "none":
            return 1.0
        if w.accepted is not None and w.generation_tokens is not None:
            steps = vllm_decode_steps(w.generation_tokens, w.accepted, w.ttft_count or 0.0)
            if steps > 0:
                return max(1.0, decode_tokens / steps)
        return self._tokens_per_step()

    def observe(self, w: Window) -> None:
        """Fold one window into the live acceptance and the correction factor."""
        st = self.state
        obs = Observed(concurrency=w.running, kv_usage=w.kv_usage)
        st.last_window = obs
        bad = invalid_window(w)
        if bad:
            self._skip(obs, bad)
            return
        first = w.ttft_count or 0.0
        gen = w.generation_tokens
        if w.drafts is not None and w.accepted is not None and gen is not None:
            steps = vllm_decode_steps(gen, w.accepted, first)
            self._drafts += w.drafts
            self._steps += steps
            for p, v in w.accepted_per_pos.items():
                self._per_pos[p] = self._per_pos.get(p, 0.0) + v
        st.acceptance = self._live_acceptance()
        decode_tokens = (gen - first) if gen is not None else w.itl_count
        if w.itl_sum is None or not decode_tokens or decode_tokens <= 0:
            return
        if w.itl_sum <= 0:
            self._skip(obs, f"ITL sum {w.itl_sum:g} s over {decode_tokens:g} decode tokens")
            return
        st.decode_tokens += decode_tokens
        obs.itl_ms = 1000.0 * w.itl_sum / decode_tokens
        sla = self.planner.resolve_inputs(**_inputs_only(self._sla()))
        ctx, isl, osl = sla.decode_context, float(sla.isl), float(sla.osl)
        if w.prompt_tokens and first > 0:
            out_len = (gen / w.request_success) if (gen and w.request_success) else 0.0
            isl = w.prompt_tokens / first
            ctx, osl = isl + out_len / 2, out_len or osl
        obs.context = ctx
        if decode_tokens < self.cfg.min_tokens or not w.running or w.running < 1:
            return
        notes = []
        measured = self.surface.context_range
        if not measured.contains(ctx):
            notes.append(f"window context {ctx:.0f} outside the measured [{measured.lo:g}, {measured.hi:g}]: "
                         "the prediction is extrapolated")  # fmt: skip
            log.warning("%s", notes[-1])
        lo, hi = self.surface.concurrency_bounds(ctx)
        c = float(np.clip(w.running, lo, hi))
        if c != w.running:
            notes.append(
                f"observed concurrency {w.running:g} outside measured [{lo}, {hi}]: predicted at {c:g}"
            )
        st.notes = notes
        step = float(self.surface.step_ms(c, ctx)[0])
        if not np.isfinite(step) or step <= 0:
            return
        obs.tokens_per_step = self._window_tokens_per_step(w, decode_tokens)
        pre = self.planner.surfaces.prefill.get(self.surface.key[0])
        stall = prefill_stall_ms(np.array([c]), pre.ttft_ms(isl) if pre else None, round(osl))[0]
        obs.predicted_itl_ms = step / obs.tokens_per_step + float(stall)  # as the plan predicts ITL
        obs.raw_factor = obs.itl_ms / obs.predicted_itl_ms
        self._fold_factor(obs)

    def _fold_factor(self, obs: Observed) -> None:
        """Bound, screen for outliers, then smooth ``obs.raw_factor`` into the factor."""
        st, cfg = self.state, self.cfg
        raw = float(obs.raw_factor or 0.0)
        if not (1.0 / cfg.max_factor <= raw <= cfg.max_factor):
            bounds = f"[{1 / cfg.max_factor:g}, {cfg.max_factor:g}]"
            seen = f"observed ITL {obs.itl_ms:.4g} ms vs predicted {obs.predicted_itl_ms:.4g} ms"
            self._skip(obs, f"raw factor {raw:.4g} outside {bounds} ({seen})")
            return
        if st.factor_windows >= cfg.outlier_windows and not (
            1.0 / cfg.outlier_ratio <= raw / st.factor <= cfg.outlier_ratio
        ):
            self._held.append(raw)
            if len(self._held) < cfg.outlier_windows:
                run = f"{len(self._held)} in a row; {cfg.outlier_windows} make a shift"
                self._skip(
                    obs, f"raw factor {raw:.4g} is an outlier against the smoothed {st.factor:.4g} ({run})"
                )
                return
            st.factor = float(np.median(self._held))  # a real shift: start again from its level
            log.warning(
                "correction factor shifted to %.3f (%d windows in a row agree)", st.factor, len(self._held)
            )
            self._held = []
            st.factor_windows += 1
            return
        self._held = []
        a = cfg.smoothing
        st.factor = raw if st.factor_windows == 0 else a * raw + (1 - a) * st.factor
        st.factor_windows += 1

    # ---------------------------------------------------------------- planning + decisions
    def live_override(self) -> dict | None:
        """Live acceptance of the running (method, k) as a plan() acceptance override, if measured."""
        acc = None
        live = self.state.acceptance
        if live is not None and live.drafts > 0 and self.cfg.method and self.cfg.k:
            acc = {
                (self.cfg.method, self.cfg.k): Acceptance(
                    method=self.cfg.method,  # type: ignore[arg-type]
                    k=self.cfg.k,
                    draft_coverage=live.draft_coverage,
                    accepted_per_pos=live.accepted_per_pos,
                    source=AcceptanceSource(kind="live", detail=self.cfg.metrics_url),
                    samples=int(live.decode_steps),
                )
            }
        return acc

    def replan(self) -> PlanResult:
        acc = self.live_override()
        self.corrected = self.planner.plan(**self._sla(), acceptance=acc, itl_correction=self.state.factor)
        return self.corrected

    def decision(self) -> dict:
        res = self.corrected
        ch = res.choice
        rep = ch.replicas if ch else None
        return {
            "time": time.time(),
            "profile": res.profile,
            "feasible": res.feasible,
            "tp": ch.tp if ch else None,
            "method": ch.method if ch else None,
            "k": ch.k if ch else None,
            "max_num_seqs": ch.max_concurrency if ch else None,
            "decode_replicas": rep.decode_replicas if rep else None,
            "prefill_replicas": rep.prefill_replicas if rep else None,
            "gpus_total": rep.gpus_total if rep else None,
            "predicted_itl_ms": ch.predicted.itl_ms if ch else None,
            "correction_factor": self.state.factor,
            "tokens_per_step": self.state.acceptance.tokens_per_step if self.state.acceptance else None,
            "vllm_serve_command": ch.vllm_serve_command if ch else None,
            "message": res.message,
        }

    def _itl_moved(self, itl: float | None) -> bool:
        last = self._last_sent_itl
        if itl is None or last is None:
            return itl != last
        return abs(itl - last) > self.cfg.resend_rel * last

    async def _emit_if_changed(self) -> None:
        d = self.decision()
        key = tuple(d[n] for n in ("feasible", "tp", "method", "k", "max_num_seqs", "decode_replicas",
                                   "prefill_replicas"))  # fmt: skip
        if key == self._last_key and not self._itl_moved(d["predicted_itl_ms"]):
            return
        try:
            await self.connector.emit(d)
        except Exception as exc:  # a broken callback must not stop the loop; retried on the next tick
            self.state.connector_error = f"{type(exc).__name__}: {exc}"
            log.warning("connector %s failed: %s", self.connector.name, exc)
            return
        self.state.connector_error = None
        self.state.last_decision = d
        self._last_key = key
        self._last_sent_itl = d["predicted_itl_ms"]

    # ---------------------------------------------------------------- the loop
    def ingest_snapshot(self, cur: MetricsSnapshot) -> None:
        """Check one parsed scrape, then fold the window since the previous good one.

        Raises ValueError for a scrape that cannot count (no vLLM series, or a NaN, infinite or negative
        counter): the state goes stale and the previous good scrape stays the baseline.
        """
        st = self.state
        if not has_series(cur):
            raise ValueError(
                "the response has no vLLM series (vllm:*): not a vLLM metrics endpoint, or empty"
            )
        bad = invalid_snapshot(cur)
        if bad:
            st.skipped_windows += 1
            st.last_window = Observed(skipped=f"scrape rejected: {bad}")
            raise ValueError(f"scrape rejected: {bad}")
        st.scrapes += 1
        st.stale = False
        st.last_success = time.time()
        st.last_error = None
        st.consecutive_failures = 0
        if self._prev is not None:
            w = window(self._prev, cur)
            if w.reset:
                st.counter_resets += 1
                log.warning("counter reset at %s (engine restart): using counts since the restart",
                            self.cfg.metrics_url)  # fmt: skip
            self.observe(w)
        self._prev = cur

    def fail(self, error: str) -> None:
        st = self.state
        st.stale = True
        st.last_error = error
        st.consecutive_failures += 1
        log.warning("scrape of %s failed (%d in a row): %s; keeping the last plan",
                    self.cfg.metrics_url, st.consecutive_failures, error)  # fmt: skip

    async def scrape(self, client: httpx.AsyncClient) -> MetricsSnapshot:
        """GET the endpoint (at most ``max_bytes``) and parse it off the event loop."""
        body = await fetch_bounded(client, self.cfg.metrics_url, self.cfg.timeout_s, self.cfg.max_bytes)
        return await asyncio.to_thread(parse_metrics, body.decode("utf-8", errors="replace"))

    async def tick(self, client: httpx.AsyncClient) -> None:
        self._ticks += 1
        try:
            snap = await self.scrape(client)
            self.ingest_snapshot(snap)
        except (httpx.HTTPError, ValueError) as exc:
            self.fail(f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a parser bug on garbage is a failed scrape, not a dead loop
            self.fail(f"unparseable response: {type(exc).__name__}: {exc}")
            return
        self.replan()
        log.info("%s", self.tick_line())
        await self._emit_if_changed()

    def tick_line(self) -> str:
        """One line per tick: what was observed, what was predicted, and the correction in force."""
        st, o = self.state, self.state.last_window

        def f(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        acc = st.acceptance
        live = f"{acc.tokens_per_step:.2f} tok/step (coverage {acc.draft_coverage:.2f})" if acc else "-"
        why = f"; skipped: {o.skipped}" if o.skipped else ""
        return (
            f"tick {self._ticks}: ITL observed {f(o.itl_ms, '.2f')} ms "
            f"vs predicted {f(o.predicted_itl_ms, '.2f')} ms "
            f"(raw {f(o.raw_factor, '.3f')}), factor {st.factor:.3f} over {st.factor_windows} windows, "
            f"acceptance {live}, concurrency {f(o.concurrency, '.1f')}, context {f(o.context, '.0f')}{why}"
        )

    async def run(self, stop: asyncio.Event | None = None, max_ticks: int | None = None) -> None:
        """Scrape every ``interval_s`` until ``stop`` is set (or ``max_ticks`` ticks ran).

        No error ends the loop: a tick that raises is recorded as a failure (stale) and the next one runs.
        """
        stop = stop or asyncio.Event()
        ticks = 0
        self.state.loop = "running"
        try:
            async with httpx.AsyncClient() as client:
                while not stop.is_set():
                    try:
                        await self.tick(client)
                    except Exception as exc:  # noqa: BLE001 - never let the loop die unseen
                        log.exception("correction tick failed; the loop goes on")
                        self.fail(f"tick failed: {type(exc).__name__}: {exc}")
                    ticks += 1
                    if max_ticks is not None and ticks >= max_ticks:
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=self.cfg.interval_s)
        except BaseException as exc:  # cancelled or killed: say so where /healthz and /correction look
            self.state.stale = True
            self.state.last_error = f"correction loop ended: {type(exc).__name__}: {exc}"
            raise
        finally:
            self.state.loop = "stopped"


def _inputs_only(sla: dict) -> dict:
    keys = ("itl_ms", "ttft_ms", "isl", "osl", "request_rate", "max_gpus")
    return {k: sla.get(k) for k in keys} | {"itl_correction": 1.0}
