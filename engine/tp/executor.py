"""TPExecutor: a ModelRunner look-alike that runs one model over ``tp`` processes.

Rank 0 lives in the caller's process (it keeps scheduling, kvbm and sampling, and gets logits without
a copy between processes); ranks 1..tp-1 are spawned here. Each ``execute`` sends the step's layout
to every worker over a pipe and broadcasts its tensors in one buffer; then all ranks run the same
forward, whose row-parallel all-reduces and vocabulary all-gather keep them in step.

Failure handling: a monitor thread waits on every worker's process sentinel and status pipe. A worker
that dies or reports an exception marks the executor failed (its traceback kept); rank 0's next or
current collective then ends in :class:`TPWorkerError` naming the rank, not a hang: gloo fails as soon
as the peer's socket closes, NCCL communicators are aborted by the monitor, and every collective has
a timeout as a backstop. Workers leave when told, when rank 0's pipe closes, or when their parent
disappears. Ctrl-C (KeyboardInterrupt) during a step shuts the group down, since the ranks can no
longer be in step.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.attention.metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.errors import ConfigError, EngineError
from engine.model.loader import resolve_device
from engine.presets import ModelSource, resolve_model
from engine.runner import ModelRunner
from engine.tp import wire
from engine.tp.env import apply_safe_env
from engine.tp.sizes import check_tp
from engine.tp.worker import WorkerLaunch, fill_kv_random, worker_main

if TYPE_CHECKING:
    from engine.engine_config import EngineConfig

DEFAULT_TIMEOUT_S = float(os.environ.get("SPECPLAN_TP_TIMEOUT_S", "600"))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class TPWorkerError(EngineError):
    """A tensor-parallel rank died or failed; the group is shut down."""


class TPExecutor:
    """The :class:`engine.runner.Runner` protocol (what :class:`engine.runner.ModelRunner` offers on
    one device) over ``tp`` ranks."""

    def __init__(
        self, config: EngineConfig, source: ModelSource | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        """``config.tp`` ranks of the runner ``config`` describes. ``source``: the resolved model
        (default: ``config.model`` with ``config.weights``), for shapes no preset names."""
        if source is None:
            source = resolve_model(config.model, weights=config.weights)
        tp = config.tp
        check_tp(source.config, tp)
        if tp < 2:
            raise ConfigError(f"TPExecutor needs tp >= 2, got tp={tp}; use ModelRunner for tp=1")
        if dist.is_initialized():
            raise ConfigError(
                "a torch.distributed process group already exists in this process; close the other "
                "TPExecutor (or tensor-parallel engine) first"
            )
        apply_safe_env()
        self.tp = tp
        self.timeout_s = timeout_s
        self._closed = False
        self._failure: str | None = None
        self._status: queue.Queue[tuple] = queue.Queue()
        self._procs: list[mp.Process] = []
        self._cmd: list[Connection] = []
        self._status_conns: list[Connection] = []
        self.runner: ModelRunner | None = None
        self._host_step: tuple[AttentionMetadata, torch.Tensor, tuple] | None = None
        self._rows: tuple[torch.Tensor, str | list[int]] | None = None  # last rows tensor handed out

        devices = self._rank_devices(config.device, tp)
        backend = "nccl" if devices[0].type == "cuda" else "gloo"
        self.backend = backend
        store = dist.TCPStore(
            "127.0.0.1", 0, tp, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
        )
        launch = WorkerLaunch(store.port, backend, timeout_s, source, config)
        ctx = mp.get_context("spawn")
        try:
            for rank in range(1, tp):
                cmd_recv, cmd_send = ctx.Pipe(duplex=False)
                st_recv, st_send = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=worker_main,
                    args=(launch, rank, str(devices[rank]), cmd_recv, st_send, os.getpid()),
                    name=f"tp-rank{rank}",
                    daemon=True,
                )
                proc.start()
                cmd_recv.close()
                st_send.close()
                self._procs.append(proc)
                self._cmd.append(cmd_send)
                self._status_conns.append(st_recv)
            atexit.register(self.close)
            self._wake_recv, self._wake_send = ctx.Pipe(duplex=False)
            self._monitor = threading.Thread(target=self._watch, daemon=True, name="tp-monitor")
            self._monitor.start()
            self._await("hello")
            dist.init_process_group(
                backend,
                store=store,
                rank=0,
                world_size=tp,
                timeout=timedelta(seconds=timeout_s),
                device_id=devices[0] if devices[0].type == "cuda" else None,
            )
            self.runner = ModelRunner.from_config(
                source, config, device=devices[0], tp_rank=0, group=dist.group.WORLD
            )
            blocks = self._await("ready")
        except BaseException as exc:
            failure = self._failure
            self.close()
            if failure is not None and not isinstance(exc, TPWorkerError):
                raise TPWorkerError(failure) from exc
            raise
        if set(blocks) != {self.runner.num_blocks}:
            self.close()
            raise TPWorkerError(
                f"ranks disagree on the KV pool size: rank 0 {self.runner.num_blocks}, workers {blocks}"
            )

    # -- startup --------------------------------------------------------------------------------------
    @staticmethod
    def _rank_devices(device: str | torch.device | None, tp: int) -> list[torch.device]:
        base = resolve_device(device)
        if base.type == "cpu":
            return [base] * tp
        if base.type != "cuda":
            raise ConfigError(f"tensor parallelism runs on cuda or cpu devices, got device={str(base)!r}")
        first = base.index or 0
        count = torch.cuda.device_count()
        if first + tp > count:
            raise ConfigError(f"tp={tp} from device {str(base)!r} needs {first + tp} GPUs; {count} visible")
        return [torch.device("cuda", first + r) for r in range(tp)]

    def _await(self, kind: str) -> list[Any]:
        """Wait until every worker reported ``kind``; fail fast when one dies meanwhile."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(got) < self.tp - 1:
            if self._failure is not None:
                raise TPWorkerError(self._failure)
            if time.monotonic() > deadline:
                raise TPWorkerError(
                    f"tensor-parallel workers did not report {kind!r} within {self.timeout_s:.0f} s"
                )
            try:
                msg = self._status.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg[0] == kind:
                got[msg[1]] = msg[2]
        return [got[r] for r in sorted(got)]

    # -- monitor ------------------------------------------------------------------------------------
    def _watch(self) -> None:
        sentinels = {p.sentinel: i + 1 for i, p in enumerate(self._procs)}
        conns = {id(c): i + 1 for i, c in enumerate(self._status_conns)}
        live_conns = list(self._status_conns)
        while not self._closed:
            ready = wait([*sentinels, *live_conns, self._wake_recv])
            if self._closed:
                return
            for obj in ready:
                if isinstance(obj, Connection):
                    if obj is self._wake_recv:
                        return
                    try:
                        msg = obj.recv()
                    except (EOFError, OSError):
                        live_conns.remove(obj)
                        continue
                    if msg[0] == "error":
                        self._fail(f"tensor-parallel rank {msg[1]} failed:\n{msg[2]}")
                    else:
                        self._status.put(msg)
                elif obj in sentinels:
                    rank = sentinels.pop(obj)
                    proc = self._procs[rank - 1]
                    proc.join(timeout=1.0)  # reap it, so its exit code is known
                    code = proc.exitcode
                    time.sleep(0.2)  # let its last status message (a traceback) arrive first
                    for c in list(live_conns):
                        if conns[id(c)] == rank and c.poll():
                            with contextlib.suppress(EOFError, OSError):
                                msg = c.recv()
                                if msg[0] == "error":
                                    self._fail(f"tensor-parallel rank {rank} failed:\n{msg[2]}")
                    self._fail(
                        f"tensor-parallel rank {rank} (pid {proc.pid}) died ({_describe_exit(code)}); "
                        f"the group of {self.tp} ranks is shut down"
                    )

    def _fail(self, message: str) -> None:
        if self._failure is not None or self._closed:
            return
        self._failure = message
        if self.backend == "nccl" and dist.is_initialized():
            # NCCL would wait for the dead peer until the timeout: abort the communicators so rank 0's
            # blocked collective returns with an error now.
            with contextlib.suppress(Exception):
                dist.distributed_c10d._abort_process_group()

    def _raise_failed(self, exc: BaseException | None = None) -> None:
        if exc is not None and self._failure is None:
            self._procs_settle()
        message = self._failure or f"tensor-parallel step failed: {exc}"
        self.close()
        raise TPWorkerError(message) from exc

    def _procs_settle(self, wait_s: float = 5.0) -> None:
        """After a collective error, give the monitor a moment to learn which rank died."""
        deadline = time.monotonic() + wait_s
        while self._failure is None and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- the ModelRunner interface -----------------------------------------------------------------
    def _check(self) -> ModelRunner:
        if self._failure is not None:
            self._raise_failed()
        if self._closed or self.runner is None:
            raise TPWorkerError("the tensor-parallel executor is closed")
        return self.runner

    def _send(self, op: str, tensors: Sequence[torch.Tensor | None], *extra: Any) -> None:
        runner = self._check()
        specs = wire.specs_of(tensors)
        for conn in self._cmd:  # the layout first: workers wake up while rank 0 packs the bytes
            conn.send((op, specs, *extra))
        dist.broadcast(wire.pack(tensors, runner.device), src=0)

    def execute(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on every rank; rank 0's hidden states and full-vocabulary logits."""
        runner = self._check()
        host = self._host_step
        try:
            rows = self._rows[1] if self._rows is not None and self._rows[0] is logits_indices else None
            known_rows = logits_indices is None or rows is not None
            if (
                host is not None
                and host[0] is meta
                and host[1] is positions
                and meta.tree_mask is None
                and known_rows
            ):
                # the workers rebuild the step from the host arrays prepare() made and the rows from
                # their host form (their logits shards are all-gathered, so the rows must match): no
                # device-side packing, no broadcast, and rank 0's stream meets the workers only at the
                # first all-reduce
                for conn in self._cmd:
                    conn.send(("execute_host", host[2], rows))
            else:  # a step changed after prepare() (Medusa's tree), or built some other way
                tensors, extras, names = wire.step_tensors(input_ids, positions, meta, logits_indices)
                every_row = runner.selects_every_row(logits_indices, input_ids)
                self._send("execute", tensors, names, extras, every_row)
            return runner.execute(input_ids, positions, meta, logits_indices)
        except TPWorkerError:
            raise
        except BaseException as exc:  # a collective failed, or Ctrl-C left the ranks out of step
            if isinstance(exc, KeyboardInterrupt):
                self.close()
                raise
            self._raise_failed(exc)
            raise  # unreachable: _raise_failed raises

    def enable_verify_graphs(self, queries_per_seq: int, *, tree: bool = False) -> None:
        """Let verify steps of this width replay CUDA graphs on every rank (each rank captures the
        same graphs at the same step, so the collectives inside them stay in step)."""
        runner = self._check()
        try:
            self._send("enable_verify_graphs", [], queries_per_seq, tree)
        except BaseException as exc:
            self._raise_failed(exc)
        runner.enable_verify_graphs(queries_per_seq, tree=tree)

    def has_verify_graphs(self, queries_per_seq: int, *, tree: bool = False) -> bool:
        """Every rank enables the same widths, so rank 0's runner answers for all."""
        return self._check().has_verify_graphs(queries_per_seq, tree=tree)

    def move_kv_slots(self, moves: Sequence[tuple[int, int]]) -> None:
        """Apply KV slot moves (Medusa's path compaction) on every rank's cache shard."""
        from engine.spec.medusa import move_kv_slots

        runner = self._check()
        if not moves:
            return
        pairs = torch.tensor(list(moves), dtype=torch.int64).view(-1, 2)
        try:
            self._send("move_kv_slots", [pairs])
        except BaseException as exc:
            self._raise_failed(exc)
        move_kv_slots(runner.kv_caches, moves)

    def fill_kv_random(self, seed: int) -> None:
        """Fill every rank's KV shard with N(0, 1) values (StepProfiler's stand-in for a prefill)."""
        runner = self._check()
        try:
            self._send("fill_kv_random", [], seed)
        except BaseException as exc:
            self._raise_failed(exc)
        fill_kv_random(runner.kv_caches, seed, 0)

    def prepare(self, entries: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        runner = self._check()
        host = runner.host_inputs(entries)
        input_ids, positions, meta = runner.upload_inputs(host)
        self._host_step = (meta, positions, host)  # execute() sends these arrays if meta is unchanged
        return input_ids, positions, meta

    def build_metadata(self, seqs: Sequence[tuple[Sequence[int], int, int]]) -> AttentionMetadata:
        return self._check().build_metadata(seqs)

    def logits_indices(self, meta: AttentionMetadata) -> torch.Tensor:
        rows = self._check().logits_indices(meta)
        self._rows = (rows, "last")
        return rows

    def index_tensor(self, rows: Sequence[int]) -> torch.Tensor:
        out = self._check().index_tensor(rows)
        self._rows = (out, list(rows))
        return out

    def __getattr__(self, name: str) -> Any:
        # plain attributes of rank 0's runner: num_blocks, block_size, config, device, dtype,
        # max_model_len, max_num_seqs, kv_caches (rank 0's shard), model (rank 0's shard), ...
        runner = self.__dict__.get("runner")
        if runner is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(runner, name)

    @property
    def config(self) -> ModelConfig:
        return self._check().config

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    # -- shutdown -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every worker (politely, then by force) and leave the process group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        with contextlib.suppress(Exception):
            self._wake_send.send(None)
        for conn in self._cmd:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop",))
            with contextlib.suppress(OSError):
                conn.close()
        deadline = time.monotonic() + 10.0
        for proc in self._procs:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=3.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=3.0)
        for conn in self._status_conns:
            with contextlib.suppress(OSError):
                conn.close()
        if self.runner is not None:
            with contextlib.suppress(Exception):
                self.runner.close()
        self.runner = None
        _leave_group(abort=self.backend == "nccl" or self._failure is not None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> TPExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _leave_group(*, abort: bool) -> None:
    """Leave the default process group without waiting on peers that may be gone.

    NCCL's orderly destroy can wait on ranks that already exited (it hung a GPU run here), so NCCL
    communicators are aborted, a local operation; gloo's destroy is local already."""
    if not dist.is_initialized():
        return
    if abort:
        with contextlib.suppress(Exception):
            dist.distributed_c10d._abort_process_group()
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def build_tp_runner(source: ModelSource, config: EngineConfig) -> TPExecutor:
    """The hook LLMEngine calls when ``config.tp > 1``."""
    return TPExecutor(config, source)
