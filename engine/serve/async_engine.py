"""The async front end: one thread drives ``engine.step()``; each request reads its own asyncio queue.

Why a thread: ``LLMEngine`` is synchronous and its steps are long (milliseconds to seconds of model
compute). Running them on the event loop would stall every HTTP connection, so the engine lives on a
single background thread that alone touches it (the engine is not thread-safe). HTTP handlers talk
to it through a command queue (add, abort) and get results on per-request ``asyncio.Queue``s, filled
with one ``call_soon_threadsafe`` per step. Requests that arrive while a step runs join the batch at
the next step (continuous batching is the engine's scheduler's job).

An abort (client gone, stop string found) is applied before the next step, so the request's KV
blocks return to the pool at once. The same thread records the metrics, following vLLM's rules
(see ``engine.serve.metrics``), so counters only ever change between steps and agree with the
engine's own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.errors import RequestError
from engine.serve.metrics import FINISH_REASONS, FinishedRequest, ServeMetrics

log = logging.getLogger(__name__)


class EngineLike(Protocol):
    """What the front end needs of ``engine.llm_engine.LLMEngine`` (the engine internal contract)."""

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: Any, arrival_time: float | None = None
    ) -> None: ...
    def step(self) -> list[Any]: ...
    def abort(self, request_id: str) -> None: ...
    def has_unfinished(self) -> bool: ...

    num_running: int
    num_waiting: int
    kv_usage: float


@dataclass(frozen=True)
class StepItem:
    """What one step produced for one request."""

    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one request, for metrics."""

    arrival: float
    num_prompt_tokens: int
    max_tokens: int
    first_token_ts: float | None = None
    last_token_ts: float | None = None
    num_generated: int = 0


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: Any
    arrival: float
    max_tokens: int
    accepted: asyncio.Future[None]


@dataclass
class _Abort:
    request_id: str
    reason: str  # recorded finish reason: "abort" (client gone) or "stop" (stop string)


@dataclass
class _Stream:
    queue: asyncio.Queue[StepItem | BaseException] = field(default_factory=asyncio.Queue)


class RequestHandle:
    """One admitted request: iterate its step outputs; closing it early aborts the request."""

    def __init__(self, owner: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self._owner = owner
        self.request_id = request_id
        self._stream = stream
        self.finished = False

    async def items(self) -> AsyncIterator[StepItem]:
        """Step outputs until the request finishes; raises ``EngineDeadError`` if the engine failed."""
        try:
            while not self.finished:
                item = await self._stream.queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.close()

    def abort(self, reason: str = "abort") -> None:
        """Stop the request now (client gone: ``abort``; stop string found: ``stop``)."""
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id, reason=reason)

    def close(self) -> None:
        """Idempotent: abort unless finished; always forget the stream."""
        self.abort("abort")
        self._owner._streams.pop(self.request_id, None)


class EngineDeadError(RuntimeError):
    """The engine raised inside ``step()``; in-flight requests get this, the server keeps serving."""


