"""kvbm scheduler-step benchmark: 256 running sequences, k = 4 lookahead, shared system prompts.

Replays the serving trace of :mod:`kvbm.trace` (closed loop: a departure is replaced by the next
arrival; each prompt is one of a few system prompts plus a user part; random draft coverage and
acceptance) and prints, as markdown:

* microseconds per scheduler step (all manager calls of a step plus the loop issuing them; random
  draws are made before the step's timer), over all steady-state steps and over the pure-decode ones;
* microseconds per manager operation (each phase of a step is timed as a whole: phase time / calls);
* blocks held with explicit lookahead release vs keeping rejected-draft blocks until the request
  ends (vLLM's behaviour), on the same trace, and what that does to a pool too small for the peak.

Usage: python benchmarks/kvbm_bench.py [--running 256 --k 4 --steps 600]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from dataclasses import replace

from kvbm.trace import TraceConfig, TraceResult, run_trace


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e3


def _step_row(name: str, values: list[int]) -> str:
    median, mean = statistics.median(values) / 1e3, statistics.fmean(values) / 1e3
    p90, p99 = _pct(values, 0.9), _pct(values, 0.99)
    return f"| {name} | {len(values)} | {median:.0f} | {mean:.0f} | {p90:.0f} | {p99:.0f} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--running", type=int, default=256, help="max running sequences")
    ap.add_argument("--k", type=int, default=4, help="lookahead (draft) tokens per step")
    ap.add_argument("--steps", type=int, default=600, help="scheduler steps to replay")
    ap.add_argument("--warmup", type=int, default=100, help="initial steps left out of the statistics")
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed replays; the one with the lowest median counts"
    )
    ap.add_argument("--coverage", type=float, default=0.8, help="probability a sequence drafts at a step")
    ap.add_argument("--acceptance", type=float, default=0.7, help="per-position draft acceptance")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=40_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.warmup >= args.steps:
        ap.error(f"--warmup ({args.warmup}) must be < --steps ({args.steps})")

    cfg = TraceConfig(
        num_requests=args.running * 40,
        max_running=args.running,
        k=args.k,
        draft_coverage=args.coverage,
        acceptance=args.acceptance,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        seed=args.seed,
    )
    w = args.warmup

    def timed_best(release: bool) -> TraceResult:
        runs = [run_trace(cfg, release_lookahead=release, max_steps=args.steps) for _ in range(args.repeats)]
        return min(runs, key=lambda r: statistics.median(r.step_ns[w:]))

    best = timed_best(True)
    keep = timed_best(False)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"## kvbm scheduler-step benchmark (`python {' '.join([sys.argv[0], *(argv or sys.argv[1:])])}`)")
    print()
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; load average at the end "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"Trace: up to {cfg.max_running} running, k = {cfg.k}, draft coverage {cfg.draft_coverage}, "
        f"acceptance {cfg.acceptance}/position, {cfg.num_system_prompts} system prompts of "
        f"{cfg.system_prompt_len} tokens + user {cfg.user_prompt_len[0]}-{cfg.user_prompt_len[1]}, "
        f"output {cfg.output_len[0]}-{cfg.output_len[1]} tokens, block size {cfg.block_size}, "
        f"{cfg.num_blocks} blocks; {args.steps} steps, first {w} left out, best of {args.repeats} replays."
    )
    print(
        f"Steady state: {best.mean_running:.1f} sequences in the decode batch on average, "
        f"{best.finished / best.steps:.2f} departures (and as many arrivals) per step, "
        f"prefix-cache hit rate {best.prefix_hit_rate:.1%} of prompt tokens."
    )
    print()
    print("Step times are CPU time of the scheduler thread; the wall-clock row also counts time the OS")
    print("gave to other jobs on this shared machine.")
    print()
    print("| scheduler step | steps | median µs | mean µs | p90 µs | p99 µs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(_step_row("steady-state steps, CPU (explicit release)", best.step_ns[w:]))
    if best.decode_step_ns:
        print(_step_row("pure decode steps, CPU (no arrival/departure)", best.decode_step_ns))
    print(_step_row("steady-state steps, CPU (keep until end)", keep.step_ns[w:]))
    print(_step_row("steady-state steps, wall clock (explicit release)", best.step_wall_ns[w:]))
    print()
    print("| operation | calls | µs per call | µs per step |")
    print("| --- | ---: | ---: | ---: |")
    for name, (count, total) in best.op_ns.items():
        print(f"| {name} | {count} | {total / max(count, 1) / 1e3:.2f} | {total / best.steps / 1e3:.1f} |")
    print()

    def mean_after(r: TraceResult, attr: str) -> float:
        return getattr(r, attr) / r.steps

    print("| lookahead policy | mean blocks held at step peak | max at peak | mean held between steps |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in (("explicit release (kvbm)", best), ("keep until request ends", keep)):
        print(
            f"| {name} | {mean_after(r, 'held_peak_sum'):.0f} | {r.held_peak_max} "
            f"| {mean_after(r, 'held_after_sum'):.0f} |"
        )
    saved_peak = keep.mean_held_peak - best.mean_held_peak
    saved_after = keep.mean_held_after - best.mean_held_after
    print(
        f"| **saved by explicit release** | **{saved_peak:.0f} ({saved_peak / keep.mean_held_peak:.1%})** "
        f"| **{keep.held_peak_max - best.held_peak_max}** "
        f"| **{saved_after:.0f} ({saved_after / keep.mean_held_after:.1%})** |"
    )
    print()

    # The same trace in a pool that cannot hold the peak: fewer blocks held means fewer preemptions.
    tight = replace(cfg, num_blocks=int(best.held_peak_max * 0.9))
    print(f"Pool of {tight.num_blocks} blocks (90% of the explicit-release peak), {args.steps} steps:")
    print()
    print("| lookahead policy | preemptions | mean decode batch | tokens generated |")
    print("| --- | ---: | ---: | ---: |")
    for name, release in (("explicit release (kvbm)", True), ("keep until request ends", False)):
        r = run_trace(tight, release_lookahead=release, max_steps=args.steps)
        print(f"| {name} | {r.preemptions} | {r.mean_running:.1f} | {r.tokens_generated} |")
    print()

    # Savings grow with the lookahead (k relative to block_size) and with how often a step drafts
    # fewer tokens than an earlier step reserved.
    print(
        f"Blocks saved by explicit release vs keep-until-end, by k and draft coverage ({args.steps} steps):"
    )
    print()
    print("| k | draft coverage | mean held at step peak (keep) | saved at step peak | saved between steps |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for k, coverage in ((4, 1.0), (4, 0.8), (4, 0.5), (16, 0.8), (64, 0.8)):
        c = replace(cfg, k=k, draft_coverage=coverage)
        a = run_trace(c, max_steps=args.steps)
        b = run_trace(c, release_lookahead=False, max_steps=args.steps)
        peak, between = b.mean_held_peak - a.mean_held_peak, b.mean_held_after - a.mean_held_after
        print(
            f"| {k} | {coverage} | {b.mean_held_peak:.0f} | {peak:.0f} ({peak / b.mean_held_peak:.1%}) "
            f"| {between:.0f} ({between / b.mean_held_after:.1%}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
