"""Sweeps against servers: ``http`` (a running OpenAI-compatible URL) and ``vllm`` (one ``vllm serve``
per (tp, method, k), started, health-checked, measured with the http backend and stopped, also on Ctrl-C).
"""

from __future__ import annotations

import logging
from itertools import groupby
from pathlib import Path

import httpx

from planner.profile import (
    Acceptance,
    EngineInfo,
    Hardware,
    Metadata,
    ModelInfo,
    ModelShape,
    Profile,
    append_point,
    load_profile,
    ngram_settings,
    now_utc,
    save_profile,
)
from profiler.backends import http as httpb
from profiler.backends.vllm import VllmLaunch, default_python, running_server
from profiler.grid import REPO, GridError, SweepConfig
from profiler.prompts import prompts_of_length
from profiler.shapes import model_shape
from profiler.sweep import Progress, _error_point, check_resume_target, finished_keys, run_points

log = logging.getLogger("profiler")


def remote_metadata(
    cfg: SweepConfig,
    command: str,
    engine: EngineInfo,
    gpu_name: str,
    *,
    weights: str,
    kv_by_tp: dict[int, int],
    block_size: int,
    served_model: str | None,
) -> Metadata:
    """Metadata of a server sweep: KV capacity as the server reported it per tp (never a made-up 0)."""
    name, shape = model_shape(cfg.model)
    tp0 = min(kv_by_tp, default=1)
    notes = "closed-loop HTTP load; output tokens counted from the server's usage field"
    if not kv_by_tp:
        notes += "; KV capacity unknown: no server reported it (0 until one does)"
    return Metadata(
        model=ModelInfo(name=name, shape=ModelShape(**shape)),
        hardware=Hardware(gpu_name=gpu_name, gpu_count=max(cfg.tp)),
        engine=engine,
        backend=cfg.backend,  # type: ignore[arg-type]
        dtype=cfg.dtype,
        block_size=block_size,
        kv_capacity_blocks_per_gpu=kv_by_tp[tp0] // tp0 if kv_by_tp else 0,
        kv_capacity_blocks_by_tp=dict(kv_by_tp) or None,
        weights=weights,  # type: ignore[arg-type]
        source="measured",
        created_at=now_utc(),
        command=command,
        notes=notes,
        served_model=served_model,
    )


class LiveAcceptance:
    """Spec-decode counters of every point of one (method, k), pooled into one profile entry that is
    rewritten after each point (the first point's included): no point's window is dropped."""

    def __init__(self, out: Path, model: str, settings: dict[str, str | int | float] | None, note: str):
        self.out, self.model, self.settings, self.note = out, model, settings, note
        self.pooled: dict[tuple[str, int], httpb.SpecCounters] = {}
        self.per_point: dict[tuple[str, int], list[str]] = {}

    def add(self, spec, res: httpb.LoadResult) -> Acceptance | None:
        c = res.counters
        if c is None or spec.method == "none":
            return None
        key = (spec.method, spec.k)
        self.pooled[key] = httpb.add_counters(self.pooled.get(key), c)
        self.per_point.setdefault(key, []).append(f"c={spec.concurrency} L={spec.context_len}: "
                                                  f"{c.tokens_per_step:.3f}")  # fmt: skip
        detail = (f"/metrics deltas pooled over {len(self.per_point[key])} point(s); {self.note}; "
                  f"tokens per step per point: {', '.join(self.per_point[key])}")  # fmt: skip
        acc = httpb.to_acceptance(spec, res, model=self.model, detail=detail, settings=self.settings,
                                  counters=self.pooled[key])  # fmt: skip
        if acc is not None and self.out.exists():  # the point itself was written just before
            append_point(self.out, acc)
        return acc


def _load(cfg: SweepConfig, url: str, model: str, spec) -> httpb.LoadResult:
    texts = prompts_of_length(max(4, spec.concurrency), spec.context_len)
    prompts = httpb.exact_prompts(url, model, texts, spec.context_len)  # L tokens as the server counts
    n = cfg.requests_per_point or 2 * spec.concurrency
    return httpb.run_load(
        url, model, prompts, concurrency=spec.concurrency, num_requests=n, max_tokens=cfg.max_tokens
    )


def _run(cfg: SweepConfig, points, url: str, model: str, out: Path, meta: Metadata, bar, live) -> None:
    """Measure ``points`` on one server; each point's acceptance is pooled once the point is on disk."""
    for spec in points:
        results: list[httpb.LoadResult] = []

        def measure(s, results=results):
            results.append(_load(cfg, url, model, s))
            return httpb.to_decode_point(s, results[-1], s.tp)

        run_points([spec], measure, out, lambda: meta, bar)
        if results:
            live.add(spec, results[0])


def _configs(points) -> list[tuple[str, int]]:
    return sorted({(p.method, p.k) for p in points})


