"""The engine side of ``engine serve``: apply commands, step the engine, publish what each step produced.

``EngineCore`` is the only code that touches the ``LLMEngine`` while it serves. It runs either on a
thread of the server process (``engine.serve.async_engine.AsyncEngine``) or alone in its own process
(``engine.serve.core_process``); both feed it the same commands and read the same ``CoreOutput``, so
the two differ only in transport. The loop is ``run``: take the commands that arrived (waiting when
idle), step once, publish, as vLLM's engine core does.

An abort (client gone, stop string found) is applied before the next step, so the request's KV blocks
return to the pool at once. The core also records the metrics, following vLLM's rules (see
``engine.serve.metrics``), so counters only ever change between steps and agree with the engine's own
counters. In its own process it records them into a ``MetricsRecorder`` whose calls travel with the
step's output and are replayed on the server's registry before the tokens are delivered.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.serve.metrics import FINISH_REASONS, FinishedRequest

log = logging.getLogger(__name__)


class EngineLike(Protocol):
    """What the core needs of ``engine.llm_engine.LLMEngine`` (the engine internal contract)."""

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: Any, arrival_time: float | None = None
    ) -> None: ...
    def step(self) -> list[Any]: ...
    def abort(self, request_id: str) -> None: ...
    def has_unfinished(self) -> bool: ...

    num_running: int
    num_waiting: int
    kv_usage: float


class EngineDeadError(RuntimeError):
    """The engine raised inside ``step()`` or its process exited; in-flight requests get this."""


@dataclass(frozen=True)
class StepItem:
    """What one step produced for one request."""

    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int


@dataclass(frozen=True)
class AddCommand:
    request_id: str
    prompt_token_ids: list[int]
    params: Any
    arrival: float  # time.monotonic() at the server (one clock for every process of this machine)
    max_tokens: int


@dataclass(frozen=True)
class AbortCommand:
    request_id: str
    reason: str  # recorded finish reason: "abort" (client gone) or "stop" (stop string)


Command = AddCommand | AbortCommand | None  # None: stop serving


@dataclass
class CoreOutput:
    """What the core publishes after applying commands or stepping: the server applies
    ``metric_events`` (process mode), then settles ``accepted``, then delivers ``items``."""

    accepted: list[tuple[str, str | None]] = field(default_factory=list)  # (request id, rejection or None)
    items: list[tuple[str, StepItem | BaseException]] = field(default_factory=list)
    metric_events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.accepted or self.items or self.metric_events)


class MetricsRecorder:
    """Stands in for ``ServeMetrics`` inside the engine-core process: each ``record_*``/``set_*`` call is
    kept as (method name, keyword arguments) and replayed on the server's registry by ``replay``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        if not name.startswith(("record_", "set_")):
            raise AttributeError(name)

        def record(**kwargs: Any) -> None:
            self.events.append((name, kwargs))

        return record

    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        events, self.events = self.events, []
        return events


