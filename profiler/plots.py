"""PNG plots of a profile: ITL vs throughput per GPU per configuration, the speedup heatmap over
concurrency x k (per method and context), and acceptance per position."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from planner.profile import DecodePoint, Profile


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(
    profile: Profile, out: Path, acceptance: dict[tuple[str, int], float] | None = None
) -> list[Path]:
    """Write the PNGs into ``out``; returns their paths. ``acceptance`` maps (method, k) to tokens per
    step used for random-weight profiles (else the points' own tokens per step)."""
    out.mkdir(parents=True, exist_ok=True)
    return [p for p in (_itl_vs_thr(profile, out, acceptance), *_heatmaps(profile, out, acceptance),
                        _acceptance(profile, out)) if p]  # fmt: skip


def _tps(profile: Profile, method: str, k: int, point_tps: float, acceptance) -> float:
    if acceptance and (method, k) in acceptance:
        return acceptance[(method, k)]
    acc = profile.acceptance_for(method, k)
    return acc.tokens_per_step if acc else point_tps


def _tps_source(profile: Profile, method: str, acceptance) -> str:
    """Where the tokens per step behind a speculative curve come from (shown in titles)."""
    if acceptance and any(m == method for m, _ in acceptance):
        return "given acceptance"
    if any(a.method == method for a in profile.acceptance):
        return "profile acceptance"
    if profile.metadata.weights == "real":
        return "measured tok/step"
    return "tok/step = 1 (random weights, no acceptance: step-time ratio only)"


def _full_coverage(points: list[DecodePoint]) -> list[DecodePoint]:
    """Per (tp, method, k, c, L), the point at the highest draft coverage measured (every sequence
    drafting): tokens per step from an acceptance belong with that step time."""
    best: dict[tuple, float] = {}
    for p in points:
        best[p.key[:5]] = max(p.coverage, best.get(p.key[:5], 0.0))
    return [p for p in points if p.coverage == best[p.key[:5]]]


def _itl_vs_thr(profile: Profile, out: Path, acceptance) -> Path | None:
    plt = _plt()
    from planner.surface import point_flags

    groups = defaultdict(list)
    for p in _full_coverage([p for p in profile.decode if p.ok]):
        groups[(p.tp, p.method, p.k, p.context_len)].append(p)
    if not groups:
        return None
    flags = point_flags(profile.decode)
    flagged: list[tuple[float, float]] = []
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for (tp, method, k, ctx), pts in sorted(groups.items()):
        pts.sort(key=lambda p: p.concurrency)
        tps = [_tps(profile, method, k, p.tokens_per_step, acceptance) for p in pts]
        itl = [p.step_ms / t for p, t in zip(pts, tps, strict=True)]
        thr = [p.concurrency * t / (p.step_ms / 1000) / tp for p, t in zip(pts, tps, strict=True)]
        ax.plot(thr, itl, marker="o", ms=3, label=f"tp{tp} {method} k={k} L={ctx}")
        flagged += [(x, y) for p, x, y in zip(pts, thr, itl, strict=True) if p.key in flags]
    if flagged:
        ax.scatter(*zip(*flagged, strict=True), marker="x", s=40, c="red", zorder=5,
                   label="flagged: unstable or non-monotonic")  # fmt: skip
    ax.set_xlabel("output tokens/s per GPU")
    ax.set_ylabel("ITL (ms)")
    ax.set_xscale("log")
    ax.set_title(f"{profile.metadata.model.name} on {profile.metadata.hardware.gpu_name}")
    ax.legend(fontsize=6, ncol=2)
    path = out / "itl_vs_throughput.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _heatmaps(profile: Profile, out: Path, acceptance) -> list[Path]:
    """Speedup of (method, k) over k=0 at the same (tp, c, ctx): ITL(none) / ITL(method, k)."""
    plt = _plt()
    base = {
        (p.tp, p.concurrency, p.context_len): p.step_ms for p in profile.decode if p.ok and p.method == "none"
    }
    paths = []
    combos = sorted({(p.tp, p.method, p.context_len) for p in profile.decode if p.ok and p.method != "none"})
    for tp, method, ctx in combos:
        pts = [p for p in profile.decode if p.ok and (p.tp, p.method, p.context_len) == (tp, method, ctx)]
        pts = _full_coverage(pts)
        ks = sorted({p.k for p in pts})
        cs = sorted({p.concurrency for p in pts})
        grid = [[float("nan")] * len(cs) for _ in ks]
        for p in pts:
            b = base.get((tp, p.concurrency, ctx))
            if b:
                tps = _tps(profile, method, p.k, p.tokens_per_step, acceptance)
                grid[ks.index(p.k)][cs.index(p.concurrency)] = b / (p.step_ms / tps)
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(cs), 1 + 0.5 * len(ks)))
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0.5, vmax=1.5, aspect="auto", origin="lower")
        for i in range(len(ks)):
            for j in range(len(cs)):
                if grid[i][j] == grid[i][j]:
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(cs)), [str(c) for c in cs])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("concurrency")
        ax.set_ylabel("k")
        ax.set_title(
            f"speedup {method} vs none, tp{tp} L={ctx}\n{_tps_source(profile, method, acceptance)}",
            fontsize=8,
        )
        fig.colorbar(im, ax=ax)
        path = out / f"speedup_{method}_tp{tp}_L{ctx}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _acceptance(profile: Profile, out: Path) -> Path | None:
    if not profile.acceptance:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for a in profile.acceptance:
        ax.plot(
            range(1, a.k + 1), a.accepted_per_pos, marker="o", label=f"{a.method} k={a.k} ({a.source.kind})"
        )
    ax.set_xlabel("draft position")
    ax.set_ylabel("accepted given a draft")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    path = out / "acceptance_per_position.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
