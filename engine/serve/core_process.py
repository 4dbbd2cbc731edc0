"""The engine core in a process of its own, so the HTTP server and the engine's steps never share a GIL.

With the core on a thread of the server, every step's host work (scheduling, kvbm, proposing, launching
the CUDA graph, reading the sampled tokens) waits for the interpreter lock whenever the event loop is
busy with the previous step's tokens, and that loop work grows with concurrency: on one H200 at
concurrency 32 the served ITL was 10-23 % above the same engine in-process. vLLM runs its engine core
in a separate process for this reason; so does ``engine serve`` on a GPU (``--engine-process``).

Protocol over one duplex ``multiprocessing`` pipe: the child builds the engine (and warms it up),
answers ``("ready", info)`` or ``("error", message)``, then reads commands (``AddCommand``,
``AbortCommand``, ``None`` = stop) and writes one ``CoreOutput`` per loop turn that produced something,
its metrics as recorded events. The server's receiver thread replays the metrics on its registry, then
hands the output to the event loop. The child exits when told to, or when the pipe closes (the server
died).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from fastapi import FastAPI

from engine.engine_config import EngineConfig
from engine.errors import EngineError
from engine.serve.async_engine import AsyncEngine
from engine.serve.engine_core import Command, CoreOutput, EngineCore, EngineDeadError, MetricsRecorder, replay
from engine.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 1800.0  # loading a large model and warming every graph size can take minutes


@dataclass(frozen=True)
class CoreInfo:
    """What the server learns from the core once the engine is built."""

    max_model_len: int
    vocab_size: int
    warm_up: str | None  # the warm-up's report, or None when it did not run


def _child_receive(conn: Connection, timeout: float) -> list[Command]:
    """Commands that arrived, waiting up to ``timeout`` s; a closed pipe (server gone) means stop."""
    cmds: list[Command] = []
    try:
        if not conn.poll(timeout):
            return cmds
        while True:
            cmds.append(conn.recv())
            if not conn.poll(0):
                return cmds
    except (EOFError, OSError):
        return [*cmds, None]


def _core_main(config: EngineConfig, warm_up: bool | None, log_level: str, conn: Connection) -> None:
    """The child: build the engine, report, serve until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops the core
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.serve.app import served_model_for
    from engine.warmup import serving_engine

    try:
        engine, report = serving_engine(config, warm_up)
    except EngineError as exc:
        conn.send(("error", str(exc)))
        return
    served = served_model_for(engine, config.model)
    described = report.describe() if report is not None else None
    conn.send(("ready", CoreInfo(served.max_model_len, served.vocab_size, described)))
    core = EngineCore(engine, MetricsRecorder())
    with contextlib.suppress(BrokenPipeError, OSError):
        core.run(lambda timeout: _child_receive(conn, timeout), conn.send)
    close = getattr(engine, "close", None)
    if callable(close):
        close()


def app_for_core(
    config: EngineConfig,
    name: str,
    *,
    aliases: tuple[str, ...] = (),
    warm_up: bool | None = None,
    log_level: str = "info",
) -> FastAPI:
    """The whole server with its engine in a core process: start the core (the model loads and warms
    up there), load the tokenizer here, build the metrics registry and the routes."""
    from engine.presets import resolve_model
    from engine.serve.app import ServedModel, build_app
    from engine.tokenizer import load_tokenizer

    core = CoreProcessEngine.launch(config, warm_up=warm_up, log_level=log_level)
    try:
        tokenizer = load_tokenizer(resolve_model(config.model, weights=config.weights))
    except BaseException:
        core.kill()
        raise
    served = ServedModel(
        name=name,
        tokenizer=tokenizer,
        max_model_len=core.info.max_model_len,
        vocab_size=core.info.vocab_size,
        aliases=aliases,
    )
    k = config.spec.k if config.spec else 0
    core.metrics = ServeMetrics(name, max_model_len=served.max_model_len, num_spec_tokens=k)
    return build_app(core, served, core.metrics)


def wants_engine_process(flag: bool | None, config: EngineConfig) -> bool:
    """``--[no-]engine-process`` as given; not given: on a GPU, where a step's host work is what
    the GIL delays (on a CPU the step is compute in torch's own threads)."""
    if flag is not None:
        return flag
    from engine.model.loader import resolve_device

    return resolve_device(config.device).type == "cuda"


class CoreProcessEngine(AsyncEngine):
    """``AsyncEngine`` whose core runs in a child process: ``launch`` it, then ``start`` on the loop."""

    def __init__(self, process: Any, conn: Connection, info: CoreInfo, metrics: ServeMetrics | None) -> None:
        super().__init__(None, metrics)
        self._process = process
        self._conn = conn
        self._send_lock = threading.Lock()
        self.info = info

    @classmethod
    def launch(
        cls,
        config: EngineConfig,
        *,
        warm_up: bool | None = None,
        log_level: str = "info",
    ) -> CoreProcessEngine:
        """Start the core process and wait until its engine is built (and warmed up); set ``metrics``
        before ``start``. Raises ``EngineError`` with the core's message when the engine cannot start."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        # Not a daemon: a tensor-parallel core starts its own worker processes.
        process = ctx.Process(
            target=_core_main, args=(config, warm_up, log_level, child), name="engine-core", daemon=False
        )
        process.start()
        child.close()
        try:
            if not parent.poll(STARTUP_TIMEOUT_S):
                raise EngineError(f"the engine core did not start within {STARTUP_TIMEOUT_S:.0f} s")
            kind, payload = parent.recv()
        except (EOFError, OSError):
            process.join(5)
            code = process.exitcode
            raise EngineError(f"the engine core exited during start-up (exit code {code})") from None
        except BaseException:
            process.kill()
            raise
        if kind != "ready":
            process.join(30)
            raise EngineError(str(payload))
        return cls(process, parent, payload, None)

    @property
    def running(self) -> bool:
        return super().running and self._process.is_alive()

    def _start_core(self) -> None:
        self._thread = threading.Thread(target=self._read_outputs, name="engine-core-reader", daemon=True)
        self._thread.start()

    def _send(self, cmd: Command) -> None:
        with self._send_lock, contextlib.suppress(BrokenPipeError, OSError):
            self._conn.send(cmd)

    def _read_outputs(self) -> None:
        """Receiver thread: replay metrics, hand outputs to the loop; on EOF fail what is in flight."""
        while True:
            try:
                out: CoreOutput = self._conn.recv()
            except (EOFError, OSError):
                break
            if self.metrics is not None and out.metric_events:
                replay(self.metrics, out.metric_events)
            self._publish(out)
        self._process.join(2)
        code = self._process.exitcode
        if code not in (None, 0):
            log.error("the engine core exited with code %s", code)
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._fail_in_flight, EngineDeadError("the engine core exited"))

    def _stop_core(self) -> None:
        """After ``None`` was sent: the core fails what is in flight, publishes it and exits."""
        self._process.join(60)
        if self._process.is_alive():
            log.warning("the engine core did not stop within 60 s; killing it")
            self._process.kill()
            self._process.join(5)
        assert self._thread is not None
        self._thread.join(10)
        self._conn.close()

    def kill(self) -> None:
        """Stop the core without waiting (the server is exiting on an error)."""
        if self._process.is_alive():
            self._process.kill()
