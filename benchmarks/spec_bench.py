"""Cost of a speculative verify step on one GPU, as a ratio to a plain decode step (issue 5).

vicuna-7b shape (or --model), fp16, random weights, context --ctx tokens per sequence. A verify step
with k drafts is one forward over 1 + k query tokens per sequence (causal within the chunk) plus
float32 logits for every query row; the Medusa tree is the engine's default tree shape
(engine.spec.medusa.default_tree) with --tree-nodes nodes + the root, verified with its tree_mask and
depth positions. Every shape, k = 0 included, runs from a CUDA graph captured for it
(engine.cuda_graphs.DecodeGraphs with queries_per_seq = 1 + k or tree=True), so the ratios compare
like with like. Step time = device-event median over --iters replays.

Usage (on the GPU machine): PYTHONPATH=. python3 benchmarks/spec_bench.py
"""

from __future__ import annotations

import argparse
import statistics

import torch

from engine.attention.metadata import AttentionMetadata
from engine.cuda_graphs import DecodeGraphs

KS = (0, 1, 2, 4, 8)
BATCHES = (1, 8, 32, 64)


def step_inputs(
    runner, batch: int, ctx: int, q: int, tree_mask: torch.Tensor | None, depth: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """`batch` sequences with `ctx` cached tokens, each verifying `q` query tokens."""
    per = -(-(ctx + q) // runner.block_size)
    seqs = [(list(range(b * per, (b + 1) * per)), ctx, q) for b in range(batch)]
    meta = runner.build_metadata(seqs)
    ids = torch.randint(3, runner.config.vocab_size, (batch * q,), device=runner.device)
    base = torch.arange(q, device=runner.device) if depth is None else depth
    positions = (ctx + base).repeat(batch)
    if tree_mask is not None:
        meta.tree_mask = tree_mask.unsqueeze(0).expand(batch, q, q).contiguous()
    return ids, positions, meta


def time_shape(runner, batch: int, ctx: int, q: int, tree, iters: int) -> float:
    mask = depth = None
    if tree is not None:
        mask = tree.mask.to(runner.device)
        depth = torch.tensor(tree.depth, device=runner.device)
    ids, positions, meta = step_inputs(runner, batch, ctx, q, mask, depth)
    graphs = DecodeGraphs(runner, max_batch=batch, queries_per_seq=q, tree=tree is not None)

    def step() -> None:
        hidden = graphs.run(ids, positions, meta)
        assert hidden is not None, "shape did not fit its graph"
        runner.model.compute_logits(hidden)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vicuna-7b")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--tree-nodes", type=int, default=64)
    ap.add_argument("--medusa-heads", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    import triton

    from engine.runner import ModelRunner
    from engine.spec.medusa import MedusaTree, default_tree

    tree = MedusaTree.build(default_tree(args.medusa_heads, num_nodes=args.tree_nodes))
    runner = ModelRunner(
        args.model,
        dtype="float16",
        device="cuda",
        weights="random",
        max_num_seqs=max(BATCHES),
        cuda_graphs=False,
        num_blocks=max(BATCHES) * (-(-(args.ctx + tree.num_nodes) // 16)) + 16,
    )
    for k, v in runner.kv_caches:
        k.normal_()
        v.normal_()
    print(
        f"# device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
        f"model {args.model} fp16 random; context {args.ctx}; tree {tree.num_nodes} queries "
        f"(default_tree({args.medusa_heads} heads, {args.tree_nodes} nodes) + root)"
    )
    shapes = [(f"k={k}", 1 + k, None) for k in KS] + [(f"tree {tree.num_nodes}", tree.num_nodes, tree)]
    print("\n## Verify step time (ms) and ratio to the k=0 step of the same batch")
    print("| batch | " + " | ".join(name for name, _, _ in shapes) + " |")
    print("|---:|" + "---:|" * len(shapes))
    for batch in BATCHES:
        cells = []
        base = None
        for _, q, t in shapes:
            ms = time_shape(runner, batch, args.ctx, q, t, args.iters)
            base = ms if base is None else base
            cells.append(f"{ms:.3f} ({ms / base:.2f}x)")
        print(f"| {batch} | " + " | ".join(cells) + " |")
    print("Targets (issue 5, batch 1): k=4 <= 1.10x, 64-node tree <= 1.35x.")


if __name__ == "__main__":
    main()