def replay(metrics: Any, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Apply a recorder's events to a ``ServeMetrics``."""
    for name, kwargs in events:
        getattr(metrics, name)(**kwargs)


@dataclass
class _Tracked:
    """Core-side bookkeeping of one request, for metrics."""

    arrival: float
    num_prompt_tokens: int
    max_tokens: int
    first_token_ts: float | None = None
    last_token_ts: float | None = None
    num_generated: int = 0


Receive = Callable[[float], list[Command]]  # wait up to the timeout for the first command, then drain


class EngineCore:
    """Drives one engine: ``run(receive, publish)`` until a ``None`` command arrives."""

    def __init__(self, engine: EngineLike, metrics: Any | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._tracked: dict[str, _Tracked] = {}
        self._out = CoreOutput()
        self._gauges: tuple[int, int, float] | None = None
        self._spec_prev = self._spec_snapshot()
        self._prefix_prev = self._prefix_snapshot()
        self._preempt_prev = int(getattr(engine, "num_preemptions", 0) or 0)
        self.update_gauges()

    def run(self, receive: Receive, publish: Callable[[CoreOutput], None]) -> None:
        """Serve until told to stop; then fail what is still in flight and publish that too."""
        while True:
            stop = False
            for cmd in receive(0.0 if self.has_unfinished() else 0.5):
                if cmd is None:
                    stop = True
                    break
                self.apply(cmd)
            if stop:
                break
            self._publish(publish)  # settle admissions now, not after a step that may take seconds
            if self.has_unfinished():
                self.step_once()
            self.update_gauges()
            self._publish(publish)
        self.fail_all(EngineDeadError("server shutting down"), reason="abort")
        self._publish(publish)

    def _publish(self, publish: Callable[[CoreOutput], None]) -> None:
        out, self._out = self._out, CoreOutput()
        if isinstance(self.metrics, MetricsRecorder):
            out.metric_events = self.metrics.drain()
        if out:
            publish(out)

    def has_unfinished(self) -> bool:
        try:
            return bool(self.engine.has_unfinished())
        except Exception:  # pragma: no cover - a broken engine must not kill the loop
            log.exception("engine.has_unfinished() failed")
            return False

    def apply(self, cmd: AddCommand | AbortCommand) -> None:
        if isinstance(cmd, AddCommand):
            self._add(cmd)
            return
        tracked = self._tracked.pop(cmd.request_id, None)
        if tracked is None:
            return  # finished already, or never admitted
        try:
            self.engine.abort(cmd.request_id)
        except Exception:  # pragma: no cover
            log.exception("engine.abort(%r) failed", cmd.request_id)
        self._record_finished(tracked, cmd.reason, time.monotonic())

    def _add(self, cmd: AddCommand) -> None:
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params)
        except Exception as exc:  # noqa: BLE001 - hand every rejection back to its caller
            self._out.accepted.append((cmd.request_id, str(exc)))
            return
        self._tracked[cmd.request_id] = _Tracked(cmd.arrival, len(cmd.prompt_token_ids), cmd.max_tokens)
        if self.metrics is not None:
            self.metrics.record_new_request(max_tokens=cmd.max_tokens)
        self._out.accepted.append((cmd.request_id, None))

    def step_once(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001
            log.exception("engine.step() failed; failing the in-flight requests")
            self.fail_all(EngineDeadError(f"engine step failed: {type(exc).__name__}: {exc}"), reason="error")
            return
        now = time.monotonic()
        prompt_tokens = gen_tokens = 0
        ttfts: list[float] = []
        itls: list[float] = []
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue  # aborted while the step ran
            new = list(out.new_token_ids)
            if new:
                gen_tokens += len(new)
                tracked.num_generated += len(new)
                if tracked.first_token_ts is None:
                    tracked.first_token_ts = now
                    prompt_tokens += tracked.num_prompt_tokens
                    ttfts.append(now - tracked.arrival)
                elif tracked.last_token_ts is not None:
                    itls.append(now - tracked.last_token_ts)
                tracked.last_token_ts = now
            reason = out.finish_reason if out.finished else None
            if out.finished:
                reason = reason if reason in FINISH_REASONS else "stop"
                del self._tracked[out.request_id]
                self._record_finished(tracked, reason, now)
            self._out.items.append(
                (out.request_id, StepItem(new, bool(out.finished), reason, tracked.num_prompt_tokens))
            )
        if self.metrics is not None:
            self.metrics.record_iteration(
                num_prompt_tokens=prompt_tokens, num_generation_tokens=gen_tokens, ttfts=ttfts, itls=itls
            )
            self._record_engine_counters()

    def fail_all(self, exc: BaseException, *, reason: str) -> None:
        for request_id in list(self._tracked):
            with contextlib.suppress(Exception):
                self.engine.abort(request_id)
            tracked = self._tracked.pop(request_id)
            self._record_finished(tracked, reason, time.monotonic())
            self._out.items.append((request_id, exc))

    # -- metrics ----------------------------------------------------------------------------------
    def _record_finished(self, tracked: _Tracked, reason: str, now: float) -> None:
        if self.metrics is None:
            return
        decode = 0.0
        if tracked.first_token_ts is not None and tracked.last_token_ts is not None:
            decode = tracked.last_token_ts - tracked.first_token_ts
        self.metrics.record_finished(
            req=FinishedRequest(
                finish_reason=reason,
                e2e_latency=now - tracked.arrival,
                num_prompt_tokens=tracked.num_prompt_tokens,
                num_generation_tokens=tracked.num_generated,
                max_tokens_param=tracked.max_tokens,
                decode_time=decode,
            )
        )

    def update_gauges(self) -> None:
        """Running / waiting / KV usage, recorded when they change."""
        if self.metrics is None:
            return
        try:
            state = (int(self.engine.num_running), int(self.engine.num_waiting), float(self.engine.kv_usage))
        except Exception:  # pragma: no cover
            log.exception("reading the engine's scheduler state failed")
            return
        if state != self._gauges:
            self._gauges = state
            self.metrics.set_scheduler_state(running=state[0], waiting=state[1], kv_usage=state[2])

    def _spec_snapshot(self) -> tuple[int, int, int, list[int]] | None:
        stats = getattr(self.engine, "spec_stats", None)
        if stats is None:
            return None
        return (
            int(stats.num_drafts),
            int(stats.num_draft_tokens),
            int(stats.num_accepted_tokens),
            [int(x) for x in stats.accepted_per_pos],
        )

    def _prefix_snapshot(self) -> tuple[int, int] | None:
        """Cumulative (queried tokens, hit tokens) of the engine's kvbm prefix cache, if it has one."""
        mgr = getattr(self.engine, "kv_manager", None)
        get = getattr(mgr, "metrics", None)
        if get is None:
            return None
        m = get() if callable(get) else get
        if not hasattr(m, "prefix_query_tokens"):
            return None
        return int(m.prefix_query_tokens), int(m.prefix_hit_tokens)

    def _record_engine_counters(self) -> None:
        assert self.metrics is not None
        spec = self._spec_snapshot()
        if spec is not None:
            prev = self._spec_prev or (0, 0, 0, [])
            per_pos = [v - (prev[3][i] if i < len(prev[3]) else 0) for i, v in enumerate(spec[3])]
            self.metrics.record_spec(
                drafts=spec[0] - prev[0],
                draft_tokens=spec[1] - prev[1],
                accepted_tokens=spec[2] - prev[2],
                accepted_per_pos=per_pos,
            )
            self._spec_prev = spec
        prefix = self._prefix_snapshot()
        if prefix is not None:
            prev_p = self._prefix_prev or (0, 0)
            self.metrics.record_prefix_cache(queries=prefix[0] - prev_p[0], hits=prefix[1] - prev_p[1])
            self._prefix_prev = prefix
        preempt = getattr(self.engine, "num_preemptions", None)
        if preempt is not None:
            self.metrics.record_preemptions(count=int(preempt) - self._preempt_prev)
            self._preempt_prev = int(preempt)
