"""Run a sweep grid through a backend and persist every finished point at once.

Each point is appended to the profile with ``planner.profile.append_point`` (atomic replace), so
Ctrl-C or a crash loses at most the point in progress and ``--resume`` skips finished ones (failed
points included: they are recorded with ``error``). A point that fails (capacity, out of memory, a dead
server) is recorded and the sweep goes on. Progress shows the point, the ETA and the last ITL.
"""

from __future__ import annotations

import contextlib
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from itertools import groupby
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common.metadata import engine_info, gpu_name, is_cpu
from planner.profile import (
    DecodePoint,
    EngineInfo,
    Hardware,
    Metadata,
    ModelInfo,
    ModelShape,
    Profile,
    append_point,
    check_same_identity,
    load_profile,
    now_utc,
)
from profiler.grid import PointSpec, SweepConfig


class SweepError(RuntimeError):
    """The sweep as a whole failed (no configuration loaded); the message carries the first cause."""


ERROR_CHARS = 4000  # a stored failure keeps its head and its tail (a server log's cause is at the end)


def error_text(exc: BaseException) -> str:
    """``Type: message``, shortened in the middle when longer than ERROR_CHARS."""
    msg = f"{type(exc).__name__}: {exc}".strip()
    if len(msg) <= ERROR_CHARS:
        return msg
    head, tail = ERROR_CHARS // 4, msg[-(ERROR_CHARS - ERROR_CHARS // 4) :]
    return f"{msg[:head]}\n[... {len(msg) - ERROR_CHARS} characters left out ...]\n{tail}"


def _error_point(spec: PointSpec, exc: BaseException) -> DecodePoint:
    return DecodePoint(
        tp=spec.tp, method=spec.method, k=spec.k, concurrency=spec.concurrency, context_len=spec.context_len,
        error=error_text(exc), draft_coverage=spec.coverage,
    )  # fmt: skip


def finished_keys(path: Path) -> set[tuple]:
    """Keys of decode points already in the profile at ``path`` (for --resume)."""
    if not path.exists():
        return set()
    return {p.key for p in load_profile(path).decode}


def check_resume_target(out: Path, resume: bool, metadata: Metadata) -> None:
    """Refuse, before anything is measured, to resume into a profile of another model or setup."""
    if resume and out.exists():
        check_same_identity(load_profile(out).metadata, metadata, out)


def engine_metadata(
    model: str, gpu_count: int, info: dict[str, Any], command: str, notes: str | None = None
) -> Metadata:
    """Metadata of an in-process run (engine or hf backend, an acceptance run) from the backend's ``info``."""
    mi = info["model_info"]
    shape = {k: v for k, v in mi["shape"].items() if k in ModelShape.model_fields}
    gpu = str(info["device_name"])
    import torch

    is_gpu = torch.cuda.is_available() and not is_cpu(gpu)
    mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if is_gpu else None
    cpu_note = None if is_gpu else f"CPU run: {gpu}, {platform.processor() or platform.machine()}"
    return Metadata(
        model=ModelInfo(name=mi.get("name") or model, shape=ModelShape(**shape)),
        hardware=Hardware(gpu_name=gpu_name(gpu), gpu_count=gpu_count, gpu_memory_gib=mem),
        engine=EngineInfo(**info.get("engine", engine_info(torch.__version__))),
        backend=info.get("backend", "engine"),
        dtype=info["dtype"],
        block_size=info["block_size"],
        kv_capacity_blocks_per_gpu=int(info["kv_capacity_blocks"]),
        weights=mi.get("weights", "random"),
        source="measured",
        created_at=now_utc(),
        command=command,
        notes="; ".join(n for n in (notes, cpu_note) if n) or None,
    )


def command_line(argv: list[str] | None = None) -> str:
    return shlex.join(["profiler", *(sys.argv[1:] if argv is None else argv)])


