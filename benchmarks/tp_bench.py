"""Tensor-parallel decode step time: the engine's StepProfiler at tp 1, 2, ... and the collective cost.

For each tp it builds the model (random weights at the preset's shape; timing depends on shapes only),
fills the KV cache, and times decode steps at each batch size with a constant context (CUDA events on
GPU, rank 0's view of the step: broadcast of the batch + forward + logits). Then, separately, it times
what the tensor-parallel layers communicate per step: 2 all-reduces per layer of [batch, hidden] in the
model dtype, one for the vocabulary-parallel embedding, and one all-gather of the float32 logit shard,
captured in a CUDA graph as the decode graphs do. (On 2x H200 this collective phase hung in its
first run, before any per-phase print existed; it now prints each phase so a run shows where.)

    python benchmarks/tp_bench.py --model vicuna-7b --dtype float16 --tp 1,2 --batch 1,8,64
    python benchmarks/tp_bench.py --model tiny --device cpu --tp 1,2 --batch 1,8   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.step_profiler import StepProfiler  # noqa: E402
from engine.tp.env import apply_safe_env  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _collective_worker(rank: int, tp: int, port: int, cfg: dict, out_path: str) -> None:
    """One rank of the collective micro-benchmark (spawned)."""
    import torch.distributed as dist

    apply_safe_env()
    cuda = cfg["device"] == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", port, tp, is_master=rank == 0, wait_for_workers=False)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=store,
        rank=rank,
        world_size=tp,
        timeout=timedelta(seconds=300),
        device_id=dev if cuda else None,
    )
    dtype = getattr(torch, cfg["dtype"])
    n_ar = 2 * cfg["layers"] + 1
    shard = -(-cfg["vocab"] // tp)
    results = {}
    for b in cfg["batches"]:
        xs = [torch.randn(b, cfg["hidden"], dtype=dtype, device=dev) for _ in range(n_ar)]
        local = torch.randn(b, shard, dtype=torch.float32, device=dev)
        gathered = torch.empty(tp * b, shard, dtype=torch.float32, device=dev)

        def step(xs=xs, local=local, gathered=gathered) -> None:
            for x in xs:
                dist.all_reduce(x)
            dist.all_gather_into_tensor(gathered, local)

        for _ in range(3):
            step()
        if rank == 0:
            print(f"  collectives: batch {b} eager warm-up done", flush=True)
        if cuda:
            torch.cuda.synchronize()
            side = torch.cuda.Stream()  # warm up on a side stream before capture, as torch requires
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            if rank == 0:
                print(f"  collectives: batch {b} captured", flush=True)
            run = graph.replay
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            times = []
            for _ in range(cfg["reps"]):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            times = []
            for _ in range(cfg["reps"]):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        results[b] = statistics.median(times)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"n_allreduce": n_ar, "ms": results}))
    dist.barrier()
    dist.destroy_process_group()


def collective_ms(tp: int, cfg: dict) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "coll.json")
        mp.spawn(_collective_worker, args=(tp, port, cfg, out), nprocs=tp, join=True)
        data = json.loads(Path(out).read_text())
    return {"n_allreduce": data["n_allreduce"], "ms": {int(k): v for k, v in data["ms"].items()}}


def _measure(args, device: str, tp: int, graphs: bool, blocks: int, bs: int, rows: list, info: dict) -> bool:
    """Time every batch size at one tp; False when the run failed (printed)."""
    t0 = time.perf_counter()
    try:
        sp = StepProfiler(
            args.model,
            dtype=args.dtype,
            device=device,
            tp=tp,
            num_blocks=blocks,
            block_size=bs,
            max_context=args.context + 16,
            max_num_seqs=max(args.batch),
            weights="random",
            cuda_graphs=graphs,
        )
    except Exception:  # noqa: BLE001 - report and go on with the other tp sizes
        print(f"tp={tp} graphs={graphs}: could not start:\n{traceback.format_exc()}", flush=True)
        return False
    info.update({"device": sp.device_name, **sp.model_info})
    print(f"tp={tp}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
    mode = "graphs" if graphs and device == "cuda" else "eager"
    try:
        for b in args.batch:
            t = sp.measure_decode(b, args.context, steps=args.steps, warmup=args.warmup)
            ms = sorted(t.step_ms)
            rows.append(
                dict(
                    tp=tp,
                    batch=b,
                    mode=mode,
                    median=statistics.median(ms),
                    p10=ms[len(ms) // 10],
                    p90=ms[(len(ms) * 9) // 10],
                )
            )
            print(f"  tp={tp} batch={b} {mode}: {rows[-1]['median']:.3f} ms", flush=True)
        return True
    except Exception:  # noqa: BLE001
        print(f"tp={tp} {mode}: measurement failed:\n{traceback.format_exc()}", flush=True)
        return False
    finally:
        t1 = time.perf_counter()
        sp.close()
        print(f"tp={tp}: closed in {time.perf_counter() - t1:.1f} s", flush=True)
        del sp
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vicuna-7b")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tp", type=_ints, default=[1, 2])
    ap.add_argument("--batch", type=_ints, default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    apply_safe_env()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bs = 16
    blocks = max(args.batch) * (-(-(args.context + 1) // bs) + 1) + 8
    rows, collectives, info = [], {}, {}
    for tp in args.tp:
        for graphs in (True, False):  # eager only as a labelled fallback when graph capture fails
            ok = _measure(args, device, tp, graphs, blocks, bs, rows, info)
            if ok or device != "cuda":
                break
        if tp > 1:
            sp_cfg = dict(
                device=device,
                dtype=args.dtype if device == "cuda" else "float32",
                layers=info["shape"]["layers"],
                hidden=info["shape"]["hidden"],
                vocab=info["shape"]["vocab"],
                batches=args.batch,
                reps=50,
            )
            print(f"tp={tp}: timing the collectives alone", flush=True)
            try:
                collectives[tp] = collective_ms(tp, sp_cfg)
            except Exception:  # noqa: BLE001
                print(f"tp={tp}: collective benchmark failed:\n{traceback.format_exc()}", flush=True)

    base = {r["batch"]: r["median"] for r in rows if r["tp"] == 1}
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
    print(
        "| tp | batch | mode | step ms (median) | p10 | p90 | vs tp 1 "
        "| collectives ms/step | collectives share |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['median'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-"
        coll = collectives.get(r["tp"])
        cms = coll["ms"].get(r["batch"]) if coll else None
        cms_s = f"{cms:.3f} ({coll['n_allreduce']} AR + 1 AG)" if cms is not None else "-"
        share = f"{100 * cms / r['median']:.0f}%" if cms is not None else "-"
        print(
            f"| {r['tp']} | {r['batch']} | {r['mode']} | {r['median']:.3f} | {r['p10']:.3f} "
            f"| {r['p90']:.3f} | {ratio} "
            f"| {cms_s} | {share} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "collectives": collectives, "info": info}, indent=1)
        )


if __name__ == "__main__":
    main()
