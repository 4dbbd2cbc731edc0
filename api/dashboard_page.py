"""The dashboard at ``/``: a profile chooser, the plan's inputs, and ITL against throughput per GPU.

Drawn server-side with matplotlib (Agg) as inline SVG, so the page needs no JavaScript and no CDN.
Colour is the method, marker the lookahead k, line style the tp; the Pareto frontier over every
configuration is drawn bold, with the SLA line and the chosen point.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from urllib.parse import urlencode

import numpy as np

from planner.pareto import frontier
from planner.plan import Planner, PlanResult
from planner.priors import MIX, workloads
from planner.render import speculation_lines

METHOD_COLORS = {"none": "black", "ngram": "tab:blue", "draft": "tab:orange", "medusa": "tab:green"}
K_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">"]
TP_STYLES = ["-", "--", ":", "-."]


@dataclass(frozen=True)
class PageQuery:
    """What the form asks for; ``None`` fields take the planner's defaults."""

    itl_ms: float
    isl: int | None = None
    osl: int | None = None
    acceptance: float | None = None
    draft_coverage: float | None = None
    workload: str | None = None

    def params(self, pid: str) -> dict[str, str | int | float]:
        q: dict[str, str | int | float] = {"profile": pid, "itl_ms": self.itl_ms}
        for name in ("isl", "osl", "acceptance", "draft_coverage", "workload"):
            if getattr(self, name) is not None:
                q[name] = getattr(self, name)
        return q


def _figure_svg(planner: Planner, q: PageQuery) -> tuple[str, PlanResult]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    res = planner.plan(
        q.itl_ms,
        isl=q.isl,
        osl=q.osl,
        acceptance=q.acceptance,
        draft_coverage=q.draft_coverage,
        workload=q.workload,
    )
    inp = res.inputs
    curves = planner.curves(inp, q.acceptance, q.draft_coverage)
    fig, ax = plt.subplots(figsize=(11, 6.5), dpi=100)
    tps = sorted({key[0] for key in curves})
    all_thr, all_itl = [], []
    for (tp, method, k), (c, itl, thr, c_kv) in sorted(curves.items()):
        fits = c <= c_kv
        if not fits.any():
            continue
        marks = np.unique(np.geomspace(1, fits.sum(), num=min(6, int(fits.sum()))).astype(int) - 1)
        ax.plot(
            thr[fits], itl[fits], linestyle=TP_STYLES[tps.index(tp) % len(TP_STYLES)],
            color=METHOD_COLORS.get(method, "tab:purple"), marker=K_MARKERS[k % len(K_MARKERS)],
            markevery=list(marks), markersize=5, linewidth=1, alpha=0.8,
            label=f"tp={tp} {method}" + (f" k={k}" if method != "none" else ""),
        )  # fmt: skip
        all_thr.append(thr[fits])
        all_itl.append(itl[fits])
    if all_thr:
        thr_all, itl_all = np.concatenate(all_thr), np.concatenate(all_itl)
        front = frontier(thr_all, itl_all)
        ax.plot(
            thr_all[front], itl_all[front], color="black", linewidth=3, alpha=0.6, label="Pareto frontier"
        )
    ax.axhline(q.itl_ms, color="red", linewidth=1.2, linestyle="--", label=f"SLA ITL {q.itl_ms:g} ms")
    ch = res.choice
    if ch is not None:
        ax.plot(
            [ch.predicted.throughput_per_gpu], [ch.predicted.itl_ms], marker="*", markersize=18,
            color="gold" if res.feasible else "red", markeredgecolor="black", linestyle="none",
            label=f"{'chosen' if res.feasible else 'lowest ITL'}: tp={ch.tp} {ch.method} k={ch.k} "
            f"c={ch.max_concurrency}",
        )  # fmt: skip
    ax.set_xlabel("decode throughput per GPU (tokens/s)")
    ax.set_ylabel("ITL (ms, log scale)")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    shown = [res.choice, *res.alternatives]
    kinds = sorted({ch.acceptance_kind for ch in shown if ch and ch.acceptance_kind})
    acc = (
        f"acceptance given: alpha={q.acceptance:g}"
        if q.acceptance is not None
        else f"acceptance: {', '.join(kinds) or 'none needed'}; workload {inp.workload}"
    )
    title = f"{planner.profile.metadata.model.name}: decode context {inp.decode_context:g} tokens; {acc}"
    if planner.profile.metadata.source == "synthetic":
        title += "  [SYNTHETIC profile]"
    ax.set_title(title, fontsize=10, parse_math=False)  # a model name is text: "$" must not start mathtext
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg") :], res


