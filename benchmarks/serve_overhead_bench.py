"""What the server adds to a request's ITL: `engine serve` with the engine on a thread of the HTTP process
against the engine in a core process of its own (``--[no-]engine-process``), under the same load.

For each mode it starts one `engine serve` (the command ``profiler validate`` uses: KV pool and batch
sized for the points, no prefix caching, the controlled drafter for a speculative method on random
weights) and drives every ``--concurrency`` with the profiler's closed-loop HTTP load generator (the
validate passes: prompts of exactly ``--isl`` tokens, output lengths spread around ``--osl``). Pair it with
``itl_gap_bench.py`` at the same points for the engine without any server.

    PYTHONPATH=. python3 benchmarks/serve_overhead_bench.py --model vicuna-7b --weights random \\
        --method ngram --k 4 --concurrency 2,8,32 --isl 736 --osl 64 --waves 4 [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import metrics as md
from profiler.validate import _free_port, longest_output, running_server, warm_then_measure

MODES = {"thread": "--no-engine-process", "process": "--engine-process"}


def serve_command(a: argparse.Namespace, port: int, mode: str, conc: list[int]) -> list[str]:
    longest = a.isl + longest_output(a.osl) + 2 * a.k + 2 * 16
    cmd = [
        sys.executable, "-m", "engine.cli", "serve", "--model", a.model, "--weights", a.weights,
        "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max(conc)),
        "--max-model-len", str(longest), "--num-gpu-blocks", str(-(-longest // 16) * max(conc) + 16),
        "--no-enable-prefix-caching", "--log-level", "warning", MODES[mode],
    ]  # fmt: skip
    if a.method != "none":
        cmd += ["--spec", a.method, "--k", str(a.k)]
        if a.method == "draft":
            cmd += ["--draft-model", a.draft_model]
        if a.controlled:
            cmd += ["--spec-controlled", a.controlled]
    return cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vicuna-7b")
    ap.add_argument("--weights", default="random", choices=("real", "random", "auto"))
    ap.add_argument("--method", default="none", choices=("none", "ngram", "draft"))
    ap.add_argument("--k", type=int, default=0)
    ap.add_argument("--draft-model", default="llama-68m")
    ap.add_argument("--controlled", default="alpha=0.7,coverage=0.8", help="'' for the real drafter")
    ap.add_argument("--concurrency", default="2,8,32")
    ap.add_argument("--isl", type=int, default=736)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--waves", type=int, default=4, help="closed-loop rounds per measured pass")
    ap.add_argument("--repeats", type=int, default=1, help="measured passes per point (median reported)")
    ap.add_argument("--modes", default="thread,process")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    if a.method == "none":
        a.k = 0
    conc = [int(x) for x in a.concurrency.split(",")]
    rows: list[dict] = []
    for mode in a.modes.split(","):
        port = _free_port()
        t0 = time.monotonic()
        with running_server(serve_command(a, port, mode, conc), port, timeout_s=900) as url:
            print(f"{mode}: server up in {time.monotonic() - t0:.0f} s", flush=True)
            for c in conc:
                passes = []
                for _ in range(a.repeats):
                    res = warm_then_measure(
                        url, a.model, concurrency=c, requests=a.waves * c, isl=a.isl, osl=a.osl, k=a.k
                    )
                    s = md.summarize(res.itl_ms())
                    w = res.steady
                    passes.append((s.mean, s.p90, res.throughput_per_gpu(1), w.mean_in_flight if w else 0.0))
                row = {
                    "mode": mode,
                    "c": c,
                    "itl_ms": statistics.median(p[0] for p in passes),
                    "p90_ms": statistics.median(p[1] for p in passes),
                    "tok_s": statistics.median(p[2] for p in passes),
                    "in_flight": statistics.median(p[3] for p in passes),
                    "itl_passes": [round(p[0], 3) for p in passes],
                }
                rows.append(row)
                print(
                    f"  {mode:>7} c={c:<3} ITL {row['itl_ms']:7.3f} ms  p90 {row['p90_ms']:7.3f}  "
                    f"{row['tok_s']:8.1f} tok/s  in flight {row['in_flight']:.2f}  {row['itl_passes']}",
                    flush=True,
                )
    print(
        f"\n{a.model} ({a.weights}) {a.method} k={a.k} isl {a.isl} osl {a.osl}, {a.waves} waves x {a.repeats}"
    )
    print("| c | ITL thread ms | ITL process ms | process / thread | tok/s thread | tok/s process |")
    print("|---:|---:|---:|---:|---:|---:|")
    by = {(r["mode"], r["c"]): r for r in rows}
    for c in conc:
        t, p = by.get(("thread", c)), by.get(("process", c))
        if t and p:
            print(
                f"| {c} | {t['itl_ms']:.3f} | {p['itl_ms']:.3f} | {p['itl_ms'] / t['itl_ms']:.3f} | "
                f"{t['tok_s']:.0f} | {p['tok_s']:.0f} |"
            )
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
