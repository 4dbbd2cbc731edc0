"""PNG plots of a profile, the ones a capacity planner reads.

- ``pareto_<method>.png``: ITL against decode throughput per GPU for every (tp, k) of one method, as the
  planner interpolates it at the plan's decode context, with the method's Pareto frontier bold, the SLA
  line, the plan's chosen point, the measured concurrencies labelled, and the acceptance used in the title.
  The ``none`` baseline is drawn grey for reference. Measurements flagged unstable (``DecodePoint.stable``
  False: noisy or non-monotonic) are ringed red.
- ``speedup_<method>_tp<tp>_L<ctx>.png``: ITL(none) / ITL(method, k) at the same (tp, c, context) over
  concurrency x k, from the measured points; the colour scale is centred at 1 (no gain) and spans the real
  range.
- ``acceptance_per_position.png``: accepted share given a draft per position, one panel per workload.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from planner.pareto import frontier
from planner.plan import Planner
from planner.profile import DecodePoint, Profile

WIDTH_IN, DPI = 10.0, 110  # 1100 px wide
K_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">"]
TP_STYLES = ["-", "--", ":", "-."]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _k_color(k: int, ks: list[int]):
    """Colours far apart in a perceptual map, one per k (tab10 repeats after 10 series)."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return cmap(0.78 * ks.index(k) / max(1, len(ks) - 1))  # stop before the pale yellow end


def plot_all(
    profile: Profile, out: Path, alpha: float | None = None, itl_ms: float = 25.0, name: str = "profile"
) -> list[Path]:
    """Write the PNGs into ``out``; returns their paths. ``alpha`` is a given per-position acceptance
    for profiles without measured acceptance (random weights); ``itl_ms`` the SLA drawn and planned for."""
    out.mkdir(parents=True, exist_ok=True)
    paths = _pareto(profile, out, alpha, itl_ms, name)
    paths += _heatmaps(profile, out, alpha)
    acc = _acceptance(profile, out)
    return paths + ([acc] if acc else [])


def _unstable(profile: Profile) -> set[tuple[int, str, int, int]]:
    """(tp, method, k, c) with a measurement flagged noisy or non-monotonic (field may be absent)."""
    return {
        (p.tp, p.method, p.k, p.concurrency)
        for p in profile.decode
        if p.ok and getattr(p, "stable", None) is False
    }


