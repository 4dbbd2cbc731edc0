"""End-to-end goodput of the planner's k schedule vs every fixed k vs no speculation, through `engine serve`.

`schedule_bench.py` computes the schedule's gain from a profile; this script measures it. For one profile
and method it takes the planner's k schedule (``schedule_bench.planned_schedule``: the planner's own
surfaces and acceptance), then starts one `engine serve` per config (no speculation, each fixed k the
profile measured, the schedule via ``--spec-schedule``) and drives each at every concurrency with the
profiler's closed-loop HTTP load generator (Spec-Bench prompts of exactly ``isl`` tokens, a warm-up pass,
then a measured pass), as `profiler validate` does. Goodput at a concurrency is the measured decode
throughput over the steady window when the measured mean ITL meets the SLA, else 0.

With real weights, speculation is the engine's real drafter (acceptance is what the prompts give). A
random-weight profile accepts nothing, so it needs ``--controlled alpha=A,coverage=C``: every server runs
the controlled drafter at that acceptance (``engine serve --spec-controlled``, as ``profiler validate``
does) and the schedule is planned at the same acceptance. Servers run as validate's do: no prefix
caching, so every pass prefills its prompts. ``--repeats N`` measures every concurrency N times per server
(rounds over the concurrency list) and keeps the median; the table's "repeat spread" is the largest
(max - min) / median of throughput over the configs at that concurrency, and "sched / same k" compares the
schedule with the fixed-k server that runs its k there (one configuration on two servers).

    python benchmarks/schedule_serve_bench.py --profile runs/sched/smollm2.json --itl-ms 40 \
        [--method ngram] [--concurrency 1,2,4,8] [--isl 256] [--osl 64] [--waves 4] [--out result.json]
    python benchmarks/schedule_serve_bench.py --profile vicuna7b-h200.json --itl-ms 30 --method ngram \
        --controlled alpha=0.7,coverage=0.8 --fixed-k 2,4 --concurrency 1,4,16,64,128
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from schedule_bench import planned_schedule  # noqa: E402

from engine.spec.controlled import ControlledAcceptance  # noqa: E402
from planner.plan import Planner  # noqa: E402
from planner.profile import load_profile  # noqa: E402
from planner.schedule import KCurve, k_at  # noqa: E402
from profiler.validate import _free_port, longest_output, running_server, warm_then_measure  # noqa: E402


def serve_command(model: str, port: int, config: str, k: int, sched, max_seqs: int, max_len: int, meta, a):
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", meta.dtype, "--max-num-seqs", str(max_seqs),
           "--max-model-len", str(max_len), "--log-level", "warning", "--weights", meta.weights,
           "--no-enable-prefix-caching"]  # fmt: skip
    if config == "none":
        return cmd
    method = config.split()[0]
    cmd += ["--spec", method, "--k", str(k)]
    if method == "draft" and a.draft_model:
        cmd += ["--draft-model", a.draft_model]
    if a.controlled:
        cmd += ["--spec-controlled", a.controlled]
    if config.endswith("schedule"):
        cmd += ["--spec-schedule", json.dumps(sched, separators=(",", ":"))]
    return cmd


def measure(url: str, model: str, c: int, isl: int, osl: int, waves: int, k: int) -> dict:
    """Warm-up then measured closed-loop pass at concurrency ``c``: mean ITL and steady throughput. ``k``: the
    server's k (the controlled drafter's record pass must cover its longest draft)."""
    res = warm_then_measure(url, model, concurrency=c, requests=waves * c, isl=isl, osl=osl, k=k)
    tps = res.counters.tokens_per_step if res.counters else 1.0
    return {"itl_ms": statistics.mean(res.itl_ms()), "thr": res.throughput_per_gpu(1), "tokens_per_step": tps}


def median_of(reps: list[dict]) -> dict:
    """Median ITL, throughput and tokens per step of repeated measurements of one point, with the
    throughput's spread ((max - min) / median; 0 for one measurement) and the repeats themselves."""
    thr = [r["thr"] for r in reps]
    med = statistics.median(thr)
    return {
        "itl_ms": statistics.median(r["itl_ms"] for r in reps),
        "thr": med,
        "tokens_per_step": statistics.median(r["tokens_per_step"] for r in reps),
        "thr_spread": (max(thr) - min(thr)) / med if med else 0.0,
        "repeats": reps,
    }


