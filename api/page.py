"""The dashboard at ``/``: ITL against throughput per GPU for every configuration, SLA line, chosen point.

Drawn server-side with matplotlib (Agg) as inline SVG, so the page needs no JavaScript and no CDN.
"""

from __future__ import annotations

import html
import io
from urllib.parse import urlencode

from planner.plan import Planner

_COLORS = {"none": "black", "ngram": "tab:blue", "draft": "tab:orange", "medusa": "tab:green"}


def _figure_svg(planner: Planner, itl_ms: float, isl: int | None, osl: int | None) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = planner.plan(itl_ms, isl=isl, osl=osl)
    inp = planner.resolve_inputs(itl_ms, None, isl, osl, None, None, 1.0)
    curves = planner.curves(inp)
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=100)
    styles = ["-", "--", ":", "-."]
    tps = sorted({k[0] for k in curves})
    for (tp, method, k), (c, itl, thr, c_kv) in curves.items():
        fits = c <= c_kv
        ax.plot(
            thr[fits], itl[fits],
            linestyle=styles[tps.index(tp) % len(styles)],
            color=_COLORS.get(method),
            alpha=0.35 + 0.65 * (k / max(1, max(kk for _, _, kk in curves))) if method != "none" else 1.0,
            label=f"tp={tp} {method}" + (f" k={k}" if k else ""),
        )  # fmt: skip
    ax.axhline(itl_ms, color="red", linewidth=1, label=f"SLA ITL {itl_ms:g} ms")
    ch = res.choice
    if ch is not None:
        ax.plot(
            [ch.predicted.throughput_per_gpu], [ch.predicted.itl_ms], marker="*", markersize=16,
            color="red" if not res.feasible else "gold", markeredgecolor="black", linestyle="none",
            label=f"{'chosen' if res.feasible else 'lowest ITL'}: tp={ch.tp} {ch.method} k={ch.k} "
            f"c={ch.max_concurrency}",
        )  # fmt: skip
    ax.set_xlabel("decode throughput per GPU (tokens/s)")
    ax.set_ylabel("ITL (ms)")
    ax.set_yscale("log")
    title = f"{planner.profile.metadata.model.name}: decode context {inp.decode_context:g} tokens"
    if planner.profile.metadata.source == "synthetic":
        title += "  [SYNTHETIC profile]"
    ax.set_title(title, parse_math=False)  # a model name is text: "$" must not start mathtext
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg") :], res.message


def render_page(
    pid: str, planner: Planner, ids: list[str], *, itl_ms: float, isl: int | None, osl: int | None
) -> str:
    svg, message = _figure_svg(planner, itl_ms, isl, osl)
    meta = planner.profile.metadata
    links = " | ".join(
        f'<a href="/?{urlencode({"profile": i, "itl_ms": itl_ms})}">{html.escape(i)}</a>' for i in ids
    )
    q = {"profile": pid, "itl_ms": itl_ms} | ({"isl": isl} if isl else {}) | ({"osl": osl} if osl else {})
    warn = (
        '<p style="color:#b00"><b>Synthetic profile</b>: numbers come from an analytic model, not a '
        "measurement.</p>"
        if meta.source == "synthetic"
        else ""
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>specplan planner: {html.escape(pid)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}} code{{background:#eee}}</style></head>
<body><h1>specplan planner</h1>
<p>Profiles: {links}</p>
<p>Profile <b>{html.escape(pid)}</b>: {html.escape(meta.model.name)} on {html.escape(meta.hardware.gpu_name)}
 x{meta.hardware.gpu_count}, {html.escape(meta.engine.name)} {html.escape(meta.engine.version)}
 ({html.escape(meta.backend)} backend, weights {html.escape(meta.weights)},
 source {html.escape(meta.source)})</p>
{warn}
<form method="get"><input type="hidden" name="profile" value="{html.escape(pid)}">
ITL SLA (ms) <input name="itl_ms" value="{itl_ms:g}" size="6">
isl <input name="isl" value="{isl or ""}" size="6"> osl <input name="osl" value="{osl or ""}" size="6">
<button>plan</button></form>
<p><b>{html.escape(message)}</b> (<a href="/plan?{urlencode(q)}">JSON</a>)</p>
{svg}
</body></html>"""
