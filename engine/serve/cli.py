"""``engine serve``: flags and entry point (engine/cli.py registers the subcommand and calls ``main``).

Flag names follow ``vllm serve`` where one exists (``--port``, ``--max-num-seqs``,
``--num-gpu-blocks-override``-like ``--num-gpu-blocks``, ``--served-model-name``, ``--max-model-len``,
``--tensor-parallel-size``, ``--num-speculative-tokens``), so a command line moves between the two.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import uvicorn
from fastapi import FastAPI

from engine.engine_config import EngineConfig, add_engine_args
from engine.errors import EngineError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``engine serve`` flags on ``parser``."""
    add_engine_args(parser)
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
        "--warm-up",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="before listening, step every CUDA-graph batch size and verify width once, so no request "
        "pays a graph capture or a kernel compile (default: on a GPU)",
    )
    parser.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the engine in a process of its own, so the HTTP loop and the engine's steps never "
        "wait for each other's Python (default: on a GPU)",
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
    from engine.serve.launcher import bind_socket

    log.info(
        "loading %s (weights %s, dtype %s, device %s, tp %d%s) ...",
        args.model, args.weights, args.dtype, args.device or "auto", args.tp,
        f", spec {args.spec} k={args.k}" if args.spec != "none" else "",
    )  # fmt: skip
    t0 = time.perf_counter()
    names = tuple(args.served_model_name or (args.model,))
    try:
        config = EngineConfig.from_args(args, "engine serve")
        app = _app(args, config, names)
    except EngineError as exc:
        log.error("cannot start: %s", exc)
        return 2
    log.info("loaded %s in %.1f s", args.model, time.perf_counter() - t0)
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


def _app(args: argparse.Namespace, config: EngineConfig, names: tuple[str, ...]) -> FastAPI:
    """The server's app over an engine in this process or in an engine-core process of its own."""
    from engine.serve.core_process import app_for_core, wants_engine_process

    log = logging.getLogger("engine.serve")
    if wants_engine_process(args.engine_process, config):
        log.info("starting the engine core process (it loads the model and warms up) ...")
        app = app_for_core(
            config, names[0], aliases=names[1:], warm_up=args.warm_up, log_level=args.log_level
        )
        warm = app.state.serve.async_engine.info.warm_up
        if warm:
            log.info(warm)
        return app
    from engine.serve.app import app_for_engine
    from engine.warmup import serving_engine

    engine, report = serving_engine(config, args.warm_up)
    if report is not None:
        log.info(report.describe())
    return app_for_engine(
        engine, names[0], aliases=names[1:], num_spec_tokens=config.spec.k if config.spec else 0
    )


def _standalone() -> int:  # `python -m engine.serve.cli ...` while engine/cli.py lacks the subcommand
    parser = argparse.ArgumentParser(
        prog="engine serve", description="OpenAI-compatible server over the engine"
    )
    add_arguments(parser)
    return main(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(_standalone())
