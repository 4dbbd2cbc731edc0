"""Tensor-parallel decode step time, and what its collectives cost.

Each variant builds the model (random weights at the preset's shape: timing depends on shapes only),
fills the KV cache and times decode steps at every batch size with a constant context (CUDA events on
rank 0: the step's message to the workers + the graph-captured forward + logits; StepProfiler).
A variant is ``TP[/ALLREDUCE][/unfused]``:

- ALLREDUCE: ``nccl`` (default), ``oneshot`` (engine.model.allreduce's symmetric-memory kernel, fused
  with the residual add and RMSNorm, for small messages; NCCL above) or ``none`` (no communication:
  wrong outputs, right shapes). ``none`` exists to time the step without its collectives;
  "collectives ms/step" is a variant's median minus the ``none`` median at that tp, batch and
  kernels, measured in the same run.
- ``unfused``: the eager elementwise ops instead of engine.kernels' Triton kernels (SPECPLAN_FUSED_KERNELS=0).

    python benchmarks/tp_bench.py --model vicuna-7b --dtype float16 --variants 1/unfused,1,2,2/oneshot,2/none
    python benchmarks/tp_bench.py --model tiny --device cpu --variants 1,2,2/none --batch 1,8   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.engine_config import EngineConfig  # noqa: E402
from engine.kernels import fused_enabled  # noqa: E402
from engine.step_profiler import StepProfiler  # noqa: E402
from engine.tp.env import apply_safe_env  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


@dataclass(frozen=True)
class Variant:
    tp: int
    allreduce: str = "nccl"
    fused: bool = True

    @classmethod
    def parse(cls, text: str) -> Variant:
        parts = text.split("/")
        try:
            tp = int(parts[0])
        except ValueError:
            raise SystemExit(f"--variants: {text!r} must start with the tp size, e.g. 2/nccl") from None
        allreduce = next((p for p in parts[1:] if p in ("nccl", "oneshot", "none")), "nccl")
        unknown = [p for p in parts[1:] if p not in ("nccl", "oneshot", "none", "unfused")]
        if unknown or tp < 1:
            raise SystemExit(f"--variants: cannot read {text!r} (TP[/nccl|oneshot|none][/unfused])")
        return cls(tp, allreduce if tp > 1 else "-", "unfused" not in parts[1:])

    def __str__(self) -> str:
        ar = f" all-reduce={self.allreduce}" if self.tp > 1 else ""
        return f"tp={self.tp}{ar} {self.kernels}"

    @property
    def kernels(self) -> str:
        return "fused" if self.fused else "unfused"


def _measure(args, device: str, v: Variant, blocks: int, bs: int, rows: list, info: dict) -> None:
    """Time every batch size of one variant (graphs; eager only as a labelled fallback)."""
    os.environ["SPECPLAN_TP_ALLREDUCE"] = v.allreduce if v.tp > 1 else "nccl"  # workers inherit it
    os.environ["SPECPLAN_FUSED_KERNELS"] = "1" if v.fused else "0"
    fused_enabled.cache_clear()
    for graphs in (True, False):
        t0 = time.perf_counter()
        try:
            sp = StepProfiler(
                EngineConfig(
                    args.model,
                    dtype=args.dtype,
                    device=device,
                    tp=v.tp,
                    num_gpu_blocks=blocks,
                    block_size=bs,
                    max_model_len=args.context + 16,
                    max_num_seqs=max(args.batch),
                    weights="random",
                    cuda_graphs=graphs,
                )
            )
        except Exception:  # noqa: BLE001 - report and go on with the other variants
            print(f"{v}: could not start:\n{traceback.format_exc()}", flush=True)
            if device != "cuda":
                return
            continue
        info.update({"device": sp.device_name, **sp.model_info})
        symm = bool(getattr(sp.runner, "symm_mem", False))
        print(f"{v}: ready in {time.perf_counter() - t0:.1f} s (symmetric memory: {symm})", flush=True)
        mode = "graphs" if graphs and device == "cuda" else "eager"
        try:
            for b in args.batch:
                t = sp.measure_decode(b, args.context, steps=args.steps, warmup=args.warmup)
                ms = sorted(t.step_ms)
                rows.append(
                    dict(
                        tp=v.tp,
                        allreduce=v.allreduce if v.tp > 1 else "-",
                        symm_mem=symm,
                        kernels=v.kernels,
                        batch=b,
                        mode=mode,
                        median=statistics.median(ms),
                        p10=ms[len(ms) // 10],
                        p90=ms[(len(ms) * 9) // 10],
                    )
                )
                print(f"  {v} batch={b} {mode}: {rows[-1]['median']:.3f} ms", flush=True)
            return
        except Exception:  # noqa: BLE001
            print(f"{v} {mode}: measurement failed:\n{traceback.format_exc()}", flush=True)
            return
        finally:
            t1 = time.perf_counter()
            sp.close()
            print(f"{v}: closed in {time.perf_counter() - t1:.1f} s", flush=True)
            del sp
            if device == "cuda":
                torch.cuda.empty_cache()


def _table(rows: list[dict]) -> list[str]:
    base = {(r["batch"], r["kernels"]): r["median"] for r in rows if r["tp"] == 1}
    bare = {(r["tp"], r["batch"], r["kernels"]): r["median"] for r in rows if r["allreduce"] == "none"}
    lines = [
        "| tp | kernels | all-reduce | batch | step ms (median) | p10 | p90 | vs tp 1 "
        "| collectives ms/step |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = base.get((r["batch"], r["kernels"]))
        ratio = f"{r['median'] / ref:.2f}x" if ref and r["allreduce"] != "none" else "-"
        none = bare.get((r["tp"], r["batch"], r["kernels"]))
        timed = none is not None and r["allreduce"] not in ("none", "-")
        coll = f"{r['median'] - none:.3f}" if timed else "-"
        fell_back = r["allreduce"] == "oneshot" and not r["symm_mem"]
        ar = r["allreduce"] + (" (fell back to NCCL)" if fell_back else "")
        lines.append(
            f"| {r['tp']} | {r['kernels']} | {ar} | {r['batch']} | {r['median']:.3f} | {r['p10']:.3f} "
            f"| {r['p90']:.3f} | {ratio} | {coll} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vicuna-7b")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument(
        "--variants",
        default="1/unfused,1,2,2/oneshot,2/none,4,4/oneshot,4/none",
        help="comma-separated TP[/nccl|oneshot|none][/unfused]; tp sizes above the visible GPUs are skipped",
    )
    ap.add_argument("--batch", type=_ints, default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    apply_safe_env()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    variants = [Variant.parse(t) for t in args.variants.split(",") if t]
    if device == "cuda":
        gpus = torch.cuda.device_count()
        skipped = [v for v in variants if v.tp > gpus]
        variants = [v for v in variants if v.tp <= gpus]
        if skipped:
            print(f"skipped (only {gpus} GPUs): {', '.join(map(str, skipped))}", flush=True)
    bs = 16
    blocks = max(args.batch) * (-(-(args.context + 1) // bs) + 1) + 8
    rows: list[dict] = []
    info: dict = {}
    for v in variants:
        _measure(args, device, v, blocks, bs, rows, info)
    print()
    print(
        f"model {args.model} ({info.get('weights', 'random')} weights), dtype {args.dtype}, "
        f"context {args.context}, {args.steps} timed steps after {args.warmup} warm-up, "
        f"device {info.get('device')}"
    )
    print(
        f"torch {torch.__version__}, cuda {torch.version.cuda}, "
        f"nccl {'.'.join(map(str, torch.cuda.nccl.version())) if device == 'cuda' else '-'}"
    )
    print()
    print("\n".join(_table(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "info": info}, indent=1))


if __name__ == "__main__":
    main()
