"""Sweeps against servers: ``http`` (a running OpenAI-compatible URL) and ``vllm`` (one ``vllm serve``
per (tp, method, k), started, health-checked, measured with the http backend and stopped, also on Ctrl-C).
"""

from __future__ import annotations

import logging
from itertools import groupby
from pathlib import Path

from planner.profile import (
    Acceptance,
    AcceptanceSource,
    EngineInfo,
    Hardware,
    Metadata,
    ModelInfo,
    ModelShape,
    Profile,
    append_point,
    load_profile,
    now_utc,
)
from profiler.backends import http as httpb
from profiler.backends.vllm import VllmLaunch, default_python, running_server
from profiler.grid import REPO, SweepConfig
from profiler.prompts import prompts_of_length
from profiler.shapes import model_shape
from profiler.sweep import Progress, _error_point, check_resume_target, finished_keys, run_points

log = logging.getLogger("profiler")


def remote_metadata(cfg: SweepConfig, command: str, engine: EngineInfo, gpu_name: str) -> Metadata:
    name, shape = model_shape(cfg.model)
    return Metadata(
        model=ModelInfo(name=name, shape=ModelShape(**shape)),
        hardware=Hardware(gpu_name=gpu_name, gpu_count=max(cfg.tp)),
        engine=engine,
        backend=cfg.backend,  # type: ignore[arg-type]
        dtype=cfg.dtype,
        block_size=16,
        kv_capacity_blocks_per_gpu=0,
        weights="real",
        source="measured",
        created_at=now_utc(),
        command=command,
        notes="closed-loop HTTP load; output tokens counted from the server's usage field",
    )


def _measure_http(cfg: SweepConfig, url: str, model: str):
    def measure(spec):
        texts = prompts_of_length(max(4, spec.concurrency), spec.context_len)
        prompts = httpb.exact_prompts(url, model, texts, spec.context_len)
        n = cfg.requests_per_point or 2 * spec.concurrency
        res = httpb.run_load(
            url, model, prompts, concurrency=spec.concurrency, num_requests=n, max_tokens=cfg.max_tokens
        )
        point = httpb.to_decode_point(spec, res, spec.tp)
        _record_acceptance(cfg, spec, res)
        return point

    return measure


_ACCEPTANCE_SINK: dict[str, Path] = {}


def _record_acceptance(cfg: SweepConfig, spec, res: httpb.LoadResult) -> None:
    """Live counters over the point's window become an Acceptance entry for (method, k)."""
    c = res.counters
    out = _ACCEPTANCE_SINK.get("out")
    if c is None or spec.method == "none" or out is None or not out.exists() or c.drafts <= 0:
        return
    per_pos = c.acceptance_per_pos[: spec.k] + [0.0] * max(0, spec.k - len(c.acceptance_per_pos))
    acc = Acceptance(
        method=spec.method,
        k=spec.k,
        draft_coverage=c.draft_coverage,
        accepted_per_pos=[min(1.0, max(0.0, a)) for a in per_pos],
        source=AcceptanceSource(
            kind="live", model=cfg.model, detail=f"/metrics deltas at c={spec.concurrency}"
        ),
        samples=int(c.decode_steps),
    )
    append_point(out, acc)


def sweep_http(cfg: SweepConfig, out: Path, *, resume: bool, command: str, progress: bool = True) -> Profile:
    assert cfg.url
    url = cfg.url.rstrip("/")
    model = cfg.served_model or httpb.served_model_name(url)
    done = finished_keys(out) if resume else set()
    if not resume and out.exists():
        out.unlink()
    todo = [p for p in cfg.points() if p.key not in done]
    meta = remote_metadata(cfg, command, EngineInfo(name="http", version=url), "unknown")
    check_resume_target(out, resume, meta)
    _ACCEPTANCE_SINK["out"] = out
    bar = Progress(len(todo), progress)
    try:
        run_points(todo, _measure_http(cfg, url, model), out, lambda: meta, bar)
    finally:
        bar.close()
    return load_profile(out)


def vllm_version(python: str) -> str:
    import subprocess

    r = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def sweep_vllm(cfg: SweepConfig, out: Path, *, resume: bool, command: str, progress: bool = True) -> Profile:
    python = cfg.vllm_python or default_python()  # $SPECPLAN_VLLM_PYTHON, else <repo>/V, else this one
    done = finished_keys(out) if resume else set()
    if not resume and out.exists():
        out.unlink()
    todo = [p for p in cfg.points() if p.key not in done]
    meta = remote_metadata(cfg, command, EngineInfo(name="vllm", version=vllm_version(python)), "cpu")
    check_resume_target(out, resume, meta)
    _ACCEPTANCE_SINK["out"] = out
    bar = Progress(len(todo), progress)
    logdir = out.parent / f"{out.stem}-vllm-logs"
    try:
        for (tp, method, k), group in groupby(todo, key=lambda p: (p.tp, p.method, p.k)):
            points = list(group)
            launch = VllmLaunch(
                model=cfg.model, python=python, tp=tp, method=method, k=k,
                max_num_seqs=max(p.concurrency for p in points),
                max_model_len=max(p.context_len for p in points) * 2 + cfg.max_tokens,
                draft_model=cfg.draft_model, served_model_name="profiled",
            )  # fmt: skip
            bar.bar.write(f"$ {launch.vllm_serve_line()}")
            try:
                with running_server(launch, log_path=logdir / f"tp{tp}-{method}-k{k}.log") as server:
                    run_points(
                        points, _measure_http(cfg, server.base_url, "profiled"), out, lambda: meta, bar
                    )
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - the configuration's unmeasured points record the failure
                left = [p for p in points if p.key not in finished_keys(out)] if out.exists() else points
                for p in left:
                    point = _error_point(p, exc)
                    append_point(out, point, meta)
                    bar.done(point)
    finally:
        bar.close()
    return load_profile(out)


__all__ = ["sweep_http", "sweep_vllm", "REPO"]
