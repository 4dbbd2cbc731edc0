"""``python -m kvbm.demo``: a simulated serving trace on the KV block manager, in a few seconds.

Prints the pool's capacity (kvbm.capacity, the planner's formula), then replays a speculative-decoding
trace (see kvbm/trace.py) twice on the same pool: once releasing unused lookahead blocks at every
commit (kvbm's rule) and once keeping rejected-draft blocks until the request ends (vLLM's
behaviour). It reports usage over time, the prefix-cache hit rate and the blocks explicit release saves.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from kvbm import capacity
from kvbm.trace import TraceConfig, TraceResult, run_trace

_BARS = " ▁▂▃▄▅▆▇█"


def _sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    step = max(1, len(values) // width)
    samples = [max(values[i : i + step]) for i in range(0, len(values), step)]
    return "".join(_BARS[min(len(_BARS) - 1, int(v * (len(_BARS) - 1) + 0.5))] for v in samples)


def _summary(name: str, r: TraceResult, num_blocks: int) -> list[str]:
    return [
        f"  {name}",
        f"    steps {r.steps}, requests finished {r.finished}, tokens generated {r.tokens_generated} "
        f"({r.tokens_generated / max(r.steps, 1):.1f} per step), preemptions {r.preemptions}",
        f"    usage: mean {r.held_peak_sum / max(r.steps, 1) / num_blocks:.1%} at step peak, "
        f"max {r.held_peak_max / num_blocks:.1%}; "
        f"prefix-cache hit rate {r.prefix_hit_rate:.1%} of prompt tokens",
        f"    usage over time |{_sparkline(r.usage_trace)}|",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="requests in the trace")
    ap.add_argument("--running", type=int, default=64, help="max running sequences")
    ap.add_argument("--k", type=int, default=4, help="lookahead (draft) tokens per step")
    ap.add_argument("--blocks", type=int, default=1200, help="KV blocks in the pool")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("requests", "running", "blocks", "block_size"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.k < 0:
        ap.error(f"--k must be >= 0, got {args.k}")

    started = time.perf_counter()
    cfg = TraceConfig(
        num_requests=args.requests,
        max_running=args.running,
        k=args.k,
        output_len=(32, 256),
        block_size=args.block_size,
        num_blocks=args.blocks,
        seed=args.seed,
    )
    bs = cfg.block_size
    print(f"kvbm demo: {cfg.num_blocks} blocks x {bs} tokens = {cfg.num_blocks * bs} KV slots")
    ks = sorted({0, 4, 16, 64, cfg.k})
    print("capacity: sequences the pool holds during a decode step with k lookahead (no prefix sharing)")
    print("  context " + "".join(f"{'k=' + str(k):>8s}" for k in ks))
    for ctx in (500, 1000, 2000):
        cells = "".join(f"{capacity.max_concurrency(cfg.num_blocks, ctx, k, bs):8d}" for k in ks)
        print(f"  {ctx:7d} {cells}")
    print(
        f"trace: {cfg.num_requests} requests, up to {cfg.max_running} running, k={cfg.k}, "
        f"{cfg.num_system_prompts} shared system prompts of {cfg.system_prompt_len} tokens, "
        f"draft coverage {cfg.draft_coverage}, acceptance {cfg.acceptance} per position"
    )
    release = run_trace(cfg, release_lookahead=True)
    keep = run_trace(cfg, release_lookahead=False)
    for line in _summary("explicit lookahead release (kvbm):", release, cfg.num_blocks):
        print(line)
    for line in _summary("keep rejected-draft blocks until the request ends:", keep, cfg.num_blocks):
        print(line)
    print(
        f"explicit release returned {release.lookahead_blocks_released} lookahead blocks at commit; "
        f"it holds {keep.mean_held_after - release.mean_held_after:.1f} fewer blocks between steps and "
        f"{keep.mean_held_peak - release.mean_held_peak:.1f} fewer at the step peak on average"
    )
    print("blocks saved by explicit release, by lookahead k (same trace and pool):")
    print("      k  saved at step peak  saved between steps  preemptions release / keep")
    for k in sorted({4, 16, 64, cfg.k}):
        kc = replace(cfg, k=k)
        a, b = run_trace(kc, release_lookahead=True), run_trace(kc, release_lookahead=False)
        peak, between = b.mean_held_peak - a.mean_held_peak, b.mean_held_after - a.mean_held_after
        print(f"  {k:5d}  {peak:18.1f}  {between:19.1f}  {a.preemptions:11d} / {b.preemptions}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