def predicted_itl(ev, c: int) -> float | None:
    """The planner's predicted mean ITL (ms) of ``ev`` at concurrency ``c``, read as the schedule reads it
    (``KCurve.itl_at``); None outside the measured range or beyond what KV holds."""
    itl = KCurve(ev.c, ev.itl, ev.c_kv).itl_at(c)
    return itl if math.isfinite(itl) else None


def k_of(config: str, sched: list[list[int]], c: int) -> int:
    """The k a config runs at concurrency ``c``."""
    if config == "none":
        return 0
    return k_at(sched, c) if config.endswith("schedule") else int(config.split("=")[1])


def print_tables(rows: dict, configs: list[str], conc: list[int], sched, fixed: dict, method: str) -> None:
    """Goodput per config (with the schedule against the fixed config it runs at each concurrency: the same
    configuration measured twice, i.e. the run-to-run spread), then measured vs predicted mean ITL."""
    print()
    head = ["c", *configs, "sched k", "sched / best fixed", "sched / none", "sched / same k", "repeat spread"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for c in conc:
        g = {cfg: rows[cfg][c]["goodput"] for cfg in configs}
        sg = g[configs[-1]]
        best = max(g[cfg] for cfg in configs[:-1])
        k = k_at(sched, c)
        same = g.get("none" if k == 0 else f"{method} k={k}")
        cells = [str(c), *(f"{g[cfg]:.0f}" for cfg in configs), str(k)]
        cells += [f"{sg / best:.3f}" if best else "-", f"{sg / g['none']:.3f}" if g["none"] else "-"]
        cells.append(f"{sg / same:.3f}" if same else "-")
        spreads = [rows[cfg][c]["thr_spread"] for cfg in configs if len(rows[cfg][c].get("repeats", [])) > 1]
        cells.append(f"{max(spreads):.1%}" if spreads else "-")  # the largest over configs at this c
        print("| " + " | ".join(cells) + " |")
    print()
    print("measured mean ITL ms (error of the planner's prediction)")
    print("| c | " + " | ".join(configs) + " |")
    print("|" + "---|" * (len(configs) + 1))
    errors: dict[str, list[float]] = {cfg: [] for cfg in configs}
    for c in conc:
        cells = [str(c)]
        for cfg in configs:
            meas = rows[cfg][c]["itl_ms"]
            pred = predicted_itl(fixed[k_of(cfg, sched, c)], c)
            if pred is None:
                cells.append(f"{meas:.2f} (-)")
                continue
            errors[cfg].append(meas / pred - 1)
            cells.append(f"{meas:.2f} ({errors[cfg][-1]:+.1%})")
        print("| " + " | ".join(cells) + " |")
    summary = [f"{cfg} {statistics.median(abs(e) for e in errs):.1%}" for cfg, errs in errors.items() if errs]
    print("median |ITL error|: " + ", ".join(summary))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, help="a measured real-weights profile with none and --method")
    ap.add_argument("--model", default=None, help="engine serve --model (default: the profile's model)")
    ap.add_argument("--method", default="ngram", help="speculative method to schedule (default ngram)")
    ap.add_argument("--itl-ms", type=float, required=True, help="ITL SLA in ms")
    ap.add_argument("--concurrency", default=None, help="e.g. 1,2,4,8 (default: the profile's)")
    ap.add_argument("--isl", type=int, default=256, help="input length (default 256)")
    ap.add_argument("--osl", type=int, default=64, help="output tokens per request (default 64)")
    ap.add_argument(
        "--waves",
        type=int,
        default=4,
        help="closed-loop rounds per point (default 4: fewer leave the later waves without arrivals)",
    )
    ap.add_argument(
        "--controlled", default=None, help="alpha=A,coverage=C: the controlled drafter at that acceptance"
    )
    ap.add_argument("--fixed-k", default=None, help="fixed k to run besides the schedule (default: all)")
    ap.add_argument("--draft-model", default=None, help="drafter for --method draft")
    ap.add_argument(
        "--repeats", type=int, default=1, help="measure every concurrency this many times per server (median)"
    )
    ap.add_argument("--out", default=None, help="write the measurements as JSON here")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the configs --out holds at every concurrency; run the rest",
    )
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {a.repeats}")
    return a


