"""Where a decode step's GPU time goes, per kernel family, at each tp (rank 0's GPU).

For each tp it builds the StepProfiler (random weights at the preset's shape), warms up decode steps at
one (batch, context), then records ``--steps`` steps with torch.profiler (CUDA activity; kernels replayed
from CUDA graphs are traced one by one) and prints, per kernel family, the GPU time per step and the
launches per step, plus the step's wall time between CUDA events. Kernel time below the step time is
GPU idle time (waiting on the host or on a peer rank).

    python benchmarks/tp_kernel_profile.py --model vicuna-7b --tp 1,2 --batch 1 --context 1024
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.engine_config import EngineConfig  # noqa: E402
from engine.step_profiler import StepProfiler  # noqa: E402
from engine.tp.env import apply_safe_env  # noqa: E402

FAMILIES = [  # first match wins; the rest is "other"
    ("all-reduce (one-shot)", r"one_shot"),
    ("NCCL", r"nccl|ncclDevKernel"),
    ("GEMM", r"gemm|gemv|cutlass|sm90_|sm80_|nvjet|splitKreduce|xmma"),
    ("attention (Triton)", r"_paged|attn|attention"),
    ("add+RMSNorm (Triton)", r"rmsnorm"),
    ("RoPE+KV store (Triton)", r"rope"),
    ("SiLU*mul (Triton)", r"silu"),
    ("copies", r"copy|Memcpy|Memset|fill"),
    ("index/cat/elementwise", r"index|cat|elementwise|vectorized|reduce"),
]


def family(name: str) -> str:
    low = name.lower()
    for label, pattern in FAMILIES:
        if re.search(pattern, low):
            return label
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vicuna-7b")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=6, help="also list this many single kernels by time")
    args = ap.parse_args()
    apply_safe_env()
    for tp in [int(t) for t in args.tp.split(",") if t]:
        bs = 16
        blocks = args.batch * (-(-(args.context + 1) // bs) + 1) + 8
        sp = StepProfiler(
            EngineConfig(
                args.model,
                dtype=args.dtype,
                tp=tp,
                num_gpu_blocks=blocks,
                block_size=bs,
                max_model_len=args.context + 16,
                max_num_seqs=args.batch,
                weights="random",
            )
        )
        try:
            timing = sp.measure_decode(args.batch, args.context, steps=args.steps, warmup=5)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                sp.measure_decode(args.batch, args.context, steps=args.steps, warmup=0)
                torch.cuda.synchronize()
        finally:
            sp.close()
        per_family: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        singles: dict[str, float] = defaultdict(float)
        for evt in prof.events():
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.device_time
            fam = per_family[family(evt.name)]
            fam[0] += us
            fam[1] += 1
            singles[evt.name] += us
        step_ms = sorted(timing.step_ms)[len(timing.step_ms) // 2]
        total = sum(v[0] for v in per_family.values()) / args.steps / 1e3
        print(
            f"\ntp={tp} batch={args.batch} context={args.context}: step {step_ms:.3f} ms (median, events), "
            f"GPU kernel time {total:.3f} ms/step ({100 * total / step_ms:.0f}% busy)"
        )
        print("| kernel family | ms/step | launches/step |")
        print("|---|---:|---:|")
        for label, (us, n) in sorted(per_family.items(), key=lambda kv: -kv[1][0]):
            print(f"| {label} | {us / args.steps / 1e3:.3f} | {n / args.steps:.0f} |")
        print(f"top {args.top} kernels (ms/step):")
        for name, us in sorted(singles.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {us / args.steps / 1e3:.3f}  {name[:110]}")


if __name__ == "__main__":
    main()
