"""``profiler validate``: does the planner predict real serving at points the profile never measured?

For every (tp, method, k) of the profile (none, ngram, draft, medusa alike), ``--points`` off-grid
points (concurrencies between measured ones, input lengths inside the measured context range but not on
it) are run end to end as a user would measure a deployment: ``engine serve`` is started for the config,
the profiler's own closed-loop load generator (``profiler.backends.http``) drives it over HTTP with
Spec-Bench prompts of exactly ``isl`` tokens (as the server counts them) and output lengths spread around
``osl`` (so requests arrive spread over the decode, not in waves), and ``/metrics`` is scraped around
each point. Every point first sends its prompt set once (warm-up; for the controlled drafter it records
the greedy continuations, k + 1 tokens longer than measured; a speculative config gets a second warm-up
pass), then measures a last pass. The server runs without prefix caching, so every pass prefills its
prompts as fresh traffic does: the planner's ITL includes those prefills (``c x TTFT / osl``).

Acceptance: with real weights the drafter's real acceptance; with random weights (which accept nothing)
the controlled-acceptance drafter (``engine serve --spec-controlled``, engine/spec/controlled.py), whose
drafting cost is the real method's. Either way the planner predicts at the acceptance the server's own
counters measured in the point's window, so the comparison checks the step-time surfaces and the
planner's arithmetic, not the acceptance guess.

Compared per point: mean ITL (per request ``(last - first) / (n - 1)``) and p90 ITL against the
planner's ITL (it predicts one value: the p90 column shows how far the tail lies above it), and
throughput per GPU over the steady window (where ``c`` were decoding at once; mean in flight printed)
against the planner's throughput ``c / ITL / tp``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np

from common import metrics as md
from common.tables import text_table
from planner.plan import Planner
from planner.profile import Acceptance, Profile, ProfileError, load_profile
from planner.surface import DecodeSurface, Surfaces
from profiler.prompts import load_questions

if TYPE_CHECKING:
    from profiler.backends.http import LoadResult

DEFAULT_CONTROLLED = "alpha=0.7,coverage=0.8"


class ValidateError(ValueError):
    """Bad input for a validation run; the message names the field and the value."""


@dataclass(frozen=True)
class Target:
    tp: int
    method: str
    k: int
    concurrency: int
    isl: int
    osl: int

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.tp, self.method, self.k)


@dataclass
class Outcome:
    target: Target
    pred_itl_ms: float
    meas_itl_ms: float
    pred_thr: float
    meas_thr: float
    requests: int
    meas_p90_ms: float = float("nan")
    in_flight: float = float("nan")
    tokens_per_step: float = 1.0

    @property
    def itl_err(self) -> float:
        return (self.meas_itl_ms - self.pred_itl_ms) / self.pred_itl_ms

    @property
    def p90_err(self) -> float:
        return (self.meas_p90_ms - self.pred_itl_ms) / self.pred_itl_ms

    @property
    def thr_err(self) -> float:
        return (self.meas_thr - self.pred_thr) / self.pred_thr


@dataclass
class Failure:
    key: tuple[int, str, int]
    reason: str


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    acceptance: dict[tuple[int, str, int], list[Acceptance]] = field(default_factory=dict)


def _off_grid(values: list[int]) -> list[int]:
    """Integers strictly between consecutive measured values, at their geometric mean."""
    out = []
    for a, b in zip(values, values[1:], strict=False):
        m = int(round((a * b) ** 0.5))
        if a < m < b:
            out.append(m)
    return out


def choose_targets(
    profile: Profile, n: int, osl: int, methods: list[str] | None = None, ks: list[int] | None = None
) -> list[Target]:
    """Up to ``n`` off-grid (concurrency, input length) points for every decode config of the profile
    (or those of ``methods`` / ``ks`` when given)."""
    if n < 1:
        raise ValidateError(f"points: must be >= 1, got {n}")
    if osl < 2:
        raise ValidateError(f"max_tokens: must be >= 2 (ITL needs two tokens), got {osl}")
    surf = Surfaces(profile)
    if not surf.decode:
        raise ValidateError("profile: no successful decode point to validate")
    isls = _off_grid_input_lengths(profile, osl)
    keys = [
        key for key in sorted(surf.decode) if (not methods or key[1] in methods) and (not ks or key[2] in ks)
    ]
    if not keys:
        raise ValidateError(f"method/k: no decode config of the profile matches methods={methods} k={ks}")
    out = [t for key in keys for t in _targets_of(profile, surf.decode[key], isls, osl, n)]
    if not out:
        raise ValidateError(
            "profile: no off-grid concurrency lies inside a measured range (need >= 2 "
            "concurrencies per config with a gap, e.g. 1 and 4)"
        )
    return out


def _off_grid_input_lengths(profile: Profile, osl: int) -> list[int]:
    """Input lengths whose requests start and end inside the measured contexts, off the measured ones
    where possible."""
    ctxs = sorted({p.context_len for p in profile.decode if p.ok})
    lo, hi = ctxs[0], ctxs[-1]
    if hi - lo <= osl:
        raise ValidateError(
            f"max_tokens: {osl} does not fit between the measured contexts {lo} and {hi}; "
            "a request must start and end inside the measured range"
        )
    isls = [int(lo + f * (hi - osl - lo)) for f in (0.5, 0.25, 0.75, 0.1, 0.9)]
    return [x for x in isls if x not in ctxs] or isls


def _targets_of(profile: Profile, ds: DecodeSurface, isls: list[int], osl: int, n: int) -> list[Target]:
    """Up to ``n`` off-grid concurrencies of one config whose step time is known over the request,
    spread over the measured range rather than the lowest ones."""
    key = ds.key
    cs = sorted({p.concurrency for p in profile.decode if p.ok and (p.tp, p.method, p.k) == key})
    row = []
    for i, c in enumerate(_off_grid(cs)):
        isl = isls[i % len(isls)]
        if np.isfinite(ds.step_ms(c, isl)).all() and np.isfinite(ds.step_ms(c, isl + osl)).all():
            row.append(Target(key[0], key[1], key[2], c, isl, osl))
    if len(row) <= n:
        return row
    return (
        [row[round(i * (len(row) - 1) / max(1, n - 1))] for i in range(n)] if n > 1 else [row[len(row) // 2]]
    )


def predict(profile: Profile, t: Target, acceptance: Acceptance | None = None) -> tuple[float, float, float]:
    """(ITL ms, decode throughput tok/s/GPU, tokens per step) the planner predicts for ``t`` at the
    given acceptance (the one the server measured; required for speculative configs)."""
    planner = Planner(profile)
    if t.key not in planner.surfaces.decode:
        raise ValidateError(f"profile: no decode surface for tp={t.tp} method={t.method} k={t.k}")
    if t.method != "none" and acceptance is None:
        raise ValidateError(f"acceptance: none measured for method={t.method} k={t.k}")
    inp = planner.resolve_inputs(1e9, None, t.isl, t.osl, None, None, 1.0)
    override = {(t.method, t.k): acceptance} if acceptance is not None else None
    ev = planner._evaluate(planner.surfaces.decode[t.key], inp, override, None)  # noqa: SLF001
    if isinstance(ev, str):
        raise ValidateError(f"planner: {ev}")
    hit = np.flatnonzero(ev.c == t.concurrency)
    if hit.size == 0 or not np.isfinite(ev.itl[hit[0]]):
        raise ValidateError(f"concurrency: {t.concurrency} outside the measured range for {t.key}")
    i = int(hit[0])
    return float(ev.itl[i]), float(ev.thr[i]), float(ev.tps)


# -- the server ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(
    profile: Profile,
    targets: list[Target],
    *,
    model: str,
    port: int,
    controlled: str | None,
    draft_model: str | None,
    draft_layers: int | None,
) -> list[str]:
    """``engine serve`` for the targets of one config: batch and KV pool sized for the largest."""
    meta = profile.metadata
    t0 = targets[0]
    bs = meta.block_size
    # the record pass runs k + 1 tokens past the longest measured output (warm_then_measure)
    longest = max(t.isl + longest_output(t.osl) for t in targets) + 2 * t0.k + 2 * bs
    c_max = max(t.concurrency for t in targets)
    cmd = [
        sys.executable, "-m", "engine.cli", "serve", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--dtype", meta.dtype, "--tp", str(t0.tp), "--block-size", str(bs),
        "--max-num-seqs", str(c_max), "--max-model-len", str(longest),
        "--num-gpu-blocks", str(-(-longest // bs) * c_max + 16), "--log-level", "warning",
        "--no-enable-prefix-caching",  # every pass prefills its prompts, as fresh traffic does
    ]  # fmt: skip
    if meta.weights in ("real", "random"):
        cmd += ["--weights", meta.weights]
    if t0.method != "none":
        cmd += ["--spec", t0.method, "--k", str(t0.k)]
        if t0.method == "draft":
            if draft_model:
                cmd += ["--draft-model", draft_model]
            if draft_layers:
                cmd += ["--draft-layers", str(draft_layers)]
        if controlled and t0.method in ("ngram", "draft"):
            cmd += ["--spec-controlled", controlled]
    return cmd


@contextlib.contextmanager
def running_server(cmd: list[str], port: int, *, timeout_s: float) -> Iterator[str]:
    """Start ``cmd``, wait for /health, yield its URL; always stop it. Errors carry the log's tail."""
    with tempfile.TemporaryDirectory(prefix="validate-serve-") as tmp:
        log_path = Path(tmp) / "serve.log"
        with log_path.open("w") as log_file:
            yield from _serve(cmd, port, log_file, log_path, timeout_s)


