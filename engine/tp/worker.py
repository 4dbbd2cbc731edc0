"""The loop of a tensor-parallel worker (ranks 1..tp-1), started by :class:`TPExecutor`.

A worker holds its shard of the model and of the paged KV cache and replays what rank 0 tells it:
rank 0 sends each command's layout over a pipe, then broadcasts the bytes; the worker runs the same
forward, so every collective of the step finds its peers. It reports readiness and errors on a second
pipe, and leaves when told, when rank 0's pipe closes, or when its parent process disappears.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from engine.tp.env import apply_safe_env

if TYPE_CHECKING:
    from engine.engine_config import EngineConfig
    from engine.presets import ModelSource

PARENT_POLL_S = 0.5
SPIN_S = 0.05  # busy-poll window after each command on GPUs (see _next_command)


def _watch_parent(parent_pid: int) -> None:
    """Exit at once when the parent is gone (a worker blocked in a collective would otherwise wait
    for its timeout)."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(70)


def _next_command(conn: Connection, spin_s: float) -> Any:
    """The next message from rank 0. On GPUs the worker polls for ``spin_s`` before it blocks: a
    blocked read costs a scheduler wake-up (tens of microseconds) on every step, which rank 0's graph
    then waits for at its first all-reduce; spinning burns one core only while steps keep coming."""
    if spin_s > 0:
        deadline = time.perf_counter() + spin_s
        while time.perf_counter() < deadline:
            if conn.poll():
                break
    return conn.recv()


def fill_kv_random(kv_caches: list, seed: int, rank: int) -> None:
    """N(0, 1) in every cache tensor of this rank (a different stream per rank, as real heads differ)."""
    import torch

    if not kv_caches:
        return
    gen = torch.Generator(device=kv_caches[0][0].device).manual_seed(seed * 1009 + rank)
    for k_cache, v_cache in kv_caches:
        k_cache.normal_(0.0, 1.0, generator=gen)
        v_cache.normal_(0.0, 1.0, generator=gen)


@dataclass(frozen=True)
class WorkerLaunch:
    """What every worker rank starts from, pickled into its spawned process: where the group meets
    (rank 0's store, the backend, the collective timeout) and the model and engine config to shard."""

    store_port: int
    backend: str
    timeout_s: float
    source: ModelSource
    config: EngineConfig


def worker_main(
    launch: WorkerLaunch,
    rank: int,
    device: str,
    cmd_conn: Connection,
    status_conn: Connection,
    parent_pid: int,
) -> None:
    apply_safe_env()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is this rank?
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it shuts us down
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="tp-parent-watch").start()
    try:
        _serve(launch, rank, device, cmd_conn, status_conn)
    except BaseException:  # every failure is reported to rank 0 before exiting
        with contextlib.suppress(OSError, EOFError):
            status_conn.send(("error", rank, traceback.format_exc()))
        os._exit(1)
    os._exit(0)


def _serve(
    launch: WorkerLaunch, rank: int, device: str, cmd_conn: Connection, status_conn: Connection
) -> None:
    import torch
    import torch.distributed as dist

    from engine.attention.metadata import AttentionMetadata
    from engine.runner import ModelRunner
    from engine.tp import wire

    tp, backend, timeout_s = launch.config.tp, launch.backend, launch.timeout_s
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    status_conn.send(("hello", rank, os.getpid()))
    store = dist.TCPStore(
        "127.0.0.1", launch.store_port, tp, is_master=False, timeout=timedelta(seconds=timeout_s)
    )
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=tp,
        timeout=timedelta(seconds=timeout_s),
        device_id=dev if dev.type == "cuda" else None,
    )
    runner = ModelRunner.from_config(
        launch.source, launch.config, device=dev, tp_rank=rank, group=dist.group.WORLD
    )
    status_conn.send(("ready", rank, runner.num_blocks))
    spin_s = SPIN_S if dev.type == "cuda" else 0.0
    while True:
        try:
            msg = _next_command(cmd_conn, spin_s)
        except EOFError:  # rank 0 closed its end: the executor is gone
            break
        op = msg[0]
        if op == "stop":
            break
        if op == "execute_host":
            input_ids, positions, meta = runner.upload_inputs(msg[1])
            spec = msg[2]  # None (every row), "last" (each sequence's last token) or a list of rows
            rows = (
                None
                if spec is None
                else runner.logits_indices(meta)
                if spec == "last"
                else runner.index_tensor(spec)
            )
            runner.execute(input_ids, positions, meta, rows)
            continue
        specs = msg[1]
        buf = torch.empty(wire.buffer_size(specs), dtype=torch.uint8, device=dev)
        dist.broadcast(buf, src=0)
        tensors = wire.unpack(specs, buf)
        if op == "execute":
            names, extras, every_row = msg[2], msg[3], msg[4]
            input_ids, positions, logits_indices = tensors[:3]
            meta = AttentionMetadata(**dict(zip(names, tensors[3:], strict=True)), **extras)
            if every_row:  # rank 0 runs the LM head inside its graph: so must we
                runner.mark_every_row(logits_indices)
            runner.execute(input_ids, positions, meta, logits_indices)
        elif op == "move_kv_slots":
            from engine.spec.medusa import move_kv_slots

            pairs = tensors[0]
            move_kv_slots(runner.kv_caches, [tuple(p) for p in pairs.tolist()])
        elif op == "enable_verify_graphs":
            runner.enable_verify_graphs(msg[2], tree=msg[3])
        elif op == "fill_kv_random":
            fill_kv_random(runner.kv_caches, msg[2], rank)
        else:
            raise RuntimeError(f"tensor-parallel worker {rank}: unknown command {op!r}")
    if backend != "nccl":  # NCCL: the process exit frees the communicators; an orderly destroy
        dist.destroy_process_group()  # could wait on rank 0, which aborts its side instead
