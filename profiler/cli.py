"""``profiler`` command line: sweep, acceptance, show, plot, validate."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from profiler.grid import GridError, load_config, quick


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def cmd_sweep(a: argparse.Namespace) -> int:
    from profiler.sweep import command_line

    overrides = dict(
        model=a.model, backend=a.backend, tp=a.tp, method=a.method, k=a.k, concurrency=a.concurrency,
        context=a.context, url=a.url, vllm_python=a.vllm_python, draft_model=a.draft_model, steps=a.steps,
        sla_itl_ms=a.itl_ms, served_model=a.served_model, max_tokens=a.max_tokens,
        acceptance=a.acceptance, measure_acceptance=False if a.no_acceptance else None,
        acceptance_prompts=a.acceptance_prompts, categories=a.categories, kv_blocks=a.kv_blocks,
        prompt_lookup_min=a.prompt_lookup_min, prompt_lookup_max=a.prompt_lookup_max, weights=a.weights,
    )  # fmt: skip
    try:
        cfg = load_config(a.config, gpu=_has_gpu(), overrides=overrides)
        if a.quick:
            cfg = quick(cfg)
        points = list(cfg.points())
        if cfg.categories:
            _check_categories(cfg.categories)
        if cfg.backend == "engine":
            _check_model(cfg.model)
        elif cfg.backend == "hf" and not (Path(cfg.model) / "config.json").is_file():
            raise GridError(f"field 'model': backend 'hf' needs a Hugging Face directory, got {cfg.model!r}")
    except GridError as exc:
        print(f"profiler sweep: {exc}", file=sys.stderr)
        return 2
    out = (
        Path(a.out) / f"{Path(cfg.model).name}-{cfg.backend}.json"
        if not str(a.out).endswith(".json")
        else Path(a.out)
    )
    print(f"sweep: {cfg.model} backend={cfg.backend} {len(points)} decode points -> {out}", file=sys.stderr)
    t0 = time.perf_counter()
    command = command_line()
    try:
        profile = _run_sweep(cfg, out, a, command)
    except GridError as exc:
        print(f"profiler sweep: {exc}", file=sys.stderr)
        return 2
    if profile is None:
        print(f"profiler sweep: backend {cfg.backend!r} is not available for sweeps yet", file=sys.stderr)
        return 2
    from planner.profile import load_profile
    from profiler.acceptance import AcceptanceError, sweep_acceptance

    try:
        sweep_acceptance(cfg, out, profile.metadata.weights, in_process=cfg.backend in ("engine", "hf"),
                         progress=not a.no_progress)  # fmt: skip
    except AcceptanceError as exc:
        print(f"profiler sweep: acceptance: {exc}", file=sys.stderr)
        return 1
    profile = load_profile(out)
    elapsed = time.perf_counter() - t0
    from profiler.report import describe

    print(describe(profile))
    print(f"\nsweep finished in {elapsed:.1f} s; profile: {out}")
    if not a.no_plots:
        from profiler.plots import plot_all

        acc = _given_acceptance(profile, cfg.acceptance)
        paths = plot_all(profile, out.parent / f"{out.stem}-plots", acc)
        print(f"plots: {', '.join(str(p) for p in paths)}")
    _print_plan(out, cfg.sla_itl_ms, cfg.acceptance)
    return 0


def _run_sweep(cfg, out: Path, a: argparse.Namespace, command: str):
    """The backend's sweep; None for a backend without one."""
    if cfg.backend in ("engine", "hf"):
        from profiler.sweep import sweep_engine

        profile = sweep_engine(cfg, out, resume=a.resume, command=command, progress=not a.no_progress)
    elif cfg.backend == "http":
        from profiler.remote import sweep_http

        profile = sweep_http(cfg, out, resume=a.resume, command=command, progress=not a.no_progress)
    elif cfg.backend == "vllm":
        from profiler.remote import sweep_vllm

        profile = sweep_vllm(cfg, out, resume=a.resume, command=command, progress=not a.no_progress)
    else:
        return None
    return profile


