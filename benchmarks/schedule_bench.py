"""Goodput of a k schedule vs every fixed k vs no speculation, per concurrency, from a profile.

Goodput at concurrency ``c`` is the predicted decode throughput per GPU (``c * tokens_per_step / step /
tp``) when the predicted ITL meets the SLA and the KV pool holds ``c`` sequences with ``k`` lookahead
slots, else 0. Step times come from the profile's interpolated surfaces (the planner's own code path,
``Planner.evaluations``); acceptance from the planner's resolution order, i.e. the literature prior for
a random-weight profile (labelled in the output). The schedule is ``planner.schedule.k_schedule`` over
the same curves. This is a computation on a committed profile, not an end-to-end measurement: it runs
on a CPU in seconds and its numbers do not depend on the machine.

    python benchmarks/schedule_bench.py [--profile configs/profiles/vicuna-7b-h100-engine.json]
        [--method ngram] [--itl-ms 30] [--isl 384] [--osl 256] [--workload mix] [--tp 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from planner.plan import Planner  # noqa: E402
from planner.profile import load_profile  # noqa: E402
from planner.schedule import KCurve, k_at, k_schedule  # noqa: E402


def goodput(ev, c: int, sla: float) -> float:
    """Throughput per GPU of ``ev`` at concurrency ``c`` when it meets the SLA and fits KV, else 0."""
    lo, hi = int(ev.c[0]), int(ev.c[-1])
    if c < lo or c > hi or c > ev.c_kv:
        return 0.0
    i = c - lo
    return float(ev.thr[i]) if float(ev.itl[i]) <= sla else 0.0


def planned_schedule(
    pl: Planner,
    inp,
    method: str,
    tp: int,
    acceptance: float | None = None,
    draft_coverage: float | None = None,
) -> tuple[dict, list[list[int]]] | None:
    """The evaluations per fixed k (0 = no speculation) of ``method`` at ``tp`` and the planner's k
    schedule over them; None when the profile lacks none or the method. ``acceptance`` (alpha per
    position) and ``draft_coverage``: a given acceptance instead of the planner's own."""
    evals = {
        key: ev
        for key, ev in pl.evaluations(inp, acceptance, draft_coverage).items()
        if key[0] == tp and key[1] in ("none", method)
    }
    fixed = {key[2]: ev for key, ev in evals.items()}
    if 0 not in fixed or len(fixed) < 2:
        return None
    hi = max(int(ev.c[-1]) for ev in fixed.values())
    curves = {k: KCurve(ev.c, ev.itl, ev.c_kv) for k, ev in fixed.items()}
    return fixed, k_schedule(curves, hi, inp.itl_ms)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=str(REPO / "configs/profiles/vicuna-7b-h100-engine.json"))
    ap.add_argument("--method", default="ngram", help="speculative method to schedule (default ngram)")
    ap.add_argument("--itl-ms", type=float, default=30.0, help="ITL SLA in ms (default 30)")
    ap.add_argument("--isl", type=int, default=384, help="input length (default 384)")
    ap.add_argument("--osl", type=int, default=256, help="output length (default 256)")
    ap.add_argument("--workload", default=None, help="Spec-Bench category (default: mix)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    ap.add_argument(
        "--all", action="store_true", help="a row per concurrency (default: powers of 2 and band edges)"
    )
    a = ap.parse_args(argv)

    path = Path(a.profile)
    pl = Planner(load_profile(path), path.stem)
    inp = pl.resolve_inputs(a.itl_ms, None, a.isl, a.osl, None, None, 1.0, a.workload)
    planned = planned_schedule(pl, inp, a.method, a.tp)
    if planned is None:
        print(f"error: the profile needs tp={a.tp} points for none and {a.method}", file=sys.stderr)
        return 2
    fixed, sched = planned
    ks = sorted(fixed)
    meta = pl.profile.metadata
    src = next(ev.acc.source for k, ev in fixed.items() if k)
    print(f"profile {path.name}: {meta.model.name} on {meta.hardware.gpu_name} ({meta.weights} weights)")
    print(
        f"method {a.method}, tp={a.tp}, ITL SLA {a.itl_ms:g} ms, isl={a.isl} osl={a.osl} "
        f"(decode context {inp.decode_context:g}), workload {inp.workload}"
    )
    print(f"acceptance: {src}")
    print(f"schedule (num_speculative_tokens_per_batch_size): {sched}")
    print()
    head = ["c", *(f"k={k}" for k in ks), "schedule", "sched k", "best fixed", "sched/best", "sched/none"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    worst, worst_none = 1e9, 1e9
    per_fixed_total = dict.fromkeys(ks, 0.0)
    sched_total = 0.0
    shown = {1 << i for i in range(16)} | {b[0] for b in sched} | {b[1] for b in sched}
    for c in sorted({int(x) for ev in fixed.values() for x in ev.c}):
        g = {k: goodput(ev, c, a.itl_ms) for k, ev in fixed.items()}
        ks_c = k_at(sched, c)
        gs = g[ks_c]
        best = max(g.values())
        for k in ks:
            per_fixed_total[k] += g[k]
        sched_total += gs
        ratio_best = gs / best if best else 1.0
        ratio_none = gs / g[0] if g[0] else float("inf") if gs else 1.0
        worst = min(worst, ratio_best)
        worst_none = min(worst_none, ratio_none)
        if not a.all and c not in shown:
            continue
        cells = [str(c), *(f"{g[k]:.0f}" for k in ks), f"{gs:.0f}", str(ks_c), f"{best:.0f}"]
        cells += [f"{ratio_best:.3f}", f"{ratio_none:.2f}" if ratio_none != float("inf") else "inf"]
        print("| " + " | ".join(cells) + " |")
    print()
    print(f"every concurrency: worst schedule / best fixed k {worst:.3f} (target >= 0.98)")
    print(f"every concurrency: worst schedule / no speculation {worst_none:.3f} (target >= 1)")
    best_fixed = max((k for k in ks if k), key=lambda k: per_fixed_total[k])
    print(
        "goodput summed over the concurrencies above (tok/s/GPU): "
        + ", ".join(f"k={k} {per_fixed_total[k]:.0f}" for k in ks)
        + f", schedule {sched_total:.0f} ({sched_total / per_fixed_total[best_fixed]:.3f}x the best single "
        f"fixed k={best_fixed}, {sched_total / per_fixed_total[0]:.3f}x no speculation)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
