"""All-reduce latency at decode-step sizes: NCCL vs the Triton one-shot kernel over symmetric memory.

Each of ``--world`` spawned ranks all-reduces [tokens, hidden] float16 tensors (the row-parallel
outputs of one decode step), first checking the one-shot result against NCCL's, then timing
``--calls`` all-reduces captured in one CUDA graph (as in a decode step), replayed ``--reps`` times.
Prints microseconds per all-reduce, median over replays, as seen by rank 0.

    python benchmarks/allreduce_bench.py --world 2 --tokens 1,8,64 --hidden 4096
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.model import allreduce  # noqa: E402
from engine.tp.env import apply_safe_env  # noqa: E402


def _time_graph(fn, calls: int, reps: int) -> float:
    """Median microseconds per call of ``calls`` calls of ``fn`` captured in one graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    apply_safe_env()
    os.environ["SPECPLAN_TP_ALLREDUCE"] = "oneshot"
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group(
        "nccl", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60), device_id=dev
    )
    group = dist.group.WORLD
    symm = allreduce.enable_symm_mem(group, dev)
    if rank == 0:
        print(f"world {world}, symmetric memory one-shot available: {symm}", flush=True)
        print("| tokens | bytes | NCCL us/all-reduce | one-shot us/all-reduce | max abs diff |")
        print("|---:|---:|---:|---:|---:|")
    gen = torch.Generator(device=dev).manual_seed(1234 + rank)
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden, device=dev, dtype=torch.float16, generator=gen)
        ref = x.clone()
        dist.all_reduce(ref, group=group)
        diff = float("nan")
        if symm:
            got = allreduce.all_reduce(x.clone(), group)
            diff = (got.float() - ref.float()).abs().max().item()
            if diff > 1e-2:
                raise AssertionError(f"rank {rank}: one-shot differs from NCCL by {diff} at {tokens} tokens")
        y = x.clone()
        nccl_us = _time_graph(lambda y=y: dist.all_reduce(y, group=group), args.calls, args.reps)
        one_us = float("nan")
        if symm:
            one_us = _time_graph(lambda x=x: allreduce.all_reduce(x, group), args.calls, args.reps)
        if rank == 0:
            print(f"| {tokens} | {x.numel() * 2} | {nccl_us:.1f} | {one_us:.1f} | {diff:.2e} |", flush=True)
    dist.barrier()
    allreduce.release_symm_mem()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=65, help="all-reduces per graph (2/layer + 1)")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",") if t]
    if torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs {args.world} GPUs; {torch.cuda.device_count()} visible")
    apply_safe_env()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.world, port, args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