def _check_model(model: str) -> None:
    """Unknown models fail before any measurement."""
    if Path(model).exists():
        return
    try:
        from engine.presets import resolve_model

        resolve_model(model)
    except Exception as exc:  # noqa: BLE001 - engine errors name the model and the presets
        raise GridError(f"field 'model': {exc}") from None


def _check_categories(categories: list[str]) -> None:
    """Unknown Spec-Bench categories fail before any measurement."""
    from profiler.acceptance import load_prompts
    from profiler.prompts import SPEC_BENCH

    known = {p.category for p in load_prompts(SPEC_BENCH)}
    unknown = sorted(set(categories) - known)
    if unknown:
        raise GridError(
            f"field 'categories': {unknown} are not Spec-Bench categories ({', '.join(sorted(known))})"
        )


def _given_acceptance(profile, alpha: float | None) -> dict[tuple[str, int], float] | None:
    if alpha is None or profile.metadata.weights == "real":
        return None
    from planner.metrics_def import tokens_per_step

    keys = {(p.method, p.k) for p in profile.decode if p.method != "none"}
    return {(m, k): tokens_per_step(1.0, [alpha ** (i + 1) for i in range(k)]) for m, k in keys}


def _print_plan(out: Path, itl_ms: float, acceptance: float | None) -> None:
    """The recommended plan for the default SLA (planner imported lazily: it is optional here)."""
    try:
        from planner.plan import Planner
        from planner.profile import load_profile
        from planner.render import render_plan
    except ImportError as exc:
        print(f"(planner not available: {exc}; run `planner plan {out} --itl-ms {itl_ms}`)")
        return
    profile = load_profile(out)
    try:  # the acceptance the profile stores (measured, or the grid's given one): what `planner plan` uses
        res = Planner(profile, out.stem).plan(itl_ms=itl_ms)
    except Exception as exc:  # noqa: BLE001 - the sweep's result stands even if planning fails
        print(f"\nplan for ITL <= {itl_ms} ms failed: {exc}")
        return
    given = [a for a in profile.acceptance if a.source.kind == "given"]
    note = (
        f" (acceptance given: alpha={acceptance}, {profile.metadata.weights} weights)"
        if given and acceptance
        else ""
    )
    print(f"\nrecommended plan for ITL <= {itl_ms} ms{note}:\n{render_plan(res)}")
    print(f"same answer: planner plan {out} --itl-ms {itl_ms}")