def _speculation_html(res: PlanResult) -> str:
    """The text answer's 'speculation:' section: why each speculative method won, lost or was excluded."""
    lines = speculation_lines(res.speculation)
    if not lines:
        return "<p>speculation: no speculative configuration in this profile</p>"
    text = html.escape("\n".join(lines))
    return f'<pre style="white-space:pre-wrap;background:#f4f4f4;padding:.5em">{text}</pre>'


def _chooser(pid: str, planners: dict[str, Planner], default: str | None) -> str:
    options = []
    for i, p in sorted(planners.items()):
        m = p.profile.metadata
        label = f"{i}: {m.model.name} on {m.hardware.gpu_name} x{m.hardware.gpu_count} ({m.source})"
        if i == default:
            label += " [default]"
        sel = " selected" if i == pid else ""
        options.append(f'<option value="{html.escape(i)}"{sel}>{html.escape(label)}</option>')
    return f'<select name="profile">{"".join(options)}</select>'


def _workload_chooser(current: str | None) -> str:
    chosen = current or MIX
    options = [
        f'<option value="{html.escape(w)}"{" selected" if w == chosen else ""}>{html.escape(w)}</option>'
        for w in workloads()
    ]
    title = "Spec-Bench category the acceptance is taken for"
    return f'<select name="workload" title="{title}">{"".join(options)}</select>'


def _num(value: float | int | None) -> str:
    return "" if value is None else f"{value:g}"


def render_page(
    pid: str,
    planners: dict[str, Planner],
    query: PageQuery,
    *,
    default: str | None,
    default_reason: str | None,
) -> str:
    planner = planners[pid]
    svg, res = _figure_svg(planner, query)
    meta = planner.profile.metadata
    warn = (
        '<p style="color:#b00"><b>Synthetic profile</b>: numbers come from an analytic model, not a '
        "measurement.</p>"
        if meta.source == "synthetic"
        else ""
    )
    why = (
        f" Default profile: <b>{html.escape(default)}</b> ({html.escape(default_reason or '')})."
        if default
        else ""
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>specplan planner: {html.escape(pid)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} label{{margin-right:1em}}
input{{width:5em}} code{{background:#eee}}</style></head>
<body><h1>specplan planner</h1>
<form method="get">
<p><label>profile {_chooser(pid, planners, default)}</label>{why}</p>
<p><label>ITL SLA (ms) <input name="itl_ms" value="{query.itl_ms:g}"></label>
<label>isl <input name="isl" value="{_num(query.isl)}"></label>
<label>osl <input name="osl" value="{_num(query.osl)}"></label>
<label>acceptance alpha <input name="acceptance" value="{_num(query.acceptance)}"
 title="per-position acceptance rate, 0..1; empty: the profile's measured acceptance"></label>
<label>draft coverage <input name="draft_coverage" value="{_num(query.draft_coverage)}"
 title="share of sequences carrying a draft, 0..1 (with acceptance)"></label>
<label>workload {_workload_chooser(query.workload)}</label>
<button>plan</button></p></form>
<p>Profile <b>{html.escape(pid)}</b>: {html.escape(meta.model.name)} on {html.escape(meta.hardware.gpu_name)}
 x{meta.hardware.gpu_count}, {html.escape(meta.engine.name)} {html.escape(meta.engine.version)}
 ({html.escape(meta.backend)} backend, weights {html.escape(meta.weights)},
 source {html.escape(meta.source)})</p>
{warn}
<p><b>{html.escape(res.message)}</b> (<a href="/plan?{urlencode(query.params(pid))}">JSON</a>,
 <a href="/docs">API</a>)</p>
{_speculation_html(res)}
{svg}
</body></html>"""