def sweep_http(cfg: SweepConfig, out: Path, *, resume: bool, command: str, progress: bool = True) -> Profile:
    """Sweep a running server; its speculation and KV capacity come from its /metrics (or --kv-blocks)."""
    assert cfg.url
    url = cfg.url.rstrip("/")
    if len(set(cfg.tp)) != 1:
        raise GridError(
            f"field 'tp': backend http measures one running server; give its tp alone, got {cfg.tp}"
        )
    tp = cfg.tp[0]
    try:
        model = cfg.served_model or httpb.served_model_name(url)
        info = httpb.server_info(url)
        httpb.check_speculation(info, _configs(cfg.points()), url)
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
        raise GridError(str(exc)) from None
    blocks = info.kv_blocks or cfg.kv_blocks
    if blocks is None:
        raise GridError(
            f"field 'kv_blocks': the server at {url} does not export vllm:cache_config_info in /metrics; "
            "pass its KV block count with --kv-blocks"
        )
    done = finished_keys(out) if resume else set()
    if not resume and out.exists():
        out.unlink()
    todo = [p for p in cfg.points() if p.key not in done]
    meta = remote_metadata(
        cfg, command, EngineInfo(name="http", version=url), "unknown", weights=str(cfg.weights),
        kv_by_tp={tp: blocks}, block_size=info.block_size or 16,
        served_model=httpb.served_model_root(url) or model,
    )  # fmt: skip
    check_resume_target(out, resume, meta)
    settings = ngram_settings(cfg.prompt_lookup_min, cfg.prompt_lookup_max) if (
        cfg.prompt_lookup_min or cfg.prompt_lookup_max) else None  # fmt: skip
    note = f"server {url} ({info.describe()}); method label from the grid"
    live = LiveAcceptance(out, cfg.model, settings, note)
    bar = Progress(len(todo), progress)
    try:
        _run(cfg, todo, url, model, out, meta, bar, live)
    finally:
        bar.close()
    return load_profile(out)


def vllm_version(python: str) -> str:
    import subprocess

    r = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def _record_kv(out: Path, meta: Metadata, tp: int, info: httpb.ServerInfo) -> None:
    """The server's KV capacity for ``tp`` into the metadata (and into the profile when it exists)."""
    if info.kv_blocks is None:
        return
    by_tp = {**(meta.kv_capacity_blocks_by_tp or {}), tp: info.kv_blocks}
    tp0 = min(by_tp)
    meta.kv_capacity_blocks_by_tp = by_tp
    meta.kv_capacity_blocks_per_gpu = by_tp[tp0] // tp0
    meta.block_size = info.block_size or meta.block_size
    meta.notes = "closed-loop HTTP load; output tokens counted from the server's usage field"
    if out.exists():
        profile = load_profile(out)
        for name in ("kv_capacity_blocks_by_tp", "kv_capacity_blocks_per_gpu", "block_size", "notes"):
            setattr(profile.metadata, name, getattr(meta, name))
        save_profile(profile, out)


def sweep_vllm(cfg: SweepConfig, out: Path, *, resume: bool, command: str, progress: bool = True) -> Profile:
    python = cfg.vllm_python or default_python()  # $SPECPLAN_VLLM_PYTHON, else <repo>/V, else this one
    done = finished_keys(out) if resume else set()
    if not resume and out.exists():
        out.unlink()
    todo = [p for p in cfg.points() if p.key not in done]
    # KV capacity is filled in from each server's /metrics before its first point is written.
    meta = remote_metadata(
        cfg, command, EngineInfo(name="vllm", version=vllm_version(python)), "cpu", weights="real",
        kv_by_tp={}, block_size=16, served_model=cfg.model,
    )  # fmt: skip
    check_resume_target(out, resume, meta)
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
                prompt_lookup_min=cfg.prompt_lookup_min, prompt_lookup_max=cfg.prompt_lookup_max,
            )  # fmt: skip
            bar.bar.write(f"$ {launch.vllm_serve_line()}")
            try:
                with running_server(launch, log_path=logdir / f"tp{tp}-{method}-k{k}.log") as server:
                    info = httpb.server_info(server.base_url)
                    httpb.check_speculation(info, [(method, k)], server.base_url)
                    info.kv_blocks = info.kv_blocks or cfg.kv_blocks
                    if info.kv_blocks is None:
                        raise RuntimeError("vLLM exported no vllm:cache_config_info; pass --kv-blocks")
                    _record_kv(out, meta, tp, info)
                    note = f"vllm serve ({info.describe()}): {launch.vllm_serve_line()}"
                    live = LiveAcceptance(out, cfg.model, launch.drafter_settings(), note)
                    _run(cfg, points, server.base_url, "profiled", out, meta, bar, live)
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
