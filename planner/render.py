"""Human-readable rendering of a plan (the CLI table); JSON output is the pydantic model itself."""

from __future__ import annotations

from common.tables import text_table
from planner.plan import Choice, MethodSummary, PlanResult


def _row(label: str, ch: Choice) -> list[str]:
    p = ch.predicted
    return [
        label,
        str(ch.tp),
        ch.method,
        str(ch.k),
        str(ch.max_concurrency),
        ch.limited_by,
        f"{p.itl_ms:.2f}",
        "-" if p.ttft_ms is None else f"{p.ttft_ms:.1f}",
        f"{p.tokens_per_step:.2f}",
        f"{p.throughput_per_gpu:.0f}",
    ]


def render_plan(res: PlanResult) -> str:
    """The plan as a short report: verdict, table of choice + alternatives, sizing, serve command."""
    out = []
    if res.warning:
        out.append(f"WARNING: {res.warning}")
    out.append(f"profile {res.profile} ({res.source}): {res.model} on {res.hardware}")
    i = res.inputs
    sla = f"ITL <= {i.itl_ms:g} ms" + (f", TTFT <= {i.ttft_ms:g} ms" if i.ttft_ms else "")
    out.append(
        f"SLA {sla}; isl={i.isl} osl={i.osl} (decode context {i.decode_context:g}); workload {i.workload}"
    )
    for note in i.assumptions:
        out.append(f"  assumed: {note}")
    out.append(("FEASIBLE: " if res.feasible else "INFEASIBLE: ") + res.message)
    if res.choice is None:
        out += speculation_lines(res.speculation)
        return "\n".join(out)
    header = ["", "tp", "method", "k", "max_conc", "limited_by", "ITL_ms", "TTFT_ms", "tok/step", "tok/s/GPU"]
    rows = [_row("choice" if res.feasible else "lowest ITL", res.choice)]
    rows += [_row(f"alt {n}", a) for n, a in enumerate(res.alternatives, 1)]
    out += ["", text_table(rows, header, left=1), ""]
    ch = res.choice
    out.append(
        f"KV: {ch.kv.max_concurrency} sequences fit ({ch.kv.blocks_per_replica} blocks per replica, "
        f"{ch.kv.blocks_per_sequence} per sequence at context {i.peak_context} with k={ch.k})"
    )
    if ch.predicted.prefill_stall_ms > 0:
        pr = ch.predicted
        out.append(
            f"ITL {pr.itl_ms:.2f} ms = decode {pr.itl_ms - pr.prefill_stall_ms:.2f} ms + prefill stall "
            f"{pr.prefill_stall_ms:.2f} ms ({ch.max_concurrency} in flight x TTFT {pr.ttft_ms:.1f} ms "
            f"/ osl {i.osl})"
        )
    if ch.acceptance_source:
        out.append(f"acceptance: {ch.acceptance_source}")
    out += speculation_lines(res.speculation)
    if ch.speculation_breakeven is not None:
        b = ch.speculation_breakeven
        where = (
            f"stops paying from concurrency {b.concurrency}"
            if b.concurrency is not None
            else f"pays up to the largest common measured concurrency {b.checked_up_to}"
        )
        out.append(f"speculation ({b.method} k={b.k}) at tp={b.tp} {where}")
    if ch.replicas is not None:
        r = ch.replicas
        pre = (
            f"; prefill {r.prefill_replicas} replica(s) = {r.gpus_prefill} GPUs"
            if r.prefill_replicas is not None
            else "; prefill: no prefill points in the profile"
        )
        out.append(
            f"for {r.request_rate:g} req/s: decode {r.decode_replicas} replica(s) = {r.gpus_decode} GPUs"
            f"{pre}; total {r.gpus_total} GPUs"
        )
    for f in ch.flags:
        out.append(f"note: {f}")
    if not res.feasible or ch.serve_command is None:
        out.append("serve: none (the plan is infeasible)")
        return "\n".join(out)
    out.append(f"serve: {ch.serve_command}")
    if ch.serve_backend == "engine" and ch.vllm_serve_command:
        out.append(f"vllm (translation): {ch.vllm_serve_command}")
    return "\n".join(out)


def speculation_lines(items: list[MethodSummary]) -> list[str]:
    """One line per speculative method: its best config and why it won, lost or was excluded."""
    if not items:
        return []
    out = ["speculation:"]
    for m in items:
        where = f" tp={m.tp} k={m.k}" if m.k is not None else ""
        at = f" at c={m.max_concurrency}" if m.max_concurrency is not None else ""
        perf = (
            f": ITL {m.itl_ms:.2f} ms, {m.throughput_per_gpu:.0f} tok/s/GPU"
            if m.throughput_per_gpu is not None and m.itl_ms is not None
            else ""
        )
        out.append(f"  {m.method} {m.status}{where}{at}{perf}; {m.reason}")
        if m.k_schedule:
            out.append(f"    k schedule per batch size [first, last, k]: {m.k_schedule}")
        if m.acceptance_source:
            out.append(f"    acceptance source: {m.acceptance_source}")
    return out
