"""``engine`` command line: ``generate`` (text from a model), ``bench`` (decode step times through
StepProfiler) and ``serve`` (OpenAI-compatible server, engine.serve)."""

from __future__ import annotations

import argparse
import statistics
import sys

from common.cli_help import use_everywhere
from common.methods import METHODS
from common.metrics import request_itl
from engine.engine_config import EngineConfig, add_engine_args
from engine.errors import CapacityError, EngineError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine",
        description="The embedded engine: generate text from a model, time its decode steps (bench), or "
        "serve it over an OpenAI-compatible HTTP API with Prometheus metrics (serve).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    add_engine_args(gen, kv_cache=False)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    gen.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    gen.add_argument("--no-chat", action="store_true", help="do not apply the model's chat template")
    gen.add_argument("--stats", action="store_true", help="print timing and speculation counters")

    bench = sub.add_parser("bench", help="decode step times via StepProfiler (random weights are labelled)")
    add_engine_args(bench, kv_cache=False, spec=False)
    bench.add_argument("--batch", type=_int_list, default=[1, 8, 32], help="concurrencies, e.g. 1,8,32")
    bench.add_argument("--context", type=_int_list, default=[512], help="context lengths, e.g. 512,2048")
    bench.add_argument("--method", choices=METHODS, default="none", help="speculative method")
    bench.add_argument(
        "--k", type=int, default=0, help="draft tokens verified per step (0 with --method none)"
    )
    bench.add_argument("--steps", type=int, default=20, help="timed steps per point")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps before timing each point")
    bench.add_argument(
        "--num-blocks",
        dest="num_gpu_blocks",
        metavar="NUM_BLOCKS",
        type=int,
        default=None,
        help="KV-cache blocks (default: what the largest point needs)",
    )
    bench.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    bench.add_argument(
        "--max-context",
        dest="max_model_len",
        metavar="MAX_CONTEXT",
        type=int,
        default=None,
        help="longest context to prepare for (default: max --context)",
    )
    bench.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly on GPUs")
    bench.add_argument("--prefill", type=_int_list, default=None, help="also time prefill at these lengths")

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with /metrics")
    try:
        from engine.serve.cli import add_arguments
    except ImportError as exc:  # the server's dependencies are optional for generate/bench
        serve.set_defaults(serve_error=str(exc))
    else:
        add_arguments(serve)
    return use_everywhere(parser)


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    llm = LLM(EngineConfig.from_args(args, "engine generate", max_num_seqs=max(1, len(args.prompt))))
    try:
        if llm.weights_label == "random":
            print(f"[{args.model}: random weights -- the text below is meaningless]", file=sys.stderr)
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
        outs = llm.generate(args.prompt, params, chat=not args.no_chat)
        for i, out in enumerate(outs):
            if len(outs) > 1:
                print(f"--- [{i}] ({out.finish_reason})")
            print(out.text)
            if args.stats and len(out.token_times) > 1:
                itl = request_itl(out.token_times[0], out.token_times[-1], len(out.token_times))
                print(f"[{len(out.token_ids)} tokens, ITL {itl * 1e3:.1f} ms]", file=sys.stderr)
        stats = llm.engine.spec_stats
        if args.stats and stats is not None:
            print(f"[spec: {stats.to_dict()}]", file=sys.stderr)
    finally:
        llm.engine.close()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from engine.step_profiler import StepProfiler

    if args.method == "none" and args.k != 0:
        raise SystemExit(f"engine bench: --k {args.k} needs --method ngram|draft|medusa")
    spec = None
    if args.method != "none":
        from engine.spec import SpecConfig

        spec = SpecConfig(method=args.method, k=args.k, seed=args.seed)
    config = EngineConfig.from_args(
        args, "engine bench", spec=spec, max_num_seqs=max(args.batch), cuda_graphs=not args.no_cuda_graphs
    )
    sp = StepProfiler(config)
    try:
        info = sp.model_info
        print(
            f"model {info['name']} ({info['weights']} weights) dtype {sp.dtype} tp {args.tp} "
            f"method {args.method} k {args.k} on {sp.device_name}; KV pool {sp.kv_capacity_blocks} blocks "
            f"x {sp.block_size} tokens"
        )
        print(
            f"{'batch':>6} {'context':>8} {'step ms':>9} {'p50 ms':>9} {'draft ms':>9} "
            f"{'tok/s*':>10} {'kv use':>7}"
        )
        for ctx in args.context:
            for c in args.batch:
                try:
                    t = sp.measure_decode(c, ctx, steps=args.steps, warmup=args.warmup)
                except CapacityError as exc:
                    print(f"{c:>6} {ctx:>8}  skipped: {exc}")
                    continue
                mean = statistics.fmean(t.step_ms)
                print(
                    f"{c:>6} {ctx:>8} {mean:>9.3f} {statistics.median(t.step_ms):>9.3f} "
                    f"{statistics.fmean(t.draft_ms):>9.3f} {c * 1e3 / mean:>10.1f} {t.kv_usage:>7.1%}"
                )
        print("* tok/s = batch / step time: one token per sequence per step (no acceptance counted)")
        for n in args.prefill or []:
            try:
                ms = sp.measure_prefill(n)
            except CapacityError as exc:
                print(f"prefill {n}: skipped: {exc}")
                continue
            print(f"prefill {n:>6} tokens: {statistics.median(ms):.3f} ms (median of {len(ms)})")
    finally:
        sp.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if getattr(args, "serve_error", None):
        raise SystemExit(f"engine serve is unavailable: {args.serve_error}")
    from engine.serve.cli import main as serve_main

    return serve_main(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "bench": cmd_bench, "serve": cmd_serve}
    try:
        return handlers[args.command](args)
    except EngineError as exc:
        print(f"engine {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