def _serve(cmd: list[str], port: int, log_file, log_path: Path, timeout_s: float) -> Iterator[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def tail() -> str:
        log_file.flush()
        return "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-15:])

    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"engine serve exited with code {proc.returncode}:\n{tail()}")
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine serve not healthy after {timeout_s:.0f} s:\n{tail()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- one point -----------------------------------------------------------------------------------------
def _spread_bounds(osl: int) -> tuple[int, int]:
    """Shortest and longest of ``spread_output_lengths``: ``osl -/+ osl // 2`` (one length below 4)."""
    return (osl - osl // 2, osl + osl // 2) if osl >= 4 else (osl, osl)


def longest_output(osl: int) -> int:
    """The longest of ``spread_output_lengths(osl, n)`` for any ``n``: what a server's context must hold."""
    return _spread_bounds(osl)[1]


def spread_output_lengths(osl: int, n: int) -> list[int]:
    """``n`` output lengths spread evenly over ``_spread_bounds(osl)`` (mean ``osl``, at least 2 tokens) in
    a fixed shuffled order. With one length for every request a closed loop runs in waves: its requests
    start and end together and their prefills run as one batch. The planner's prefill stall
    (``c x TTFT / osl``) describes arrivals spread over the decode, as real traffic's mixed output
    lengths give; spread lengths give the closed loop that too."""
    lo, hi = _spread_bounds(osl)
    if n <= 1 or lo == hi:
        return [osl] * max(n, 1)
    lengths = np.rint(np.linspace(lo, hi, n)).astype(int)
    np.random.default_rng(0).shuffle(lengths)
    return [int(x) for x in lengths]


def warm_then_measure(
    url: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    isl: int,
    osl: int,
    k: int,
    dataset: Path | None = None,
) -> LoadResult:
    """Closed-loop load of Spec-Bench prompts of exactly ``isl`` tokens and output lengths of mean ``osl``
    (``spread_output_lengths``): a warm-up pass (two for a speculative config), then the measured pass
    (whose requests all succeeded and had ``isl`` prompt tokens as the server counted)."""
    from profiler.backends import http as httpb
    from profiler.prompts import prompts_of_length

    texts = prompts_of_length(requests, isl, dataset)
    prompts = httpb.exact_prompts(url, model, texts, isl)
    lengths = spread_output_lengths(osl, requests)
    load = dict(concurrency=concurrency, num_requests=requests, max_tokens=lengths)
    # Warm-up, which also records the greedy continuations for the controlled drafter: k + 1 tokens
    # longer than the longest measured request, so the record covers their last step too.
    httpb.run_load(url, model, prompts, scrape=False, **(load | {"max_tokens": max(lengths) + k + 1}))
    if k > 0:
        # A speculative config drafts only from the second pass on (the controlled drafter replays the
        # first pass's record); on a fresh machine its verify and drafter shapes then compile Triton
        # kernels and capture CUDA graphs: measured on one H200 (draft k=4, c=2), a first drafting pass
        # gave 13.7 ms ITL, a later one 5.1 ms. One drafting pass more keeps that out of the window.
        httpb.run_load(url, model, prompts, scrape=False, **load)
    res = httpb.run_load(url, model, prompts, **load)
    failed = [r.error for r in res.records if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(res.records)} requests failed: {failed[0]}")
    lengths = sorted({r.prompt_tokens for r in res.records})
    if lengths != [isl]:
        raise RuntimeError(f"prompts: the server counted {lengths} prompt tokens, the point is isl={isl}")
    return res


def measure_point(
    url: str,
    model: str,
    profile: Profile,
    t: Target,
    *,
    waves: int,
    min_requests: int = 1,
    dataset: Path | None = None,
) -> tuple[Outcome, Acceptance | None]:
    """Warm-up pass then measured pass of closed-loop load at ``t`` (``waves`` requests per slot, at
    least ``min_requests``); the planner's prediction at the acceptance measured in the measured pass."""
    from profiler.backends import http as httpb
    from profiler.grid import PointSpec

    res = warm_then_measure(
        url, model, concurrency=t.concurrency, requests=max(waves * t.concurrency, min_requests), isl=t.isl,
        osl=t.osl, k=t.k,
        dataset=dataset,
    )  # fmt: skip
    spec = PointSpec(t.tp, t.method, t.k, t.concurrency, t.isl)
    acc = httpb.to_acceptance(spec, res, model=model, detail=f"validate window at c={t.concurrency}")
    if t.method != "none" and acc is None:
        raise RuntimeError("the server's /metrics showed no drafts in the window: acceptance unknown")
    itls = res.itl_ms()
    if not itls:
        raise RuntimeError("no request streamed two timed tokens: the ITL cannot be measured")
    pred_itl, pred_thr, tps = predict(profile, t, acc)
    stats = md.summarize(itls)
    w = res.steady
    outcome = Outcome(
        t, pred_itl, stats.mean, pred_thr, res.throughput_per_gpu(t.tp), len(res.ok),
        meas_p90_ms=stats.p90, in_flight=w.mean_in_flight if w else float("nan"), tokens_per_step=tps,
    )  # fmt: skip
    return outcome, acc


def validate(
    profile: Profile,
    *,
    points: int,
    model: str,
    waves: int,
    osl: int,
    controlled: str | None,
    min_requests: int = 1,
    draft_model: str | None = None,
    draft_layers: int | None = None,
    methods: list[str] | None = None,
    ks: list[int] | None = None,
    dataset: Path | None = None,
    startup_s: float = 900.0,
    echo=print,
) -> Run:
    """Every config's targets through its own ``engine serve``; a config that fails is recorded, the
    others still run."""
    targets = choose_targets(profile, points, osl, methods, ks)
    by_cfg: dict[tuple[int, str, int], list[Target]] = {}
    for t in targets:
        by_cfg.setdefault(t.key, []).append(t)
    run = Run()
    for key, group in by_cfg.items():
        port = _free_port()
        cmd = serve_command(
            profile, group, model=model, port=port, controlled=controlled, draft_model=draft_model,
            draft_layers=draft_layers,
        )  # fmt: skip
        echo(f"[validate] tp={key[0]} {key[1]} k={key[2]}: starting {shlex.join(cmd[2:])}", flush=True)
        try:
            with running_server(cmd, port, timeout_s=startup_s) as url:
                for t in group:
                    echo(f"[validate]   c={t.concurrency} isl={t.isl} osl={t.osl} ...", flush=True)
                    outcome, acc = measure_point(
                        url, model, profile, t, waves=waves, min_requests=min_requests, dataset=dataset
                    )
                    run.outcomes.append(outcome)
                    if acc is not None:
                        run.acceptance.setdefault(key, []).append(acc)
        except (RuntimeError, ValidateError, httpx.HTTPError, OSError) as exc:
            run.failures.append(Failure(key, str(exc)))
            echo(f"[validate] tp={key[0]} {key[1]} k={key[2]} FAILED: {exc}", flush=True)
    return run


# -- the report ----------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%" if np.isfinite(x) else "n/a"


def _summary(label: str, errs: list[float]) -> str:
    a = [abs(e) for e in errs if np.isfinite(e)]
    if not a:
        return f"{label}: n/a"
    return f"{label}: median {100 * statistics.median(a):.1f}%, worst {100 * max(a):.1f}%"


def report(outcomes: list[Outcome]) -> str:
    rows = [
        [o.target.method, o.target.k, o.target.concurrency, o.target.isl, o.target.osl, o.requests,
         f"{o.in_flight:.2f}", f"{o.tokens_per_step:.2f}",
         f"{o.pred_itl_ms:.3f}", f"{o.meas_itl_ms:.3f}", _pct(o.itl_err),
         f"{o.meas_p90_ms:.3f}", _pct(o.p90_err),
         f"{o.pred_thr:.1f}", f"{o.meas_thr:.1f}", _pct(o.thr_err)]
        for o in outcomes
    ]  # fmt: skip
    header = ["method", "k", "c", "isl", "osl", "reqs", "in flight", "tok/step", "ITL pred ms",
              "ITL meas ms", "ITL err", "p90 meas ms", "p90 err", "tok/s/GPU pred", "tok/s/GPU meas",
              "thr err"]  # fmt: skip
    lines = [text_table(rows, header), ""]
    groups: dict[tuple[str, int], list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault((o.target.method, o.target.k), []).append(o)
    for (method, k), os_ in groups.items():
        lines.append(
            f"{method} k={k} ({len(os_)} points): "
            + "; ".join(
                _summary(lbl, [f(o) for o in os_])
                for lbl, f in (
                    ("ITL", lambda o: o.itl_err),
                    ("p90 ITL", lambda o: o.p90_err),
                    ("throughput", lambda o: o.thr_err),
                )
            )  # fmt: skip
        )
    lines.append(_summary("ITL error", [o.itl_err for o in outcomes]))
    lines.append(_summary("p90 ITL error", [o.p90_err for o in outcomes]))
    lines.append(_summary("throughput error", [o.thr_err for o in outcomes]))
    return "\n".join(lines)


def _acceptance_lines(run: Run) -> list[str]:
    out = []
    for (tp, method, k), accs in run.acceptance.items():
        for a in accs:
            pos = ", ".join(f"{x:.2f}" for x in a.accepted_per_pos)
            out.append(
                f"acceptance used for tp={tp} {method} k={k}: coverage {a.draft_coverage:.2f}, per position "
                f"[{pos}], {a.tokens_per_step:.2f} tokens/step ({a.samples} decode steps, {a.source.detail})"
            )
    return out


def _draft_model_from_command(command: str) -> str | None:
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, w in enumerate(words[:-1]):
        if w == "--draft-model":
            return words[i + 1]
    return None


def run_validate(a: argparse.Namespace) -> int:
    """Entry point of ``profiler validate`` (arguments defined in profiler/cli.py)."""
    try:
        profile = load_profile(a.profile)
        if profile.metadata.source != "measured":
            raise ValidateError(
                f"profile: source is {profile.metadata.source!r}; validate a measured profile"
            )
        model = a.model or profile.metadata.model.name
        waves = int(getattr(a, "requests_per_seq", 2))
        if waves < 1:
            raise ValidateError(f"requests_per_seq: must be >= 1, got {waves}")
        min_requests = int(getattr(a, "min_requests", 1))
        if min_requests < 1:
            raise ValidateError(f"min_requests: must be >= 1, got {min_requests}")
        controlled = getattr(a, "controlled", None)
        if controlled is None and profile.metadata.weights != "real":
            controlled = DEFAULT_CONTROLLED  # random weights accept nothing: validate at a known acceptance
        if controlled and controlled.lower() == "off":
            controlled = None
        draft_model = (
            getattr(a, "draft_model", None)
            or next((x.source.drafter for x in profile.acceptance if x.source.drafter), None)
            or _draft_model_from_command(profile.metadata.command)
        )
        methods, ks = getattr(a, "method", None), getattr(a, "k", None)
        dataset = getattr(a, "dataset", None)
        questions = load_questions(dataset)
        choose_targets(profile, a.points, int(a.max_tokens), methods, ks)  # bad input fails before any server
        meta = profile.metadata
        print(
            f"validate {Path(a.profile).name} ({meta.model.name}, {meta.weights} weights, on "
            f"{meta.hardware.gpu_name}): engine serve over HTTP, closed loop, vs the planner"
            + (f"; controlled acceptance {controlled}" if controlled else "; real acceptance"),
            flush=True,
        )
        print(
            f"prompts: {len(questions)} questions ({', '.join(sorted({q['category'] for q in questions}))})"
        )
        run = validate(
            profile, points=a.points, model=model, waves=waves, osl=int(a.max_tokens), controlled=controlled,
            draft_model=draft_model, draft_layers=getattr(a, "draft_layers", None), methods=methods, ks=ks,
            dataset=dataset, min_requests=min_requests,
        )  # fmt: skip
    except (ProfileError, ValidateError, FileNotFoundError, ValueError) as exc:
        print(f"profiler validate: {exc}", file=sys.stderr)
        return 2
    if run.outcomes:
        print(report(run.outcomes))
        for line in _acceptance_lines(run):
            print(line)
    for f in run.failures:
        print(
            f"profiler validate: tp={f.key[0]} {f.key[1]} k={f.key[2]} not validated: {f.reason}",
            file=sys.stderr,
        )
    if run.failures or not run.outcomes:
        return 1
    return 0
