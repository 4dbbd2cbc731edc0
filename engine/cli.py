"""``engine`` command: ``generate`` (one prompt through the offline API), ``bench`` (decode step
times through the step profiler) and ``serve`` (the OpenAI-compatible server in engine/serve)."""

from __future__ import annotations

import argparse
import statistics
import sys

from engine.errors import EngineError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset name (configs/models), HF directory or .gguf file")
    p.add_argument("--weights", choices=("auto", "real", "random"), default="auto")
    p.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--seed", type=int, default=0)


def _spec(args: argparse.Namespace):  # -> SpecConfig | None
    if args.spec == "none":
        return None
    from engine.spec import SpecConfig

    extra = {"draft_layers": args.draft_layers} if args.spec == "draft" and args.draft_layers else {}
    return SpecConfig(method=args.spec, k=args.k, **extra)


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    llm = LLM(
        args.model, dtype=args.dtype, device=args.device, tp=args.tp, weights=args.weights, spec=_spec(args)
    )
    prompt = args.prompt
    if not args.raw:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    (out,) = llm.generate([prompt], params)
    if llm.weights_label == "random":
        print("[random weights: the text below is meaningless; timing is real]", file=sys.stderr)
    print(out.text)
    if len(out.token_times) > 1:
        itl = (out.token_times[-1] - out.token_times[0]) / (len(out.token_times) - 1)
        print(
            f"[{len(out.token_ids)} tokens, ITL {itl * 1e3:.1f} ms, finish: {out.finish_reason}]",
            file=sys.stderr,
        )
    stats = llm.engine.spec_stats
    if stats is not None and stats.num_decode_steps:
        print(
            f"[{args.spec} k={args.k}: {stats.tokens_per_step:.2f} tokens per decode step]", file=sys.stderr
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from engine.step_profiler import StepProfiler

    sp = StepProfiler(
        args.model,
        dtype=args.dtype,
        device=args.device,
        tp=args.tp,
        method=args.spec,
        k=args.k if args.spec != "none" else 0,
        seed=args.seed,
        weights=args.weights,
        cuda_graphs=not args.no_cuda_graphs,
    )
    info = sp.model_info
    print(
        f"{info['name']} ({info['weights']} weights) on {sp.device_name}, {sp.dtype}, tp={args.tp}, "
        f"method={args.spec} k={sp.k}, KV pool {sp.kv_capacity_blocks} blocks of {sp.block_size}"
    )
    print(f"{'batch':>6} {'context':>8} {'draft_ms':>9} {'verify_ms':>10} {'step_ms':>8} {'tok/s':>9}")
    for context in args.context:
        for batch in args.batch:
            try:
                t = sp.measure_decode(batch, context, steps=args.steps, warmup=args.warmup)
            except EngineError as exc:
                print(f"{batch:>6} {context:>8}  skipped: {exc}")
                continue
            step = statistics.median(t.step_ms)
            print(
                f"{batch:>6} {context:>8} {statistics.median(t.draft_ms):>9.2f} "
                f"{statistics.median(t.verify_ms):>10.2f} {step:>8.2f} "
                f"{batch * t.tokens_per_step / step * 1e3:>9.1f}"
            )
    sp.close()
    return 0


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt")
    _common(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    for p in (gen,):
        p.add_argument("--spec", choices=("none", "ngram", "draft", "medusa"), default="none")
        p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
        p.add_argument("--draft-layers", type=int, default=None, help="self-speculative drafter depth")
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="decode step times (random KV contents, real kernels)")
    _common(bench)
    bench.add_argument("--spec", choices=("none", "ngram", "draft", "medusa"), default="none")
    bench.add_argument("--k", type=int, default=4)
    bench.add_argument("--batch", type=_ints, default=[1, 8, 32], help="comma-separated batch sizes")
    bench.add_argument("--context", type=_ints, default=[512], help="comma-separated context lengths")
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--no-cuda-graphs", action="store_true")
    bench.set_defaults(func=cmd_bench)

    from engine.serve import cli as serve_cli

    serve = sub.add_parser("serve", help="OpenAI-compatible server with vLLM-named Prometheus metrics")
    serve_cli.add_arguments(serve)
    serve.set_defaults(func=serve_cli.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