def earlier_rows(a: argparse.Namespace, sched: list[list[int]]) -> dict[str, dict[int, dict]]:
    """With ``--resume``: the rows ``--out`` already holds, when measured for this schedule and SLA."""
    if not (a.resume and a.out and Path(a.out).exists()):
        return {}
    earlier = json.loads(Path(a.out).read_text())
    if earlier.get("schedule") != sched or earlier.get("sla_ms") != a.itl_ms:
        print(f"note: {a.out} holds another schedule or SLA: measuring every config again", flush=True)
        return {}
    return {cfg: {int(c): m for c, m in by_c.items()} for cfg, by_c in earlier["rows"].items()}


def serve_and_measure(config: str, k: int, sched, conc: list[int], model: str, meta, a) -> dict[int, dict]:
    """One `engine serve` for ``config`` (its largest k is ``k``), every concurrency ``a.repeats`` times:
    the row per concurrency (medians, goodput at the SLA, the k it ran)."""
    port = _free_port()
    max_len = a.isl + longest_output(a.osl) + 2 * k + 2
    cmd = serve_command(model, port, config, k, sched, max(conc), max_len, meta, a)
    reps: dict[int, list[dict]] = {c: [] for c in conc}
    with running_server(cmd, port, timeout_s=600) as url:
        for _ in range(a.repeats):  # rounds over the concurrencies: a slow drift shows as spread
            for c in conc:
                m = measure(url, model, c, a.isl, a.osl, a.waves, k)
                reps[c].append(m)
                print(f"  {config:>16} c={c:<3} ITL {m['itl_ms']:7.2f} ms  {m['thr']:8.1f} tok/s  "
                      f"{m['tokens_per_step']:.2f} tok/step", flush=True)  # fmt: skip
    rows = {}
    for c in conc:
        m = median_of(reps[c])
        m["k_run"] = k_of(config, sched, c)
        m["goodput"] = m["thr"] if m["itl_ms"] <= a.itl_ms else 0.0
        rows[c] = m
    return rows


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    path = Path(a.profile)
    profile = load_profile(path)
    meta = profile.metadata
    alpha = coverage = None
    if a.controlled:
        ctl = ControlledAcceptance.parse(a.controlled, 1)
        alpha, coverage = ctl.accepted_per_pos[0], ctl.coverage
    elif meta.weights != "real":
        print(f"error: {path.name} has {meta.weights} weights: their acceptance is not real; give "
              "--controlled alpha=A,coverage=C", file=sys.stderr)  # fmt: skip
        return 2
    pl = Planner(profile, path.stem)
    inp = pl.resolve_inputs(a.itl_ms, None, a.isl, a.osl, None, None, 1.0, None)
    planned = planned_schedule(pl, inp, a.method, 1, alpha, coverage)
    if planned is None:
        print(f"error: {path.name} needs tp=1 points for none and {a.method}", file=sys.stderr)
        return 2
    fixed, sched = planned
    conc = [int(x) for x in a.concurrency.split(",")] if a.concurrency else sorted(
        {int(p.concurrency) for p in profile.decode if p.tp == 1}
    )  # fmt: skip
    model = a.model or meta.model.name
    ks = sorted(k for k in fixed if k)
    if a.fixed_k:
        ks = [k for k in ks if k in {int(x) for x in a.fixed_k.split(",")}]
    configs = ["none", *(f"{a.method} k={k}" for k in ks), f"{a.method} schedule"]
    acc = f"controlled {a.controlled}" if a.controlled else "the drafter's own acceptance"
    print(f"{path.name}: {meta.model.name} on {meta.hardware.gpu_name}; SLA {a.itl_ms:g} ms; isl {a.isl} "
          f"osl {a.osl}; {acc}; schedule {sched}", flush=True)  # fmt: skip
    rows = earlier_rows(a, sched)
    for config in configs:
        if set(conc) <= set(rows.get(config, {})):
            print(f"  ({config}: kept from {a.out})", flush=True)
            continue
        t0 = time.monotonic()
        k = max(fixed) if config.endswith("schedule") else k_of(config, sched, 0)
        rows[config] = serve_and_measure(config, k, sched, conc, model, meta, a)
        print(f"  ({config}: {time.monotonic() - t0:.0f} s)", flush=True)
        if a.out:  # after every server, so a run cut short keeps what it measured
            out = {"schedule": sched, "sla_ms": a.itl_ms, "controlled": a.controlled, "rows": rows}
            Path(a.out).write_text(json.dumps(out, indent=1))

    print_tables(rows, configs, conc, sched, fixed, a.method)
    return 0


if __name__ == "__main__":
    sys.exit(main())
