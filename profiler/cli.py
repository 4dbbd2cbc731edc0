"""``profiler`` command line: sweep, acceptance, show, plot, validate."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common.cli_help import use_everywhere
from common.methods import WEIGHT_KINDS
from profiler.grid import GridError, load_config, quick


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def cmd_sweep(a: argparse.Namespace) -> int:
    """Steps: the grid from config and flags (checked before anything runs), the backend's sweep,
    acceptance, then the summary, plots and the plan for the grid's SLA."""
    from planner.profile import ProfileMismatchError, ProfileWriteError
    from profiler.sweep import SweepError

    try:
        cfg, n_points = _sweep_config(a)
    except GridError as exc:
        print(f"profiler sweep: {exc}", file=sys.stderr)
        return 2
    out = (
        Path(a.out) / f"{Path(cfg.model).name}-{cfg.backend}.json"
        if not str(a.out).endswith(".json")
        else Path(a.out)
    )
    print(f"sweep: {cfg.model} backend={cfg.backend} {n_points} decode points -> {out}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        profile = _run_sweep(cfg, out, a)
    except (ProfileMismatchError, GridError) as exc:
        print(f"profiler sweep: {exc}", file=sys.stderr)
        return 2
    except ProfileWriteError as exc:
        print(f"profiler sweep: {exc.strerror}; rerun with --resume once there is room", file=sys.stderr)
        return 1
    except SweepError as exc:
        print(f"profiler sweep: {exc}", file=sys.stderr)
        return 1
    if profile is None:
        print(f"profiler sweep: backend {cfg.backend!r} is not available for sweeps yet", file=sys.stderr)
        return 2
    return _finish_sweep(cfg, out, profile.metadata.weights, a, t0)


def _sweep_config(a: argparse.Namespace):
    """The sweep grid from ``--config`` and the flags, with what the backend needs checked up front
    (GridError names the field). Returns the config and its number of decode points."""
    overrides = dict(
        model=a.model, backend=a.backend, tp=a.tp, method=a.method, k=a.k, concurrency=a.concurrency,
        context=a.context, url=a.url, vllm_python=a.vllm_python, draft_model=a.draft_model, steps=a.steps,
        sla_itl_ms=a.itl_ms, served_model=a.served_model, max_tokens=a.max_tokens,
        coverage=a.coverage, max_repeats=a.max_repeats,
        acceptance=a.acceptance, measure_acceptance=False if a.no_acceptance else None,
        acceptance_prompts=a.acceptance_prompts, categories=a.categories, kv_blocks=a.kv_blocks,
        prompt_lookup_min=a.prompt_lookup_min, prompt_lookup_max=a.prompt_lookup_max, weights=a.weights,
    )  # fmt: skip
    cfg = load_config(a.config, gpu=_has_gpu(), overrides=overrides)
    if a.quick:
        cfg = quick(cfg)
    n_points = len(list(cfg.points()))
    if cfg.categories:
        _check_categories(cfg.categories)
    if cfg.backend == "engine":
        _check_model(cfg.model)
    elif cfg.backend == "hf" and not (Path(cfg.model) / "config.json").is_file():
        raise GridError(f"field 'model': backend 'hf' needs a Hugging Face directory, got {cfg.model!r}")
    elif cfg.backend == "vllm":
        _check_vllm(cfg.vllm_python)
    return cfg, n_points


def _finish_sweep(cfg, out: Path, weights: str, a: argparse.Namespace, t0: float) -> int:
    """After the decode and prefill points: acceptance, the summary, plots and the plan; 1 when the
    acceptance failed or every decode point did."""
    from planner.profile import load_profile
    from profiler.acceptance import AcceptanceError, sweep_acceptance

    try:
        sweep_acceptance(cfg, out, weights, in_process=cfg.backend in ("engine", "hf"),
                         progress=not a.no_progress)  # fmt: skip
    except AcceptanceError as exc:
        print(f"profiler sweep: acceptance: {exc}", file=sys.stderr)
        return 1
    profile = load_profile(out)
    elapsed = time.perf_counter() - t0
    from profiler.report import describe

    print(describe(profile))
    print(f"\nsweep finished in {elapsed:.1f} s; profile: {out}")
    failed = [p for p in profile.decode if not p.ok]
    if profile.decode and len(failed) == len(profile.decode):
        first = min(failed, key=lambda p: p.key)
        where = f"tp={first.tp} {first.method} k={first.k} c={first.concurrency} L={first.context_len}"
        print(f"profiler sweep: every decode point failed; the first ({where}):", file=sys.stderr)
        print(first.error, file=sys.stderr)
        print("fix the cause and rerun without --resume (failed points count as finished)", file=sys.stderr)
        return 1
    if not a.no_plots:
        from profiler.plots import plot_all

        paths = plot_all(profile, out.parent / f"{out.stem}-plots", cfg.acceptance, cfg.sla_itl_ms, out.stem)
        print(f"plots: {', '.join(str(p) for p in paths)}")
    _print_plan(out, cfg.sla_itl_ms, cfg.acceptance)
    return 0


def _run_sweep(cfg, out: Path, a: argparse.Namespace):
    """The backend's sweep; None when the backend cannot sweep."""
    from profiler.sweep import command_line

    kwargs = dict(resume=a.resume, command=command_line(), progress=not a.no_progress)
    if cfg.backend in ("engine", "hf"):
        from profiler.sweep import sweep_engine

        return sweep_engine(cfg, out, **kwargs)
    if cfg.backend == "http":
        from profiler.server_sweep import sweep_http

        return sweep_http(cfg, out, **kwargs)
    if cfg.backend == "vllm":
        from profiler.server_sweep import sweep_vllm

        return sweep_vllm(cfg, out, **kwargs)
    return None


def _check_vllm(python: str | None) -> None:
    """Backend vllm: the interpreter that will run ``vllm serve`` must import vllm (said before any point)."""
    import subprocess

    from profiler.backends.vllm import default_python

    exe = python or default_python()
    try:
        r = subprocess.run([exe, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GridError(f"field 'vllm_python': cannot run {exe!r}: {exc}") from None
    if r.returncode != 0:
        cause = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise GridError(
            f"backend 'vllm': {exe} cannot import vllm ({cause}); install vLLM there, or pass "
            "--vllm-python / set SPECPLAN_VLLM_PYTHON to a python that has it"
        )


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


def _print_plan(out: Path, itl_ms: float, acceptance: float | None) -> None:
    """The recommended plan for the default SLA, as ``planner plan`` prints it."""
    from planner.plan import Planner
    from planner.profile import load_profile
    from planner.render import render_plan

    profile = load_profile(out)
    try:  # the acceptance the profile stores (measured, or the grid's given one): what `planner plan` uses
        res = Planner(profile, out.stem).plan(itl_ms=itl_ms)
    except Exception as exc:  # noqa: BLE001 - the sweep's result stands even if planning fails
        print(f"\nplan for ITL <= {itl_ms:g} ms failed: {exc}")
        return
    given = [a for a in profile.acceptance if a.source.kind == "given"]
    note = (
        f" (acceptance given: alpha={acceptance:g}, {profile.metadata.weights} weights)"
        if given and acceptance
        else ""
    )
    print(f"\nrecommended plan for ITL <= {itl_ms:g} ms{note}:\n{render_plan(res)}")
    print(f"same answer: planner plan {out} --itl-ms {itl_ms:g}")


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
    for p in plot_all(profile, Path(a.out), a.acceptance, a.itl_ms, Path(a.profile).stem):
        print(p)
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    from profiler.validate import run_validate

    return run_validate(a)


def cmd_acceptance(a: argparse.Namespace) -> int:
    from profiler.acceptance import run_acceptance

    return run_acceptance(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="profiler",
        description="Measure decode, prefill and acceptance surfaces into a profile (sweep, acceptance), "
        "and read one back (show, plot, validate).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="measure a grid and write a profile")
    s.add_argument("--model", help="preset name, HF directory or .gguf file (default: the grid's model)")
    s.add_argument(
        "--backend",
        choices=["engine", "http", "vllm", "hf"],
        help="engine: in-process step timing; http: any OpenAI-compatible server; vllm: launches vllm serve "
        "per config; hf: Hugging Face generate (default: the grid's, engine)",
    )
    s.add_argument("--tp", type=_ints, help="tensor-parallel sizes, e.g. 1,2 (default: the grid's)")
    s.add_argument(
        "--method", type=_strs, help="speculative methods: none,ngram,draft,medusa (default: the grid's)"
    )
    s.add_argument("--k", type=_ints, help="num_speculative_tokens values, e.g. 0,2,4 (default: the grid's)")
    s.add_argument("--concurrency", type=_ints, help="concurrencies, e.g. 1,4,16 (default: the grid's)")
    s.add_argument(
        "--context", type=_ints, help="context lengths in tokens, e.g. 512,2048 (default: the grid's)"
    )
    s.add_argument("--steps", type=int, help="timed decode steps per point (default: the grid's)")
    s.add_argument(
        "--config",
        type=Path,
        help="a sweep YAML (like configs/sweeps/default.yaml); flags override it (default: that file's gpu "
        "or cpu section, by the machine)",
    )
    s.add_argument(
        "--coverage",
        type=_floats,
        help="engine backend: draft coverages of speculative points, e.g. 0,0.5,1 (default: the grid's)",
    )
    s.add_argument(
        "--max-repeats",
        type=int,
        help="engine backend: cap on timing repeats per point (default: the grid's)",
    )
    s.add_argument("--out", default="runs", help="directory (or .json path) for the profile")
    s.add_argument("--resume", action="store_true", help="skip points already in the output profile")
    s.add_argument("--quick", action="store_true", help="thin the grid to its corners")
    s.add_argument("--url", help="http backend: base URL of an OpenAI-compatible server")
    s.add_argument("--served-model", help="http backend: model name for requests (default: /v1/models)")
    s.add_argument(
        "--vllm-python",
        help="vllm backend: python of the venv with vllm (default: $SPECPLAN_VLLM_PYTHON, V/)",
    )
    s.add_argument("--draft-model", help="drafter for method 'draft' (default: the grid's)")
    s.add_argument(
        "--max-tokens", type=int, help="http/vllm: output tokens per request (default: the grid's)"
    )
    s.add_argument("--itl-ms", type=float, help="SLA for the closing plan and plots (default: the grid's)")
    s.add_argument(
        "--acceptance", type=float, help="random weights: per-position acceptance to store (given)"
    )
    s.add_argument("--no-acceptance", action="store_true", help="real weights: do not measure acceptance")
    s.add_argument("--acceptance-prompts", type=int, help="Spec-Bench prompts per category (default 4)")
    s.add_argument("--categories", type=_strs, help="Spec-Bench categories to measure (default: all)")
    s.add_argument("--prompt-lookup-min", type=int, help="ngram window (vLLM's default: = max, or 5)")
    s.add_argument("--prompt-lookup-max", type=int, help="ngram window (vLLM's default: = min, or 5)")
    s.add_argument("--kv-blocks", type=int, help="http: the server's KV blocks when /metrics does not say")
    s.add_argument("--weights", choices=WEIGHT_KINDS, help="http: what the server runs (required)")
    s.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    s.set_defaults(fn=cmd_sweep)

    sh = sub.add_parser("show", help="print a profile's tables")
    sh.add_argument("profile", help="profile JSON file")
    sh.set_defaults(fn=cmd_show)

    pl = sub.add_parser("plot", help="write PNG plots of a profile")
    pl.add_argument("profile", help="profile JSON file")
    pl.add_argument("--out", default="plots", help="directory for the PNGs")
    pl.add_argument("--acceptance", type=float, help="per-position acceptance for random-weight profiles")
    pl.add_argument("--itl-ms", type=float, default=25.0, help="ITL SLA drawn and planned for")
    pl.set_defaults(fn=cmd_plot)

    v = sub.add_parser("validate", help="closed-loop load at off-grid points vs the profile's prediction")
    v.add_argument("profile", help="profile JSON file whose predictions are checked")
    v.add_argument("--points", type=int, default=4, help="off-grid points to run")
    v.add_argument("--model", help="model to run (default: the profile's)")
    v.add_argument("--requests-per-seq", type=int, default=2, help="requests each concurrent slot sends")
    v.add_argument(
        "--min-requests",
        type=int,
        default=24,
        help="requests per point at least, whatever the concurrency (default 24: on one H200 a c = 2 "
        "point of 8 requests moved 20%% between runs)",
    )
    v.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    v.add_argument(
        "--controlled",
        help="controlled acceptance for ngram/draft, e.g. alpha=0.7,coverage=0.8 (default with random "
        "weights; 'off' = the drafter's own acceptance)",
    )
    v.add_argument("--draft-model", help="drafter for method draft (default: from the profile's command)")
    v.add_argument("--draft-layers", type=int, help="drafter = the target's first N layers")
    v.add_argument("--method", type=_strs, help="validate only these methods, e.g. none,ngram")
    v.add_argument("--k", type=_ints, help="validate only these k, e.g. 0,4")
    v.add_argument(
        "--dataset",
        type=Path,
        help="Spec-Bench style questions JSONL (default: the packaged profiler/data set)",
    )
    v.set_defaults(fn=cmd_validate)

    ac = sub.add_parser("acceptance", help="measure per-position acceptance on a prompt set (real weights)")
    ac.add_argument("--model", required=True, help="model with real weights: preset, HF directory or .gguf")
    ac.add_argument("--method", default="ngram", help="speculative method: ngram, draft or medusa")
    ac.add_argument("--k", default="1..8", help="num_speculative_tokens values, e.g. 1..8 or 2,4")
    ac.add_argument(
        "--dataset",
        type=Path,
        help="Spec-Bench-format JSONL (default: the shipped profiler/data/spec_bench_question.jsonl)",
    )
    ac.add_argument("--limit", type=int, default=16, help="prompts per category (the first ones in the file)")
    ac.add_argument("--categories", type=_strs, help="e.g. summarization,coding (default: all)")
    ac.add_argument("--batch", type=int, default=8, help="prompts running at once (sizes the KV pool)")
    ac.add_argument("--max-tokens", type=int, default=64, help="output tokens per prompt")
    ac.add_argument("--draft-model", help="drafter for method 'draft' (default: truncated target)")
    ac.add_argument("--draft-layers", type=int, help="method draft without --draft-model: truncated target")
    ac.add_argument("--prompt-lookup-min", type=int, help="ngram window (vLLM's default: = max, or 5)")
    ac.add_argument("--prompt-lookup-max", type=int, help="ngram window (vLLM's default: = min, or 5)")
    ac.add_argument("--out", type=Path, help="profile to add the acceptance entries to")
    ac.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    ac.set_defaults(fn=cmd_acceptance)
    return use_everywhere(p)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return int(a.fn(a))
    except KeyboardInterrupt:
        print("\ninterrupted: finished points are saved; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