class AsyncEngine:
    """Drive an engine from a background thread and expose per-request async streams."""

    def __init__(self, engine: EngineLike, metrics: ServeMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # event-loop side
        self._tracked: dict[str, _Tracked] = {}  # engine-thread side
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._spec_prev: tuple[int, int, int, list[int]] | None = None
        self._prefix_prev: tuple[int, int] | None = None
        self._preempt_prev = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will read the streams."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._spec_prev = self._spec_snapshot()
        self._prefix_prev = self._prefix_snapshot()
        self._preempt_prev = int(getattr(self.engine, "num_preemptions", 0) or 0)
        self._update_gauges()
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._commands.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- request API (event loop) -----------------------------------------------------------------
    async def submit(
        self, request_id: str, prompt_token_ids: list[int], params: Any, *, max_tokens: int
    ) -> RequestHandle:
        """Hand a request to the engine; returns once the engine accepted it.

        Raises ``RequestError`` when the engine rejects it (the caller answers 400), so nothing is
        streamed for a request that never started.
        """
        if self._loop is None or not self.running:
            raise EngineDeadError("the engine loop is not running")
        if request_id in self._streams:
            raise RequestError(f"request_id {request_id!r} is already in flight")
        stream = _Stream()
        self._streams[request_id] = stream
        accepted: asyncio.Future[None] = self._loop.create_future()
        self._commands.put(
            _Add(request_id, list(prompt_token_ids), params, time.monotonic(), max_tokens, accepted)
        )
        try:
            await accepted
        except BaseException:
            # Rejected, or the caller was cancelled while waiting: make sure nothing stays behind.
            self.abort(request_id)
            raise
        return RequestHandle(self, request_id, stream)

    def abort(self, request_id: str, *, reason: str = "abort") -> None:
        """Ask the engine thread to drop a request (no-op when it already finished)."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"reason must be one of {FINISH_REASONS}, got {reason!r}")
        self._streams.pop(request_id, None)
        self._commands.put(_Abort(request_id, reason))

    # -- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            busy = self._safe_has_unfinished()
            try:
                cmd = self._commands.get_nowait() if busy else self._commands.get(timeout=0.5)
            except queue.Empty:
                cmd = None
                if not busy:
                    continue
            while cmd is not None:
                self._apply(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self._stopping:
                break
            if self._safe_has_unfinished():
                self._step_once()
            self._update_gauges()
        self._fail_all(EngineDeadError("server shutting down"), reason="abort")

    def _safe_has_unfinished(self) -> bool:
        try:
            return bool(self.engine.has_unfinished())
        except Exception:  # pragma: no cover - a broken engine must not kill the loop
            log.exception("engine.has_unfinished() failed")
            return False

    def _apply(self, cmd: _Add | _Abort | None) -> None:
        if cmd is None:
            return
        if isinstance(cmd, _Add):
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params)
            except Exception as exc:  # noqa: BLE001 - hand every rejection back to its caller
                self._resolve(cmd.accepted, exc if isinstance(exc, RequestError) else RequestError(str(exc)))
                return
            self._tracked[cmd.request_id] = _Tracked(cmd.arrival, len(cmd.prompt_token_ids), cmd.max_tokens)
            if self.metrics is not None:
                self.metrics.record_new_request(max_tokens=cmd.max_tokens)
            self._resolve(cmd.accepted, None)
            return
        tracked = self._tracked.pop(cmd.request_id, None)
        if tracked is None:
            return  # finished already, or never admitted
        try:
            self.engine.abort(cmd.request_id)
        except Exception:  # pragma: no cover
            log.exception("engine.abort(%r) failed", cmd.request_id)
        self._record_finished(tracked, cmd.reason, time.monotonic())

    def _resolve(self, fut: asyncio.Future[None], exc: BaseException | None) -> None:
        def settle() -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(settle)

    def _step_once(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001
            log.exception("engine.step() failed; failing the in-flight requests")
            self._fail_all(
                EngineDeadError(f"engine step failed: {type(exc).__name__}: {exc}"), reason="error"
            )
            return
        now = time.monotonic()
        deliveries: list[tuple[str, StepItem]] = []
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
            deliveries.append(
                (out.request_id, StepItem(new, bool(out.finished), reason, tracked.num_prompt_tokens))
            )
        if self.metrics is not None:
            self.metrics.record_iteration(
                num_prompt_tokens=prompt_tokens, num_generation_tokens=gen_tokens, ttfts=ttfts, itls=itls
            )
            self._record_engine_counters()
        if deliveries:
            self._post(deliveries)

    def _post(self, deliveries: Sequence[tuple[str, StepItem | BaseException]]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._deliver, deliveries)

    def _deliver(self, deliveries: Sequence[tuple[str, StepItem | BaseException]]) -> None:
        for request_id, item in deliveries:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(item)

    def _fail_all(self, exc: BaseException, *, reason: str) -> None:
        failed = list(self._tracked)
        for request_id in failed:
            with contextlib.suppress(Exception):
                self.engine.abort(request_id)
            tracked = self._tracked.pop(request_id)
            self._record_finished(tracked, reason, time.monotonic())
        self._post([(rid, exc) for rid in failed])

    # -- metrics ----------------------------------------------------------------------------------
    def _record_finished(self, tracked: _Tracked, reason: str, now: float) -> None:
        if self.metrics is None:
            return
        decode = 0.0
        if tracked.first_token_ts is not None and tracked.last_token_ts is not None:
            decode = tracked.last_token_ts - tracked.first_token_ts
        self.metrics.record_finished(
            FinishedRequest(
                finish_reason=reason,
                e2e_latency=now - tracked.arrival,
                num_prompt_tokens=tracked.num_prompt_tokens,
                num_generation_tokens=tracked.num_generated,
                max_tokens_param=tracked.max_tokens,
                decode_time=decode,
            )
        )

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.set_scheduler_state(
                running=int(self.engine.num_running),
                waiting=int(self.engine.num_waiting),
                kv_usage=float(self.engine.kv_usage),
            )
        except Exception:  # pragma: no cover
            log.exception("reading the engine's scheduler state failed")

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
            self.metrics.record_preemptions(int(preempt) - self._preempt_prev)
            self._preempt_prev = int(preempt)
