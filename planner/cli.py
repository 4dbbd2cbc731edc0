"""``planner`` command line: plan, serve, daemon, synthetic."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli_help import use_everywhere
from planner.plan import PlanInputError, Planner
from planner.priors import workloads
from planner.profile import ProfileError, load_profile, save_profile

if TYPE_CHECKING:
    from planner.daemon import DaemonConfig


def _sla_args(p: argparse.ArgumentParser, *, itl_required: bool = True) -> None:
    p.add_argument("--itl-ms", type=float, required=itl_required, help="ITL SLA in milliseconds")
    p.add_argument("--ttft-ms", type=float, help="TTFT SLA in milliseconds")
    p.add_argument("--isl", type=int, help="input (prompt) length in tokens")
    p.add_argument("--osl", type=int, help="output length in tokens")
    p.add_argument("--request-rate", type=float, help="requests per second to size replicas for")
    p.add_argument("--max-gpus", type=int, help="GPU budget")


def _sla_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        itl_ms=a.itl_ms, ttft_ms=a.ttft_ms, isl=a.isl, osl=a.osl,
        request_rate=a.request_rate, max_gpus=a.max_gpus,
    )  # fmt: skip


def _daemon_config(a: argparse.Namespace) -> DaemonConfig:
    """The correction daemon's settings from the flags ``planner serve`` and ``planner daemon`` share."""
    from planner.daemon import DaemonConfig

    return DaemonConfig(
        metrics_url=a.metrics_url,
        interval_s=a.interval,
        tp=a.tp,
        method=a.method,
        k=a.k,
        smoothing=a.smoothing,
        **_sla_kwargs(a),
    )


def _load_planner(path: str) -> Planner:
    return Planner(load_profile(path), Path(path).stem)


def cmd_plan(a: argparse.Namespace) -> int:
    from planner.render import render_plan

    planner = _load_planner(a.profile)
    res = planner.plan(
        **_sla_kwargs(a),
        acceptance=a.acceptance,
        draft_coverage=a.draft_coverage,
        workload=a.workload,
        prior_model=a.prior_model,
    )
    print(res.model_dump_json(indent=2) if a.json else render_plan(res))
    return 0 if res.feasible else 3


def cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from api.guard import API_KEY_ENV, DEFAULT_MAX_BODY_BYTES

    daemon_cfg = None
    if a.metrics_url:
        if a.itl_ms is None:
            raise PlanInputError("--itl-ms", None, "is required with --metrics-url (the daemon's SLA)")
        daemon_cfg = _daemon_config(a)
    api_key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is None and not a.read_only and a.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("planner.serve").warning(
            "serving on %s with writes open to every client: set %s (or --api-key) or --read-only",
            a.host,
            API_KEY_ENV,
        )
    app = create_app(
        a.profiles,
        daemon=daemon_cfg,
        daemon_profile=a.daemon_profile,
        connector=a.connector,
        api_key=api_key,
        read_only=a.read_only,
        max_body_bytes=DEFAULT_MAX_BODY_BYTES if a.max_body_bytes is None else a.max_body_bytes,
        default_profile=a.default_profile,
    )
    store = app.state.server.store
    chosen = app.state.server.default_profile()
    print(f"planner serve: loaded {len(store.ids())} profiles from {a.profiles}: {', '.join(store.ids())}")
    for pid, err in store.load_errors.items():
        print(f"planner serve: skipped {pid}: {err}")
    if chosen is not None:
        print(f"planner serve: default profile {chosen.id} ({chosen.reason})")
    print(
        f"planner serve: listening on http://{a.host}:{a.port} (dashboard /, API reference /docs)", flush=True
    )
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False)
    return 0