def cmd_show(a: argparse.Namespace) -> int:
    from planner.profile import ProfileError, load_profile
    from profiler.report import describe

    try:
        print(describe(load_profile(a.profile)))
    except ProfileError as exc:
        print(f"profiler show: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    from planner.profile import ProfileError, load_profile
    from profiler.plots import plot_all

    try:
        profile = load_profile(a.profile)
    except ProfileError as exc:
        print(f"profiler plot: {exc}", file=sys.stderr)
        return 2
    for p in plot_all(profile, Path(a.out), _given_acceptance(profile, a.acceptance)):
        print(p)
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    from profiler.validate import run_validate

    return run_validate(a)


def cmd_acceptance(a: argparse.Namespace) -> int:
    from profiler.acceptance import run_acceptance

    return run_acceptance(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="profiler", description="Measure decode/prefill/acceptance surfaces.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="measure a grid and write a profile")
    s.add_argument("--model")
    s.add_argument("--backend", choices=["engine", "http", "vllm", "hf"])
    s.add_argument("--tp", type=_ints)
    s.add_argument("--method", type=_strs)
    s.add_argument("--k", type=_ints)
    s.add_argument("--concurrency", type=_ints)
    s.add_argument("--context", type=_ints)
    s.add_argument("--steps", type=int)
    s.add_argument("--config", type=Path, help="a sweep YAML (configs/sweeps/); flags override it")
    s.add_argument("--out", default="runs", help="directory (or .json path) for the profile")
    s.add_argument("--resume", action="store_true", help="skip points already in the output profile")
    s.add_argument("--quick", action="store_true", help="thin the grid to its corners")
    s.add_argument("--url", help="http backend: base URL of an OpenAI-compatible server")
    s.add_argument("--served-model", help="http backend: model name for requests (default: /v1/models)")
    s.add_argument("--vllm-python", help="vllm backend: python of the venv with vllm")
    s.add_argument("--draft-model", help="drafter for method 'draft'")
    s.add_argument("--max-tokens", type=int, help="output tokens per request (http/vllm load, acceptance)")
    s.add_argument("--itl-ms", type=float, help="SLA for the closing plan")
    s.add_argument(
        "--acceptance", type=float, help="random weights: per-position acceptance to store (given)"
    )
    s.add_argument("--no-acceptance", action="store_true", help="real weights: do not measure acceptance")
    s.add_argument("--acceptance-prompts", type=int, help="Spec-Bench prompts per category (default 4)")
    s.add_argument("--categories", type=_strs, help="Spec-Bench categories to measure (default: all)")
    s.add_argument("--prompt-lookup-min", type=int, help="ngram window (vLLM's default: = max, or 5)")
    s.add_argument("--prompt-lookup-max", type=int, help="ngram window (vLLM's default: = min, or 5)")
    s.add_argument("--kv-blocks", type=int, help="http: the server's KV blocks when /metrics does not say")
    s.add_argument("--weights", choices=["real", "random"], help="http: what the server runs (required)")
    s.add_argument("--no-plots", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_sweep)

    sh = sub.add_parser("show", help="print a profile's tables")
    sh.add_argument("profile")
    sh.set_defaults(fn=cmd_show)

    pl = sub.add_parser("plot", help="write PNG plots of a profile")
    pl.add_argument("profile")
    pl.add_argument("--out", default="plots")
    pl.add_argument("--acceptance", type=float, help="per-position acceptance for random-weight profiles")
    pl.set_defaults(fn=cmd_plot)

    v = sub.add_parser("validate", help="closed-loop load at off-grid points vs the profile's prediction")
    v.add_argument("profile")
    v.add_argument("--points", type=int, default=4)
    v.add_argument("--model", help="model to run (default: the profile's)")
    v.add_argument("--requests-per-seq", type=int, default=2)
    v.add_argument("--max-tokens", type=int, default=64)
    v.set_defaults(fn=cmd_validate)

    ac = sub.add_parser("acceptance", help="measure per-position acceptance on a prompt set (real weights)")
    ac.add_argument("--model", required=True)
    ac.add_argument("--method", default="ngram")
    ac.add_argument("--k", default="1..8", help="e.g. 1..8 or 2,4")
    ac.add_argument("--dataset", type=Path, help="Spec-Bench jsonl (default: profiler/data/, shipped)")
    ac.add_argument("--limit", type=int, default=16, help="prompts per category (the first ones in the file)")
    ac.add_argument("--categories", type=_strs, help="e.g. summarization,coding (default: all)")
    ac.add_argument("--batch", type=int, default=8, help="prompts running at once (sizes the KV pool)")
    ac.add_argument("--max-tokens", type=int, default=64)
    ac.add_argument("--draft-model")
    ac.add_argument("--draft-layers", type=int, help="method draft without --draft-model: truncated target")
    ac.add_argument("--prompt-lookup-min", type=int, help="ngram window (vLLM's default: = max, or 5)")
    ac.add_argument("--prompt-lookup-max", type=int, help="ngram window (vLLM's default: = min, or 5)")
    ac.add_argument("--out", type=Path, help="profile to add the acceptance entries to")
    ac.add_argument("--no-progress", action="store_true")
    ac.set_defaults(fn=cmd_acceptance)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return int(a.fn(a))
    except KeyboardInterrupt:
        print("\ninterrupted: finished points are saved; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
