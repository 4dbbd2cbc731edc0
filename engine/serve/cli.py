"""``engine serve``: flags and entry point (engine/cli.py registers the subcommand and calls ``main``).

Flag names follow ``vllm serve`` where one exists (``--port``, ``--max-num-seqs``,
``--num-gpu-blocks-override``-like ``--num-gpu-blocks``, ``--served-model-name``, ``--max-model-len``,
``--tensor-parallel-size``, ``--num-speculative-tokens``), so a command line moves between the two.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import time

import uvicorn

from common.methods import WEIGHT_CHOICES
from engine.errors import EngineError
from engine.spec.flags import add_spec_arguments, spec_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``engine serve`` flags on ``parser``."""
    parser.add_argument("--model", required=True, help="preset name, HF directory or .gguf file")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="names clients may use (first: the name in responses and metrics); default: --model",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 serves every interface, "
        "with no authentication)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--weights",
        choices=WEIGHT_CHOICES,
        default="auto",
        help="real: the preset's shipped weights; random: seeded random weights (meaningless text); "
        "auto: real when available",
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto | float32 | float16 | bfloat16 (auto: the model's)"
    )
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument(
        "--max-num-seqs", type=int, default=64, help="most requests running at once; more wait"
    )
    parser.add_argument(
        "--num-gpu-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)"
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV blocks of a prompt prefix seen before (vLLM's flag; default on)",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    parser.add_argument(
        "--tp", "--tensor-parallel-size", dest="tp", type=int, default=1, help="tensor-parallel size"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling")
    add_spec_arguments(parser)
    parser.add_argument(
        "--warm-up",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="before listening, step every CUDA-graph batch size and verify width once, so no request "
        "pays a graph capture or a kernel compile (default: on a GPU)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"), help="server log level"
    )


def main(args: argparse.Namespace) -> int:
    """Load the model, then serve until interrupted. Returns the process exit code."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("engine.serve")
    from engine.llm_engine import LLMEngine
    from engine.serve.app import app_for_engine
    from engine.serve.launcher import bind_socket

    log.info(
        "loading %s (weights %s, dtype %s, device %s, tp %d%s) ...",
        args.model, args.weights, args.dtype, args.device or "auto", args.tp,
        f", spec {args.spec} k={args.k}" if args.spec != "none" else "",
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        spec = spec_config(args, "engine serve")
        engine = LLMEngine(
            args.model,
            dtype=args.dtype,
            device=args.device,
            max_num_seqs=args.max_num_seqs,
            num_gpu_blocks=args.num_gpu_blocks,
            block_size=args.block_size,
            max_model_len=args.max_model_len,
            spec=spec,
            tp=args.tp,
            seed=args.seed,
            weights=args.weights,
            enable_prefix_caching=args.enable_prefix_caching,
        )
    except EngineError as exc:
        log.error("cannot start: %s", exc)
        return 2
    log.info("loaded %s in %.1f s", args.model, time.perf_counter() - t0)
    if args.warm_up or (args.warm_up is None and engine.runner.device.type == "cuda"):
        from engine.warmup import warm_up

        log.info("warming up: every CUDA-graph batch size up to --max-num-seqs %d ...", args.max_num_seqs)
        log.info(warm_up(engine).describe())
    # what start-up built (model, tokenizer, graphs, warm-up garbage aside) stays alive for the server's
    # life: frozen, the collector's full passes while serving scan only what requests create
    gc.collect()
    gc.freeze()
    names = tuple(args.served_model_name or (args.model,))
    app = app_for_engine(engine, names[0], aliases=names[1:], num_spec_tokens=spec.k if spec else 0)
    sock = bind_socket(args.host, args.port)
    log.info(
        "serving %s on http://%s:%d (OpenAI API under /v1, metrics at /metrics)",
        names[0],
        args.host,
        args.port,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False))

    async def serve_and_announce() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            log.info("ready: http://%s:%d/v1 (model %s)", args.host, args.port, names[0])
        await task

    try:
        asyncio.run(serve_and_announce())
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


def _standalone() -> int:  # `python -m engine.serve.cli ...` while engine/cli.py lacks the subcommand
    parser = argparse.ArgumentParser(
        prog="engine serve", description="OpenAI-compatible server over the engine"
    )
    add_arguments(parser)
    return main(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(_standalone())
