"""Engine decode speed on one GPU against measured floors (issue 4, Speed).

Measures in one process, vicuna-7b shape (or --model), fp16, random weights:
1. floors: device-to-device copy bandwidth (bytes read + written), the "weight bytes / copy bandwidth"
   floor, and the GEMV floor (every weight matmul of one decode step at batch 1 -- QKV, O, gate/up,
   down per layer and the LM head -- captured in one CUDA graph);
2. Hugging Face transformers' eager generate per token (LlamaForCausalLM from the config, random fp16
   weights, 512-token prompt), attn_implementation "eager" and "sdpa";
3. the engine's decode step (ModelRunner.execute: CUDA-graph replay + LM head) at batch 1, context 512,
   with and without CUDA graphs;
4. tokens/s at batch x context with the roofline ratio (weights + KV bytes read per step, over the
   copy bandwidth); points whose KV does not fit are reported as such;
5. the attention kernel alone on decode shapes, for a few tile/split variants (achieved KV bandwidth).

Usage (on the GPU machine): PYTHONPATH=. python3 benchmarks/engine_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time

import torch

from engine.attention.metadata import AttentionMetadata
from engine.errors import CapacityError
from engine.presets import resolve_model

CONTEXTS = (512, 2048)
BATCHES = (1, 8, 32, 64, 128)


def cuda_time_ms(fn, *, warmup: int = 3, iters: int = 20) -> float:
    """Median of per-call device-event times (ms)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n = 1 << 30  # 1 GiB fp16 buffers (2 GiB moved per copy)
    src = torch.empty(n // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * n / (ms / 1e3)


def gemv_floor_ms(model, hidden: int, dtype: torch.dtype) -> float:
    """The step's weight matmuls alone at batch 1, replayed from one CUDA graph."""
    weights = []
    for layer in model.layers:
        weights += [layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight]
        weights += [layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight]
    weights.append(model.lm_head.weight)
    xs = {w.shape[1]: torch.randn(1, w.shape[1], device="cuda", dtype=dtype) for w in weights}
    outs = [torch.empty(1, w.shape[0], device="cuda", dtype=dtype) for w in weights]

    def step() -> None:
        for w, o in zip(weights, outs, strict=True):
            torch.matmul(xs[w.shape[1]], w.t(), out=o)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return cuda_time_ms(graph.replay, warmup=3, iters=30)


def hf_generate_ms_per_token(config, attn: str, prompt_len: int = 512) -> float:
    """transformers' LlamaForCausalLM (random fp16 weights) eager generate: ms per new token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        attn_implementation=attn,
    )
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    ids = torch.randint(3, config.vocab_size, (1, prompt_len), device="cuda")

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(4)  # warm-up
    short, long_ = 8, 40
    t_short = min(gen(short) for _ in range(2))
    t_long = min(gen(long_) for _ in range(2))
    return (t_long - t_short) / (long_ - short) * 1e3


def decode_batch(runner, batch: int, ctx: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """`batch` sequences of `ctx` tokens (the last one is this step's query), KV already in cache."""
    per = -(-ctx // runner.block_size)
    if batch * per > runner.num_blocks:
        raise CapacityError(
            f"batch {batch} x context {ctx} needs {batch * per} blocks, the pool has {runner.num_blocks}"
        )
    seqs = [(list(range(b * per, (b + 1) * per)), ctx - 1, 1) for b in range(batch)]
    meta = runner.build_metadata(seqs)
    ids = torch.randint(3, runner.config.vocab_size, (batch,), device=runner.device)
    positions = meta.seq_lens.long() - 1
    return ids, positions, meta


def step_ms(runner, batch: int, ctx: int, *, graphs: bool) -> float:
    ids, positions, meta = decode_batch(runner, batch, ctx)
    saved = runner.decode_graphs
    if not graphs:
        runner.decode_graphs = None
    try:
        return cuda_time_ms(lambda: runner.execute(ids, positions, meta, None), warmup=3, iters=20)
    finally:
        runner.decode_graphs = saved


def attention_variants(runner) -> list[tuple[str, int, int, float, float]]:
    """The kernel alone on vicuna decode shapes: (variant, batch, ctx, us, KV GB/s)."""
    from engine.attention.triton_paged import paged_attention_triton

    cfg = runner.config
    k_cache, v_cache = runner.kv_caches[0]
    variants = {
        "auto (BN64 w4 s2)": {},
        "no split": {"num_splits": 1},
        "BN32 w4": {"block_n": 32},
        "BN128 w8": {"block_n": 128, "num_warps": 8},
        "BN64 w4 s3": {"num_stages": 3},
    }
    rows = []
    for batch, ctx in ((1, 512), (1, 2048), (8, 2048), (64, 2048)):
        try:
            _, _, meta = decode_batch(runner, batch, ctx)
        except CapacityError:
            continue
        q = torch.randn(batch, cfg.num_heads, cfg.head_dim, device="cuda", dtype=runner.dtype)
        kv_bytes = 2 * batch * ctx * runner.num_kv_heads * cfg.head_dim * k_cache.element_size()
        for name, kw in variants.items():
            fn = functools.partial(
                paged_attention_triton, q, k_cache, v_cache, meta, cfg.head_dim**-0.5, **kw
            )
            ms = cuda_time_ms(fn, warmup=3, iters=50)
            rows.append((name, batch, ctx, ms * 1e3, kv_bytes / (ms / 1e3) / 1e9))
    return rows


def kernel_breakdown(runner, batch: int, ctx: int, q: int, tree: bool) -> list[tuple[str, int, float]]:
    """GPU time per kernel family of one eager forward (torch.profiler): (family, calls, us)."""
    from torch.profiler import ProfilerActivity, profile

    per = -(-(ctx + q) // runner.block_size)
    meta = runner.build_metadata([(list(range(b * per, (b + 1) * per)), ctx, q) for b in range(batch)])
    if tree:
        from engine.spec.medusa import MedusaTree, default_tree

        t = MedusaTree.build(default_tree(5, num_nodes=q - 1))
        meta.tree_mask = t.mask.to(runner.device).unsqueeze(0).expand(batch, q, q).contiguous()
    ids = torch.randint(3, runner.config.vocab_size, (batch * q,), device=runner.device)
    positions = (ctx + torch.arange(q, device=runner.device)).repeat(batch)
    for _ in range(2):
        runner.forward(ids, positions, meta)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.forward(ids, positions, meta)
        torch.cuda.synchronize()
    families: dict[str, list[tuple[int, float]]] = {}
    for ev in prof.key_averages():
        us = float(getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0))
        if us <= 0:
            continue
        name = ev.key
        low = name.lower()
        if "paged_attn" in low or "merge_splits" in low:
            fam = "attention (triton_paged)"
        elif "gemm" in low or "gemv" in low or "cutlass" in low or "sm90" in low or "nvjet" in low:
            fam = "matmul"
        elif "index" in low and "copy" in low:
            fam = "index_copy (write_kv)"
        else:
            fam = "other: " + name[:60]
        families.setdefault(fam, []).append((ev.count, us))
    rows = [(fam, sum(c for c, _ in v), sum(u for _, u in v)) for fam, v in families.items()]
    return sorted(rows, key=lambda r: -r[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vicuna-7b")
    ap.add_argument("--quick", action="store_true", help="skip HF and the attention variants")
    ap.add_argument("--gpu-memory-utilization", type=float, default=1.0)
    args = ap.parse_args()
    import triton

    from engine.runner import ModelRunner

    dev = torch.cuda.get_device_name()
    print(
        f"# device: {dev}; torch {torch.__version__}; triton {triton.__version__}; "
        f"model {args.model} fp16 random weights"
    )
    source = resolve_model(args.model, weights="random")
    cfg = source.config
    bw = copy_bandwidth()
    weight_bytes = cfg.weight_bytes_per_step(2)
    kv_tok = cfg.kv_bytes_per_token(2)
    hf = {}
    if not args.quick:
        for attn in ("eager", "sdpa"):
            hf[attn] = hf_generate_ms_per_token(cfg, attn)
            gc.collect()  # the HF model is gone with its function's frame; give its memory back
            torch.cuda.empty_cache()

    gc.collect()
    torch.cuda.empty_cache()  # the KV pool is sized from free memory
    runner = ModelRunner(
        source,
        dtype="float16",
        device="cuda",
        max_num_seqs=max(BATCHES),
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    for k, v in runner.kv_caches:  # never time on zeros
        k.normal_()
        v.normal_()
    gemv = gemv_floor_ms(runner.model, cfg.hidden_size, runner.dtype)
    copy_floor = weight_bytes / bw * 1e3
    b1_graph = step_ms(runner, 1, 512, graphs=True)
    b1_eager = step_ms(runner, 1, 512, graphs=False)

    print("\n## Decode step, batch 1, context 512")
    print("| what | ms | x GEMV floor |")
    print("|---|---:|---:|")
    print(f"| copy bandwidth (read+write) | {bw / 1e12:.2f} TB/s | |")
    print(
        f"| floor: weight bytes {weight_bytes / 1e9:.2f} GB / copy bandwidth | {copy_floor:.3f} | "
        f"{copy_floor / gemv:.2f} |"
    )
    print(f"| floor: GEMV (weight matmuls, one CUDA graph) | {gemv:.3f} | 1.00 |")
    print(f"| engine step, CUDA graph (target <= 1.15x GEMV) | {b1_graph:.3f} | {b1_graph / gemv:.2f} |")
    print(f"| engine step, eager | {b1_eager:.3f} | {b1_eager / gemv:.2f} |")
    for attn, ms in hf.items():
        print(
            f"| HF transformers generate ({attn}) per token | {ms:.3f} | {ms / gemv:.2f} "
            f"(engine {ms / b1_graph:.1f}x faster; target >= 15x) |"
        )

    print("\n## Decode throughput (CUDA graphs); roofline = (weights + KV read) / copy bandwidth")
    print(f"KV pool: {runner.num_blocks} blocks of {runner.block_size} tokens")
    print("| batch | context | step ms | tokens/s | roofline ms | x roofline |")
    print("|---:|---:|---:|---:|---:|---:|")
    for ctx in CONTEXTS:
        for batch in BATCHES:
            roof = (weight_bytes + batch * ctx * kv_tok) / bw * 1e3
            try:
                ms = step_ms(runner, batch, ctx, graphs=True)
            except CapacityError as exc:
                print(f"| {batch} | {ctx} | does not fit | | {roof:.3f} | ({exc}) |")
                continue
            print(f"| {batch} | {ctx} | {ms:.3f} | {batch / ms * 1e3:.0f} | {roof:.3f} | {ms / roof:.2f} |")

    if not args.quick:
        print("\n## Attention kernel alone (one layer, vicuna-7b heads), KV bandwidth = K+V bytes / time")
        print("| variant | batch | context | us | KV GB/s |")
        print("|---|---:|---:|---:|---:|")
        for name, batch, ctx, us, gbs in attention_variants(runner):
            print(f"| {name} | {batch} | {ctx} | {us:.1f} | {gbs:.0f} |")
        for title, q, tree in (
            ("decode, batch 1, context 512", 1, False),
            ("tree verify 65 queries", 65, True),
        ):
            rows = kernel_breakdown(runner, 1, 512, q, tree)
            total = sum(r[2] for r in rows)
            print(
                f"\n## GPU kernel time of one eager forward, {title}: {total / 1e3:.3f} ms in "
                f"{sum(r[1] for r in rows)} kernels (top 12 families)"
            )
            print("| kernel family | calls | ms |")
            print("|---|---:|---:|")
            for fam, calls, us in rows[:12]:
                print(f"| {fam} | {calls} | {us / 1e3:.3f} |")


if __name__ == "__main__":
    main()