class Progress:
    """tqdm bar whose postfix shows the current point and the last ITL."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, unit="pt", disable=not enabled, dynamic_ncols=True, file=sys.stderr)

    def point(self, spec: PointSpec) -> None:
        self.bar.set_description(spec.label())

    def done(self, point: DecodePoint) -> None:
        last = f"{point.itl_ms.mean:.2f} ms" if point.itl_ms else f"failed ({(point.error or '')[:40]})"
        self.bar.set_postfix_str(f"last ITL {last}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_points(
    points: Iterable[PointSpec],
    measure: Callable[[PointSpec], DecodePoint],
    out: Path,
    metadata: Callable[[], Metadata],
    progress: Progress | None = None,
) -> list[DecodePoint]:
    """Measure each point, persisting it (or its failure) at once; returns the points written."""
    written = []
    for spec in points:
        if progress:
            progress.point(spec)
        try:
            point = measure(spec)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - any engine/server failure is recorded for this point
            point = _error_point(spec, exc)
            _free_device_memory()
        append_point(out, point, metadata())
        written.append(point)
        if progress:
            progress.done(point)
    return written


def _free_device_memory() -> None:
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sweep_engine(
    cfg: SweepConfig, out: Path, *, resume: bool, command: str, progress: bool = True
) -> Profile:
    """The in-process backend: one StepProfiler per (tp, method, k); prefill points per tp."""
    from profiler.backends.engine import EngineBackend, Repeats
    from profiler.power import PowerSampler

    done = finished_keys(out) if resume else set()
    if not resume and out.exists():
        out.unlink()
    todo = [p for p in cfg.points() if p.key not in done]
    if cfg.backend == "hf":  # transformers generate: same configure/measure/measure_prefill interface
        from profiler.backends.hf import HFBackend

        backend = HFBackend(cfg.model, dtype=cfg.dtype, draft_model=cfg.draft_model)
    else:
        backend = EngineBackend(
            cfg.model,
            dtype=cfg.dtype,
            draft_model=cfg.draft_model,
            max_num_seqs=max(cfg.concurrency),
            repeats=Repeats(cfg.min_repeats, cfg.max_repeats, cfg.repeat_tol),
        )
    meta: dict[str, Metadata] = {}
    load_errors: list[str] = []
    bar = Progress(len(todo), progress)
    try:
        # refuse a foreign profile before measuring anything; prefill may be all that is left to do
        if resume and out.exists():
            first = todo[0] if todo else next(iter(cfg.points()))
            with contextlib.suppress(Exception):  # a configuration that cannot load fails its points below
                backend.configure(first.tp, first.method, first.k)
                meta["m"] = engine_metadata(cfg.model, max(cfg.tp), backend.info, command)
            if "m" in meta:
                check_resume_target(out, resume, meta["m"])
            else:
                meta["m"] = load_profile(out).metadata
        for (tp, method, k), group in groupby(todo, key=lambda p: (p.tp, p.method, p.k)):
            group_points = list(group)
            try:
                backend.configure(tp, method, k)
            except Exception as exc:  # noqa: BLE001 - a configuration that cannot load fails its points
                load_errors.append(f"tp={tp} {method} k={k}: {error_text(exc)}")
                for spec in group_points:
                    point = _error_point(spec, exc)
                    if out.exists() or meta:
                        append_point(out, point, meta.get("m"))
                    bar.done(point)
                continue
            if "m" not in meta:
                meta["m"] = engine_metadata(cfg.model, max(cfg.tp), backend.info, command)
            power = PowerSampler.create(list(range(tp)))
            run_points(
                group_points,
                lambda s, power=power: backend.measure(s, steps=cfg.steps, warmup=cfg.warmup, power=power),
                out,
                lambda: meta["m"],
                bar,
            )
        bar.close()
        _prefill(cfg, backend, out, meta, done_prefill=_prefill_done(out) if resume else set())
    finally:
        bar.close()
        backend.close()
    if not out.exists():
        first = load_errors[0] if load_errors else "nothing to measure"
        raise SweepError(f"no point could be measured: no configuration loaded; the first failure: {first}")
    return load_profile(out)


def _prefill_done(out: Path) -> set[tuple]:
    return {p.key for p in load_profile(out).prefill} if out.exists() else set()


def _prefill(cfg: SweepConfig, backend, out: Path, meta: dict, done_prefill: set) -> None:
    from planner.profile import PrefillPoint

    if not cfg.prefill_lens or "m" not in meta:
        return
    for tp in sorted(set(cfg.tp)):
        for n in sorted(set(cfg.prefill_lens)):
            if (tp, n) in done_prefill:
                continue
            try:
                point = backend.measure_prefill(tp, n)
            except Exception as exc:  # noqa: BLE001
                point = PrefillPoint(tp=tp, input_len=n, error=error_text(exc))
            append_point(out, point, meta["m"])


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0