def cmd_daemon(a: argparse.Namespace) -> int:
    from planner.daemon import CorrectionDaemon, make_connector

    daemon = CorrectionDaemon(_load_planner(a.profile), _daemon_config(a), make_connector(a.connector))
    logging.getLogger("planner.daemon").info(
        "correcting %s for %s every %ss", daemon.state.running_config, a.metrics_url, a.interval
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(daemon.run(max_ticks=a.max_ticks))
    print(daemon.state.model_dump_json(indent=2))
    return 0


def cmd_synthetic(a: argparse.Namespace) -> int:
    from planner.synthetic import synthetic_profile

    command = shlex.join(["planner", *sys.argv[1:]]) if a.command is None else a.command
    prof = synthetic_profile(command=command)
    save_profile(prof, a.out)
    print(f"wrote {a.out}: {len(prof.decode)} decode, {len(prof.prefill)} prefill points (source: synthetic)")
    return 0


def _daemon_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=float, default=10.0, help="seconds between scrapes of --metrics-url")
    p.add_argument("--tp", type=int, help="running config (default: the plan's choice)")
    p.add_argument("--method", help="running speculative method (default: the plan's choice)")
    p.add_argument("--k", type=int, help="running num_speculative_tokens (default: the plan's choice)")
    p.add_argument(
        "--smoothing",
        type=float,
        default=0.3,
        help="EMA weight of the newest window in the correction factor",
    )
    p.add_argument(
        "--connector", default="log", help="where decisions go: log | file:PATH | http(s)://callback"
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="planner",
        description="Plan tensor-parallel size, speculative method, k, concurrency and replicas under an "
        "ITL SLA from a measured profile (plan); serve plans over HTTP with a dashboard (serve); keep a plan "
        "honest against a live engine's metrics (daemon); write the analytic example profile (synthetic).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("plan", help="choose tp, method, k, concurrency and replicas under an SLA")
    p.add_argument("--profile", required=True, help="profile JSON file")
    _sla_args(p)
    p.add_argument("--acceptance", type=float, help="per-position acceptance rate alpha (given)")
    p.add_argument("--draft-coverage", type=float, help="share of steps with a draft (with --acceptance)")
    p.add_argument(
        "--workload",
        choices=workloads(),
        help="Spec-Bench category the acceptance is for (default: mix, the categories weighted as the "
        "shipped prompt set)",
    )
    p.add_argument(
        "--prior-model",
        help="apply this model's literature prior to the profile's model (labelled as such; default: "
        "only the profile's own model has a prior)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("serve", help="HTTP API and dashboard over a directory of profiles")
    p.add_argument("--profiles", required=True, help="directory of profile JSON files")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (debug, info, warning, error)")
    p.add_argument(
        "--api-key",
        help="token that POST /profiles must carry as 'Authorization: Bearer TOKEN' "
        "(default: env SPECPLAN_API_KEY; unset: writes are open). Prefer the env var: "
        "a command line is visible to every user of the host",
    )
    p.add_argument("--read-only", action="store_true", help="refuse every write (POST /profiles is a 403)")
    p.add_argument(
        "--max-body-bytes", type=int, help="largest request body accepted (default 16 MiB; 413 above)"
    )
    p.add_argument("--metrics-url", help="run the correction daemon against this /metrics URL")
    p.add_argument("--daemon-profile", help="profile id the daemon corrects (default: the only one)")
    p.add_argument(
        "--default-profile",
        help="profile id that answers queries naming none (default: the only one, else the newest measured "
        "profile for this host's GPU, else the newest measured one; never a synthetic one)",
    )
    _sla_args(p, itl_required=False)
    _daemon_args(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("daemon", help="correction-factor daemon against a live /metrics endpoint")
    p.add_argument("--profile", required=True, help="profile JSON file to plan from and correct")
    p.add_argument(
        "--metrics-url",
        required=True,
        help="Prometheus /metrics URL of the running engine (vLLM or engine serve)",
    )
    p.add_argument("--max-ticks", type=int, help="stop after this many scrapes (default: run forever)")
    _sla_args(p)
    _daemon_args(p)
    p.set_defaults(fn=cmd_daemon)

    p = sub.add_parser("synthetic", help="write the documented analytic profile (source: synthetic)")
    p.add_argument("--out", required=True, help="profile JSON file to write")
    p.add_argument("--command", help="command string to record (default: this command line)")
    p.set_defaults(fn=cmd_synthetic)
    return use_everywhere(ap)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scrape is noise
    try:
        return int(args.fn(args))
    except (ProfileError, PlanInputError, ValueError) as exc:
        print(f"planner: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
