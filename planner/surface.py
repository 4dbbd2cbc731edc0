"""Interpolated surfaces of one profile: decode step time per (tp, method, k), prefill per tp.

Decode step time is interpolated row by row: for every measured context length, a shape-preserving
PCHIP spline of log(step_ms) over log2(concurrency) (step time grows from a weight-read floor towards
linear in ``c``, which is close to a straight line on log-log axes); between rows, linearly in context
length (step time is affine in ``L`` at fixed ``c``). Rows may cover different concurrency ranges (a
sweep's points past the KV capacity fail), so the usable range at a context is the intersection of its
two bracketing rows. Concurrency outside the measured range is never evaluated; context outside it is
extrapolated linearly from the two nearest rows and flagged by the caller. Speculative points measured
at several draft coverages form one such surface per coverage, linear in coverage between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import PchipInterpolator

from planner.profile import DecodePoint, PrefillPoint, Profile

ConfigKey = tuple[int, str, int]  # (tp, method, k)


class _Row:
    """log(step_ms) over log2(c) at one context length."""

    def __init__(self, cs: np.ndarray, steps: np.ndarray) -> None:
        order = np.argsort(cs)
        self.c_min = int(cs[order[0]])
        self.c_max = int(cs[order[-1]])
        x = np.log2(cs[order].astype(float))
        y = np.log(steps[order].astype(float))
        self._const = float(y[0]) if len(x) == 1 else None
        self._f = None if len(x) == 1 else PchipInterpolator(x, y, extrapolate=False)

    def log_step(self, log2c: np.ndarray) -> np.ndarray:
        if self._f is None:
            return np.full_like(log2c, self._const, dtype=float)
        return self._f(log2c)


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi


class _Level:
    """Step time over concurrency and context at one draft coverage (rows per measured context)."""

    def __init__(self, points: list[DecodePoint]) -> None:
        by_ctx: dict[int, list[DecodePoint]] = {}
        for p in points:
            by_ctx.setdefault(p.context_len, []).append(p)
        self.contexts = np.array(sorted(by_ctx), dtype=float)
        self.rows = [
            _Row(
                np.array([p.concurrency for p in by_ctx[int(L)]]),
                np.array([p.step_ms for p in by_ctx[int(L)]]),
            )
            for L in self.contexts
        ]

    def bracket(self, ctx: float) -> tuple[int, int, float]:
        """Row indices around ``ctx`` and the weight of the second (outside the range: extrapolation)."""
        n = len(self.contexts)
        if n == 1:
            return 0, 0, 0.0
        j = int(np.searchsorted(self.contexts, ctx, side="right")) - 1
        j = min(max(j, 0), n - 2)
        lo, hi = self.contexts[j], self.contexts[j + 1]
        w = float((ctx - lo) / (hi - lo))
        if w == 0.0:  # exactly on a measured row: that row alone decides (and its full range counts)
            return j, j, 0.0
        if w == 1.0:
            return j + 1, j + 1, 0.0
        return j, j + 1, w

    def concurrency_bounds(self, ctx: float) -> tuple[int, int]:
        i, j, _ = self.bracket(ctx)
        ri, rj = self.rows[i], self.rows[j]
        return max(ri.c_min, rj.c_min), min(ri.c_max, rj.c_max)

    def step_ms(self, c: np.ndarray, ctx: float) -> np.ndarray:
        x = np.log2(c)
        i, j, w = self.bracket(ctx)
        si = np.exp(self.rows[i].log_step(x))
        out = si if j == i else si + w * (np.exp(self.rows[j].log_step(x)) - si)
        lo, hi = self.concurrency_bounds(ctx)
        out = np.where((c >= lo) & (c <= hi), out, np.nan)
        return np.where(out > 0, out, np.nan)


class DecodeSurface:
    """Step time of one (tp, method, k) over concurrency, context length and draft coverage.

    Points measured at several draft coverages (the share of sequences that verified k drafts; the
    rest verified one token) form one level each; between levels step time is linear in coverage,
    outside them it holds the nearest level's value. Without a coverage the highest level answers
    (every sequence drafting: the cost a speculative config has at most)."""

    def __init__(self, key: ConfigKey, points: list[DecodePoint]) -> None:
        self.key = key
        ok = [p for p in points if p.ok]
        if not ok:
            raise ValueError(f"config tp={key[0]} method={key[1]} k={key[2]} has no successful point")
        self.failed = [p for p in points if not p.ok]
        by_cov: dict[float, list[DecodePoint]] = {}
        for p in ok:
            by_cov.setdefault(p.coverage, []).append(p)
        self.coverages = sorted(by_cov)
        self._levels = [_Level(by_cov[cov]) for cov in self.coverages]
        self.flags = point_flags(points)
        self._points = ok
        ctxs = sorted({p.context_len for p in ok})
        self.context_range = Range(float(ctxs[0]), float(ctxs[-1]))

    def concurrency_bounds(self, ctx: float) -> tuple[int, int]:
        """Measured concurrency range usable at ``ctx`` (both bracketing rows of a level cover it)."""
        bounds = [lvl.concurrency_bounds(ctx) for lvl in self._levels]
        return min(b[0] for b in bounds), max(b[1] for b in bounds)

    def step_ms(
        self, concurrency: np.ndarray | float, ctx: float, coverage: float | None = None
    ) -> np.ndarray:
        """Interpolated step time at draft ``coverage``; NaN where ``concurrency`` is outside the
        measured range at ``ctx``."""
        c = np.atleast_1d(np.asarray(concurrency, dtype=float))
        if coverage is None or len(self._levels) == 1:
            return self._levels[-1].step_ms(c, ctx)
        vals = np.vstack([lvl.step_ms(c, ctx) for lvl in self._levels])
        covs = np.array(self.coverages)
        out = np.full(c.shape, np.nan)
        for j in range(c.size):
            finite = np.isfinite(vals[:, j])
            if finite.any():  # a level may miss a concurrency (one sequence has only coverage 0 or 1)
                out[j] = np.interp(coverage, covs[finite], vals[finite, j])
        return out

    def flags_near(self, concurrency: float, ctx: float) -> list[str]:
        """Flags of the measured points a prediction at (``concurrency``, ``ctx``) interpolates from."""
        if not self.flags:
            return []
        ctxs = sorted({p.context_len for p in self._points})
        near_ctx = {
            max([n for n in ctxs if n <= ctx], default=ctxs[0]),
            min([n for n in ctxs if n >= ctx], default=ctxs[-1]),
        }
        out = []
        for p in self._points:
            if p.context_len not in near_ctx or p.key not in self.flags:
                continue
            cs = sorted({q.concurrency for q in self._points if q.context_len == p.context_len})
            lo = max([x for x in cs if x <= concurrency], default=cs[0])
            hi = min([x for x in cs if x >= concurrency], default=cs[-1])
            if p.concurrency in (lo, hi):
                cov = "" if self.key[1] == "none" else f" coverage {p.coverage:g}"
                out += [f"c={p.concurrency} L={p.context_len}{cov}: {m}" for m in self.flags[p.key]]
        return out


NON_MONOTONIC_TOL = 0.05  # a step time this much below a smaller point's counts as non-monotonic


def point_flags(points: list[DecodePoint]) -> dict[tuple, list[str]]:
    """Why a measured decode point is doubtful: unstable timing (``stable`` False), or step time that
    falls as concurrency or context grows (by more than NON_MONOTONIC_TOL) at otherwise equal
    coordinates. Keys are ``DecodePoint.key``."""
    flags: dict[tuple, list[str]] = {}
    ok = [p for p in points if p.ok]
    for p in ok:
        if p.stable is False:
            spread = "" if p.step_ms_spread is None else f", spread {p.step_ms_spread:.0%}"
            flags.setdefault(p.key, []).append(f"unstable timing ({p.repeats} repeats{spread})")
    for axis, other in (("concurrency", "context_len"), ("context_len", "concurrency")):
        groups: dict[tuple, list[DecodePoint]] = {}
        for p in ok:
            groups.setdefault((p.tp, p.method, p.k, p.coverage, getattr(p, other)), []).append(p)
        for pts in groups.values():
            pts.sort(key=lambda p: getattr(p, axis))
            for prev, p in zip(pts, pts[1:], strict=False):
                if p.step_ms < prev.step_ms * (1 - NON_MONOTONIC_TOL):  # type: ignore[operator]
                    name = "c" if axis == "concurrency" else "L"
                    flags.setdefault(p.key, []).append(
                        f"non-monotonic: {p.step_ms:.3g} ms below {prev.step_ms:.3g} ms at "
                        f"{name}={getattr(prev, axis)}"
                    )
    return flags


def prefill_flags(points: list[PrefillPoint]) -> list[str]:
    """Why a prefill surface is doubtful: a point whose samples spread (``stable`` False), or a longer
    prompt measured faster than a shorter one (by more than NON_MONOTONIC_TOL). Prefill can only cost more
    with more tokens, so such a pair is noise in one of them, and every plan's prefill stall
    (``c x TTFT / osl``) inherits it."""
    pts = sorted(points, key=lambda p: p.input_len)
    unstable = [
        f"prefill for tp={p.tp} at {p.input_len} tokens: unstable timing ({p.samples} samples"
        + ("" if p.ttft_ms_spread is None else f", spread {p.ttft_ms_spread:.0%}")
        + "): the prefill stall carries it"
        for p in pts
        if p.stable is False
    ]
    return unstable + [
        f"prefill non-monotonic for tp={p.tp}: TTFT {p.ttft_ms:.3g} ms at {p.input_len} tokens below "
        f"{prev.ttft_ms:.3g} ms at {prev.input_len}: one of them is noise, and the prefill stall carries it"
        for prev, p in zip(pts, pts[1:], strict=False)
        if p.ttft_ms < prev.ttft_ms * (1 - NON_MONOTONIC_TOL)
    ]


class PrefillSurface:
    """TTFT of one sequence over input length for one tp: PCHIP of log(ttft) over log(input_len)."""

    def __init__(self, tp: int, points: list[PrefillPoint]) -> None:
        ok = sorted((p for p in points if p.ok), key=lambda p: p.input_len)
        if not ok:
            raise ValueError(f"prefill for tp={tp} has no successful point")
        self.tp = tp
        self.flags = prefill_flags(ok)
        x = np.log(np.array([p.input_len for p in ok], dtype=float))
        y = np.log(np.array([p.ttft_ms for p in ok], dtype=float))
        self.input_range = Range(float(ok[0].input_len), float(ok[-1].input_len))
        self._x, self._y = x, y
        self._f = PchipInterpolator(x, y, extrapolate=False) if len(ok) > 1 else None

    def ttft_ms(self, input_len: float) -> float:
        """Interpolated TTFT; outside the range, extrapolated along the end segment (caller flags it)."""
        lx = float(np.log(input_len))
        if self._f is None:
            return float(np.exp(self._y[0]) * input_len / np.exp(self._x[0]))
        if self._x[0] <= lx <= self._x[-1]:
            return float(np.exp(self._f(lx)))
        i = 0 if lx < self._x[0] else len(self._x) - 2
        slope = (self._y[i + 1] - self._y[i]) / (self._x[i + 1] - self._x[i])
        return float(np.exp(self._y[i] + slope * (lx - self._x[i])))

    def tokens_per_s_per_gpu(self, input_len: float) -> float:
        return input_len / (self.ttft_ms(input_len) / 1000.0) / self.tp


class Surfaces:
    """All surfaces of one profile, built once (planning then only evaluates splines)."""

    def __init__(self, profile: Profile) -> None:
        grouped: dict[ConfigKey, list[DecodePoint]] = {}
        for p in profile.decode:
            grouped.setdefault((p.tp, p.method, p.k), []).append(p)
        self.decode: dict[ConfigKey, DecodeSurface] = {}
        self.unusable: dict[ConfigKey, str] = {}
        for key, pts in sorted(grouped.items()):
            try:
                self.decode[key] = DecodeSurface(key, pts)
            except ValueError as exc:
                self.unusable[key] = str(exc)
        by_tp: dict[int, list[PrefillPoint]] = {}
        for p in profile.prefill:
            by_tp.setdefault(p.tp, []).append(p)
        self.prefill: dict[int, PrefillSurface] = {}
        for tp, pts in by_tp.items():
            if any(p.ok for p in pts):
                self.prefill[tp] = PrefillSurface(tp, pts)
        ctxs = sorted({p.context_len for p in profile.decode if p.ok})
        self.median_context = ctxs[len(ctxs) // 2] if ctxs else 0
        # the largest measured concurrency: nothing above it is ever planned (no extrapolation)
        self.max_concurrency = max((p.concurrency for p in profile.decode if p.ok), default=1)