def _pareto(profile: Profile, out: Path, alpha: float | None, itl_ms: float, name: str) -> list[Path]:
    if not any(p.ok for p in profile.decode):
        return []
    plt = _plt()
    planner = Planner(profile, name)
    res = planner.plan(itl_ms, acceptance=alpha)
    inp = planner.resolve_inputs(itl_ms, None, None, None, None, None, 1.0)
    evals = planner.evaluations(inp, alpha, None)
    measured = defaultdict(set)
    for p in profile.decode:
        if p.ok:
            measured[(p.tp, p.method, p.k)].add(p.concurrency)
    unstable = _unstable(profile)
    tps = sorted({key[0] for key in evals})
    paths = []
    for method in sorted({key[1] for key in evals}):
        keys = sorted(key for key in evals if key[1] == method)
        fig, ax = plt.subplots(figsize=(WIDTH_IN, 6.2))
        if method != "none":
            _draw_baseline(ax, evals, tps)
        _draw_method(ax, method, [evals[key] for key in keys], tps, measured, unstable)
        ax.axhline(itl_ms, color="red", linestyle="--", linewidth=1.2, label=f"SLA ITL {itl_ms:g} ms")
        ch = res.choice
        if ch is not None and ch.method == method:
            what = "chosen" if res.feasible else "lowest ITL (SLA not met)"
            ax.plot([ch.predicted.throughput_per_gpu], [ch.predicted.itl_ms], marker="*", ms=20, color="gold",
                    mec="black", linestyle="none", zorder=5,
                    label=f"{what}: tp={ch.tp} k={ch.k} c={ch.max_concurrency}")  # fmt: skip
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("decode throughput per GPU (output tokens/s)")
        ax.set_ylabel("ITL (ms, log scale)")
        sources = sorted({evals[key].acc.source for key in keys if evals[key].acc.kind != "none"})
        acc_text = "; ".join(sources) if method != "none" else "no speculation"
        overall = f"plan: {res.message}" if res.choice else "plan: nothing measured"
        ax.set_title(
            f"{profile.metadata.model.name} on {profile.metadata.hardware.gpu_name}: {method}, "
            f"decode context {inp.decode_context:g} tokens (labels: concurrency)\n"
            f"acceptance: {acc_text}\n{overall}",
            fontsize=9,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        path = out / f"pareto_{method}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


def _draw_baseline(ax, evals: dict, tps: list[int]) -> None:
    """The no-speculation curves in grey, for reference on a speculative method's figure."""
    for key in (key for key in evals if key[1] == "none"):
        ev = evals[key]
        fits = ev.c <= ev.c_kv
        ax.plot(ev.thr[fits], ev.itl[fits], color="0.6", linestyle=TP_STYLES[tps.index(key[0]) % 4],
                linewidth=1, label=f"tp={key[0]} none (baseline)")  # fmt: skip


def _draw_method(ax, method: str, evs: list, tps: list[int], measured: dict, unstable: set) -> None:
    """One curve per (tp, k) of ``method`` within the KV bound, its measured concurrencies marked and
    labelled (unstable ones ringed red), and the method's Pareto frontier."""
    ks = sorted({ev.key[2] for ev in evs})
    all_thr, all_itl = [], []
    flagged = False
    for ev in evs:
        tp, _, k = ev.key
        fits = ev.c <= ev.c_kv
        if not fits.any():
            continue
        color = _k_color(k, ks) if method != "none" else "black"
        label = f"tp={tp}" + (f" k={k}" if method != "none" else "")
        thr, itl, c = ev.thr[fits], ev.itl[fits], ev.c[fits]
        ax.plot(thr, itl, color=color, linestyle=TP_STYLES[tps.index(tp) % 4], linewidth=1.2, label=label)
        at = [i for i, ci in enumerate(c) if int(ci) in measured[ev.key]]
        ax.plot(thr[at], itl[at], color=color, marker=K_MARKERS[k % len(K_MARKERS)], linestyle="none", ms=6)
        for i in at:
            ax.annotate(f"{int(c[i])}", (thr[i], itl[i]), textcoords="offset points", xytext=(4, -9),
                        fontsize=7, color=color)  # fmt: skip
            if (tp, method, k, int(c[i])) in unstable:
                flagged = True
                ax.plot(thr[i], itl[i], marker="o", ms=13, mfc="none", mec="red", mew=1.5, linestyle="none")
        all_thr.append(thr)
        all_itl.append(itl)
    if all_thr:
        thr_all, itl_all = np.concatenate(all_thr), np.concatenate(all_itl)
        front = frontier(thr_all, itl_all)
        ax.plot(thr_all[front], itl_all[front], color="crimson", linewidth=3.5, alpha=0.45,
                label=f"Pareto frontier ({method})", zorder=1)  # fmt: skip
    if flagged:
        ax.plot(
            [], [], marker="o", ms=10, mfc="none", mec="red", linestyle="none", label="unstable measurement"
        )


def _tokens_per_step(profile: Profile, method: str, k: int, point_tps: float, alpha: float | None) -> float:
    from common.metrics import tokens_per_step

    if alpha is not None and profile.metadata.weights != "real":
        return tokens_per_step(1.0, [alpha ** (i + 1) for i in range(k)])
    acc = profile.acceptance_for(method, k)
    return acc.tokens_per_step if acc else point_tps


def _tps_source(profile: Profile, method: str, alpha: float | None) -> str:
    """Where the tokens per step behind a speedup come from (shown in titles)."""
    if alpha is not None and profile.metadata.weights != "real":
        return f"acceptance given: alpha={alpha:g}, draft coverage 1"
    if any(a.method == method for a in profile.acceptance):
        return "acceptance from the profile"
    if profile.metadata.weights == "real":
        return "measured tokens per step"
    return "tokens per step = 1 (random weights, no acceptance): step-time ratio only"


def _full_coverage(points: list[DecodePoint]) -> list[DecodePoint]:
    """Per (tp, method, k, c, L), the point at the highest draft coverage measured (every sequence
    drafting): tokens per step from an acceptance belong with that step time."""
    best: dict[tuple, float] = {}
    for p in points:
        best[p.key[:5]] = max(p.coverage, best.get(p.key[:5], 0.0))
    return [p for p in points if p.coverage == best[p.key[:5]]]


def _heatmaps(profile: Profile, out: Path, alpha: float | None) -> list[Path]:
    """Speedup of (method, k) over none at the same (tp, c, ctx): ITL(none) / ITL(method, k)."""
    from matplotlib.colors import TwoSlopeNorm

    plt = _plt()
    base = {
        (p.tp, p.concurrency, p.context_len): p.step_ms for p in profile.decode if p.ok and p.method == "none"
    }
    unstable = _unstable(profile)
    paths = []
    combos = sorted({(p.tp, p.method, p.context_len) for p in profile.decode if p.ok and p.method != "none"})
    for tp, method, ctx in combos:
        pts = [p for p in profile.decode if p.ok and (p.tp, p.method, p.context_len) == (tp, method, ctx)]
        pts = _full_coverage(pts)
        ks = sorted({p.k for p in pts})
        cs = sorted({p.concurrency for p in pts})
        grid = np.full((len(ks), len(cs)), np.nan)
        for p in pts:
            b = base.get((tp, p.concurrency, ctx))
            if b:
                tps = _tokens_per_step(profile, method, p.k, p.tokens_per_step, alpha)
                grid[ks.index(p.k), cs.index(p.concurrency)] = b / (p.step_ms / tps)
        if np.isnan(grid).all():
            continue
        lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
        norm = TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 0.99), vmax=max(hi, 1.01))
        fig, ax = plt.subplots(figsize=(WIDTH_IN, max(3.5, 1.6 + 0.55 * len(ks))))
        im = ax.imshow(grid, cmap="RdYlGn", norm=norm, aspect="auto", origin="lower")
        for i, k in enumerate(ks):
            for j, c in enumerate(cs):
                if not np.isnan(grid[i, j]):
                    mark = " (!)" if (tp, method, k, c) in unstable else ""
                    ax.text(j, i, f"{grid[i, j]:.2f}{mark}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(cs)), [str(c) for c in cs])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("concurrency (sequences per replica)")
        ax.set_ylabel("k (num_speculative_tokens)")
        note = "; (!) = unstable measurement" if any(u[:2] == (tp, method) for u in unstable) else ""
        ax.set_title(
            f"ITL speed-up of {method} over none: {profile.metadata.model.name}, tp={tp}, context {ctx} "
            f"(range {lo:.2f}-{hi:.2f}x; >1 = faster)\n{_tps_source(profile, method, alpha)}{note}",
            fontsize=9,
        )
        fig.colorbar(im, ax=ax, label="speed-up (x)")
        path = out / f"speedup_{method}_tp{tp}_L{ctx}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


def _acceptance(profile: Profile, out: Path) -> Path | None:
    """One panel per workload; within it a colour per k and a line style per method, small horizontal
    offsets so equal values at the same position stay visible."""
    if not profile.acceptance:
        return None
    plt = _plt()
    by_workload: dict[str, list] = defaultdict(list)
    for a in profile.acceptance:
        by_workload[getattr(a, "workload", None) or "all prompts"].append(a)
    names = sorted(by_workload)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH_IN, 1.0 + 3.6 * rows), squeeze=False, sharey=True)
    methods = sorted({a.method for a in profile.acceptance})
    ks = sorted({a.k for a in profile.acceptance})
    max_k = max(ks)
    for ax, name in zip(axes.flat, names, strict=False):
        entries = sorted(by_workload[name], key=lambda a: (a.method, a.k))
        for n, a in enumerate(entries):
            x = np.arange(1, a.k + 1) + (n - (len(entries) - 1) / 2) * 0.04
            ax.plot(x, a.accepted_per_pos, color=_k_color(a.k, ks), marker=K_MARKERS[a.k % len(K_MARKERS)],
                    linestyle=TP_STYLES[methods.index(a.method) % 4],
                    label=f"{a.method} k={a.k} (cov {a.draft_coverage:.2f}, {a.source.kind})")  # fmt: skip
        ax.set_xticks(range(1, max_k + 1))
        ax.set_xlim(0.5, max_k + 0.5)
        ax.set_ylim(0, 1.02)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("draft position")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("accepted share, given a draft")
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle(f"acceptance per position: {profile.metadata.model.name}", fontsize=11)
    path = out / "acceptance_per_position.png"
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
