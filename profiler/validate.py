"""``profiler validate``: does the interpolated profile predict real serving at points it never measured?

For N configurations off the grid (concurrencies between measured ones, contexts inside the measured
range but not on it) this runs end-to-end closed-loop load through ``engine.LLM`` (real requests,
continuous batching, prefill included): ``c`` requests in flight, ``requests_per_seq`` waves of
``c`` equal-length requests (so a wave's decode is not disturbed by another wave's prefill), and compares

- ITL: the per-request ``(last - first) / (n - 1)`` (planner.metrics_def.request_itl) over the steady
  decode window of its wave (from the moment the wave's last prefill finished: before that, decode steps
  share the batch with chunked prefill, which the decode surface does not model and TTFT covers), mean over
  requests, against the decode surface's step time averaged over the contexts a request passes through;
- throughput per GPU end to end (output tokens over the wall time of the run), against the prediction
  ``c * osl / (c * TTFT(isl) + (osl - 1) * step) / tp`` per wave, from the prefill and decode surfaces.

Speculative configs are validated only when the profile has no ``none`` config at tp 1: their step time
depends on how many draft tokens the drafter really proposes, which a padded sweep does not know.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from planner import metrics_def as md
from planner.profile import Profile, ProfileError, load_profile
from planner.surface import Surfaces


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


@dataclass
class Outcome:
    target: Target
    pred_itl_ms: float
    meas_itl_ms: float
    pred_thr: float
    meas_thr: float
    requests: int

    @property
    def itl_err(self) -> float:
        return (self.meas_itl_ms - self.pred_itl_ms) / self.pred_itl_ms

    @property
    def thr_err(self) -> float:
        return (self.meas_thr - self.pred_thr) / self.pred_thr


def _off_grid(values: list[int]) -> list[int]:
    """Integers strictly between consecutive measured values, at their geometric mean."""
    out = []
    for a, b in zip(values, values[1:], strict=False):
        m = int(round((a * b) ** 0.5))
        if a < m < b:
            out.append(m)
    return out


def choose_targets(profile: Profile, n: int, osl: int) -> list[Target]:
    """``n`` off-grid (config, concurrency, input length) points the surfaces can predict."""
    if n < 1:
        raise ValidateError(f"points: must be >= 1, got {n}")
    if osl < 2:
        raise ValidateError(f"max_tokens: must be >= 2 (ITL needs two tokens), got {osl}")
    surf = Surfaces(profile)
    keys = [key for key in surf.decode if key[0] == 1]
    none_keys = [key for key in keys if key[1] == "none"]
    keys = none_keys or keys
    if not keys:
        raise ValidateError("profile: no usable decode config at tp=1 to validate")
    ctxs = sorted({p.context_len for p in profile.decode if p.ok})
    lo, hi = ctxs[0], ctxs[-1]
    if hi - lo <= osl:
        raise ValidateError(
            f"max_tokens: {osl} does not fit between the measured contexts {lo} and {hi}; "
            "a request must start and end inside the measured range"
        )
    isls = [int(lo + f * (hi - osl - lo)) for f in (0.5, 0.25, 0.75, 0.1, 0.9)]
    isls = [x for x in isls if x not in ctxs] or isls
    per_key: list[list[Target]] = []
    for key in keys:
        ds = surf.decode[key]
        cs = sorted({p.concurrency for p in profile.decode if p.ok and (p.tp, p.method, p.k) == key})
        row = []
        for i, c in enumerate(_off_grid(cs)):
            isl = isls[i % len(isls)]
            if np.isfinite(ds.step_ms(c, isl)).all() and np.isfinite(ds.step_ms(c, isl + osl)).all():
                row.append(Target(key[0], key[1], key[2], c, isl, osl))
        per_key.append(row)
    # Round-robin over configs so N points cover several configs, not the first one's concurrencies.
    out = [row[i] for i in range(max(map(len, per_key))) for row in per_key if i < len(row)]
    if not out:
        raise ValidateError(
            "profile: no off-grid concurrency lies inside a measured range (need >= 2 "
            "concurrencies per config with a gap, e.g. 1 and 4)"
        )
    return out[:n]


def predict(profile: Profile, t: Target) -> tuple[float, float]:
    """(ITL ms, end-to-end throughput tok/s/GPU) the profile predicts for ``t`` (1 token per step)."""
    surf = Surfaces(profile)
    ds = surf.decode[(t.tp, t.method, t.k)]
    ctx = np.linspace(t.isl, t.isl + t.osl - 1, num=8)
    step = float(np.mean([ds.step_ms(t.concurrency, float(x))[0] for x in ctx]))
    itl = md.itl_from_step(step, 1.0)
    prefill = surf.prefill.get(t.tp)
    ttft = prefill.ttft_ms(t.isl) if prefill is not None else 0.0
    wave_ms = t.concurrency * ttft + (t.osl - 1) * step
    return itl, t.concurrency * t.osl / (wave_ms / 1000.0) / t.tp


def open_engine(profile: Profile, targets: list[Target], *, model: str) -> Any:
    """One engine.LLM for the targets of one (tp, method, k): batch and KV pool sized for the largest.

    Loading a 7B model per point would dominate a GPU validation; closed-loop concurrency is set per
    point by submitting exactly ``c`` requests per wave instead."""
    from engine.llm import LLM
    from engine.spec.config import SpecConfig

    meta = profile.metadata
    t0 = targets[0]
    bs = meta.block_size
    longest = max(t.isl + t.osl for t in targets) + t0.k + bs
    c_max = max(t.concurrency for t in targets)
    spec = None if t0.method == "none" else SpecConfig(method=t0.method, k=t0.k)
    return LLM(
        model, dtype=meta.dtype, tp=t0.tp, spec=spec, max_num_seqs=c_max, block_size=bs,
        num_gpu_blocks=-(-longest // bs) * c_max + 8, max_model_len=longest,
        weights=meta.weights if meta.weights != "none" else "auto",
    )  # fmt: skip


def measure(llm: Any, profile: Profile, t: Target, *, waves: int, seed: int = 0) -> tuple[float, float, int]:
    """(mean ITL ms, throughput tok/s/GPU, requests) of closed-loop load at ``t``: ``waves`` rounds of
    exactly ``c`` concurrent requests of equal length through ``llm``."""
    from engine.sampling import SamplingParams

    rng = np.random.default_rng(seed)
    vocab = profile.metadata.model.shape.vocab
    vocab = min(vocab, 256) if vocab <= 512 else vocab  # byte-level tokenizers: plain byte ids

    def prompts(n: int) -> list[list[int]]:
        return [rng.integers(0, vocab, size=t.isl).tolist() for _ in range(n)]

    # first-use costs (allocator growth, kernel selection, graph capture) stay out of the window
    llm.generate(prompts(t.concurrency), SamplingParams(max_tokens=4, ignore_eos=True))
    params = SamplingParams(max_tokens=t.osl, ignore_eos=True, temperature=0.0)
    done = []
    itls: list[float] = []
    start = time.monotonic()
    for _ in range(waves):
        wave = llm.generate(prompts(t.concurrency), params)
        done += wave
        # Steady decode only: from the moment the wave's last prefill finished, all c sequences decode
        # together (what the decode surface models); earlier tokens share steps with prefill chunks.
        t0 = max(c.token_times[0] for c in wave)
        for c in wave:
            tail = [x for x in c.token_times if x >= t0]
            itl = md.request_itl(tail[0], tail[-1], len(tail)) if tail else None
            if itl is not None:
                itls.append(itl)
    end = max(c.token_times[-1] for c in done)
    if not itls:
        raise ValidateError(f"max_tokens: {t.osl} left no steady decode window at c={t.concurrency}")
    itl_ms = statistics.fmean(x * 1000.0 for x in itls)
    tokens = sum(len(c.token_ids) for c in done)
    return itl_ms, md.throughput_per_gpu(tokens, end - start, t.tp), len(done)


def validate(profile: Profile, *, points: int, model: str, waves: int, osl: int) -> list[Outcome]:
    import gc

    targets = choose_targets(profile, points, osl)
    by_cfg: dict[tuple[int, str, int], list[Target]] = {}
    for t in targets:
        by_cfg.setdefault((t.tp, t.method, t.k), []).append(t)
    results: dict[Target, Outcome] = {}
    for group in by_cfg.values():
        llm = open_engine(profile, group, model=model)
        for t in group:
            pred_itl, pred_thr = predict(profile, t)
            itl, thr, n = measure(llm, profile, t, waves=waves)
            results[t] = Outcome(t, pred_itl, itl, pred_thr, thr, n)
        del llm
        gc.collect()
    return [results[t] for t in targets]


def report(outcomes: list[Outcome]) -> str:
    from profiler.acceptance import fmt

    rows = [
        [o.target.method, o.target.k, o.target.concurrency, o.target.isl, o.target.osl, o.requests,
         f"{o.pred_itl_ms:.3f}", f"{o.meas_itl_ms:.3f}", f"{100 * o.itl_err:+.1f}%",
         f"{o.pred_thr:.1f}", f"{o.meas_thr:.1f}", f"{100 * o.thr_err:+.1f}%"]
        for o in outcomes
    ]  # fmt: skip
    text = fmt(
        rows,
        [
            "method",
            "k",
            "c",
            "isl",
            "osl",
            "reqs",
            "ITL pred ms",
            "ITL meas ms",
            "ITL err",
            "tok/s/GPU pred",
            "tok/s/GPU meas",
            "thr err",
        ],
    )
    itl = [abs(o.itl_err) for o in outcomes]
    thr = [abs(o.thr_err) for o in outcomes]
    text += (
        f"\nITL error: median {100 * statistics.median(itl):.1f}%, worst {100 * max(itl):.1f}%"
        f"\nthroughput error: median {100 * statistics.median(thr):.1f}%, worst {100 * max(thr):.1f}%"
    )
    return text


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
        outcomes = validate(profile, points=a.points, model=model, waves=waves, osl=int(a.max_tokens))
    except (ProfileError, ValidateError) as exc:
        print(f"profiler validate: {exc}", file=sys.stderr)
        return 2
    print(
        f"validate {Path(a.profile).name} ({profile.metadata.model.name} on "
        f"{profile.metadata.hardware.gpu_name}): closed loop through engine.LLM vs interpolated profile"
    )
    print(report(outcomes))
    return 0
