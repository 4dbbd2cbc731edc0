"""The async front end of ``engine serve``: per-request asyncio streams over an ``EngineCore``.

Why not on the event loop: ``LLMEngine`` is synchronous and its steps are long (milliseconds to seconds
of model compute), so running them on the loop would stall every HTTP connection. ``AsyncEngine`` runs
the core (``engine.serve.engine_core``) on one background thread of this process, the only thread that
touches the engine; ``engine.serve.core_process.CoreProcessEngine`` runs it in a process of its own, so
the HTTP loop's Python work (parsing, detokenising, one SSE event per request per step) never holds the
interpreter lock the step's host work needs. Handlers talk to either through the same calls: ``submit``
and ``abort`` send commands; each ``CoreOutput`` settles admissions and fills the requests' queues on the
loop. Requests that arrive while a step runs join the batch at the next step (continuous batching is the
engine's scheduler's job).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.errors import RequestError
from engine.serve.engine_core import (
    AbortCommand,
    AddCommand,
    Command,
    CoreOutput,
    EngineCore,
    EngineDeadError,
    EngineLike,
    StepItem,
)
from engine.serve.metrics import FINISH_REASONS, ServeMetrics

__all__ = ["AsyncEngine", "EngineDeadError", "EngineLike", "RequestHandle", "StepItem"]

log = logging.getLogger(__name__)


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


class AsyncEngine:
    """Per-request async streams over an ``EngineCore`` on a background thread of this process.

    Subclasses change the transport (``_start_core``, ``_send``, ``_stop_core``, ``running``); the
    request API and the delivery of ``CoreOutput`` are shared."""

    def __init__(self, engine: EngineLike | None, metrics: ServeMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # event-loop side
        self._pending: dict[str, asyncio.Future[None]] = {}  # admissions not yet settled
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start serving; call from the event loop that will read the streams."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._start_core()

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        self._send(None)
        await asyncio.get_running_loop().run_in_executor(None, self._stop_core)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _start_core(self) -> None:
        assert self.engine is not None
        core = EngineCore(self.engine, self.metrics)
        self._thread = threading.Thread(
            target=core.run, args=(self._receive, self._publish), name="engine-step-loop", daemon=True
        )
        self._thread.start()

    def _stop_core(self) -> None:
        assert self._thread is not None
        self._thread.join()

    def _send(self, cmd: Command) -> None:
        self._commands.put(cmd)

    def _receive(self, timeout: float) -> list[Command]:
        """Core side: the commands that arrived, waiting up to ``timeout`` s for the first."""
        try:
            first = self._commands.get(timeout=timeout) if timeout > 0 else self._commands.get_nowait()
        except queue.Empty:
            return []
        cmds = [first]
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _publish(self, out: CoreOutput) -> None:
        """Core side: hand one output to the event loop."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(self._on_output, out)

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
        self._pending[request_id] = accepted
        self._send(AddCommand(request_id, list(prompt_token_ids), params, time.monotonic(), max_tokens))
        try:
            await accepted
        except BaseException:
            # Rejected, or the caller was cancelled while waiting: make sure nothing stays behind.
            self.abort(request_id)
            raise
        finally:
            self._pending.pop(request_id, None)
        return RequestHandle(self, request_id, stream)

    def abort(self, request_id: str, *, reason: str = "abort") -> None:
        """Ask the engine to drop a request (no-op when it already finished)."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"reason must be one of {FINISH_REASONS}, got {reason!r}")
        self._streams.pop(request_id, None)
        self._send(AbortCommand(request_id, reason))

    def _on_output(self, out: CoreOutput) -> None:
        """Event loop: settle admissions, then deliver every request's items."""
        for request_id, rejection in out.accepted:
            fut = self._pending.get(request_id)
            if fut is not None and not fut.done():
                if rejection is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(RequestError(rejection))
        for request_id, item in out.items:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(item)

    def _fail_in_flight(self, exc: BaseException) -> None:
        """Event loop: the core is gone; every waiting admission and stream gets ``exc``."""
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        for stream in self._streams.values():
            stream.queue.put_nowait(exc)
