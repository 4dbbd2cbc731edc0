"""Spread of the correction daemon's raw ITL factor on a steady engine (issue 13 item 7).

Sweeps a small profile of the model with ``profiler sweep`` (or takes ``--profile``), starts ``engine
serve`` on 127.0.0.1 with the same model and speculation, drives it at constant concurrency with the
profiler's closed-loop load generator, and runs the correction daemon's real tick (scrape, window,
predict) every ``--interval`` seconds for ``--windows`` windows. Per window it records the raw factor
as the daemon computes it (predicted ITL from the window's own tokens per step) and, for comparison,
the raw factor the cumulative tokens per step would give (``raw * cumulative / window``). On a steady
engine the factor should be flat: its spread is the daemon's noise floor.

    python benchmarks/daemon_factor_bench.py --model tiny --spec ngram --k 4 --concurrency 4 \\
        --windows 20 --interval 3 --out benchmarks/results/daemon_factor_tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from planner.daemon import CorrectionDaemon, DaemonConfig  # noqa: E402
from planner.plan import Planner  # noqa: E402
from planner.profile import load_profile  # noqa: E402
from profiler.backends.http import run_load  # noqa: E402
from profiler.backends.vllm import free_port  # noqa: E402
from profiler.prompts import prompts_of_length  # noqa: E402


def sweep(a: argparse.Namespace, out: Path) -> None:
    from profiler.cli import main

    methods = "none" if a.spec == "none" else f"none,{a.spec}"
    ks = "0" if a.spec == "none" else f"0,{a.k}"
    conc = ",".join(str(c) for c in sorted({1, max(1, a.concurrency // 2), a.concurrency, 2 * a.concurrency}))
    args = ["sweep", "--model", a.model, "--method", methods, "--k", ks, "--concurrency", conc,
            "--context", a.contexts, "--steps", str(a.steps), "--out", str(out), "--no-plots",
            "--no-progress"]  # fmt: skip
    print("$ profiler " + " ".join(args), file=sys.stderr, flush=True)
    rc = main(args)
    if rc != 0:
        raise SystemExit(f"profiler sweep failed (exit {rc})")


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"engine serve exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"engine serve did not become healthy within {timeout_s:.0f} s")


def stats(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "mean": statistics.fmean(xs), "sd": statistics.pstdev(xs), "min": min(xs),
            "max": max(xs)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--spec", default="ngram")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--contexts", default="64,128,256", help="sweep contexts (cover prompt + output/2)")
    ap.add_argument("--steps", type=int, default=8, help="sweep: timed steps per point")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--interval", type=float, default=3.0)
    ap.add_argument("--profile", help="use this profile instead of sweeping one")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="daemon_factor_"))
    profile_path = Path(a.profile) if a.profile else tmp / "profile.json"
    if not a.profile:
        sweep(a, profile_path)
    planner = Planner(load_profile(profile_path), profile_path.stem)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", a.model, "--port", str(port),
           "--max-num-seqs", str(a.concurrency), "--log-level", "warning"]  # fmt: skip
    if a.spec != "none":
        cmd += ["--spec", a.spec, "--k", str(a.k)]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "w"))  # noqa: SIM115
    rows: list[dict] = []
    try:
        wait_healthy(url, proc)
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        prompts = prompts_of_length(4 * a.concurrency, a.prompt_tokens)

        def drive() -> None:
            with contextlib.suppress(Exception):  # the server is stopped under the load at the end
                run_load(url, model, prompts, concurrency=a.concurrency, num_requests=100_000,
                         max_tokens=a.max_tokens, scrape=False)  # fmt: skip

        load = threading.Thread(target=drive, daemon=True)
        load.start()
        time.sleep(2 * a.interval)  # let the load reach its steady state
        cfg = DaemonConfig(metrics_url=url + "/metrics", itl_ms=1e6, isl=a.prompt_tokens, osl=a.max_tokens,
                           tp=1, method=a.spec, k=a.k if a.spec != "none" else 0,
                           interval_s=a.interval)  # fmt: skip
        d = CorrectionDaemon(planner, cfg)

        async def collect() -> None:
            async with httpx.AsyncClient() as client:
                for i in range(a.windows + 1):
                    await d.tick(client)
                    o, acc = d.state.last_window, d.state.acceptance
                    if i > 0 and o.raw_factor is not None:
                        cum = acc.tokens_per_step if acc else 1.0
                        rows.append({
                            "window": i, "raw_factor": o.raw_factor, "itl_ms": o.itl_ms,
                            "predicted_itl_ms": o.predicted_itl_ms,
                            "window_tokens_per_step": o.tokens_per_step,
                            "cumulative_tokens_per_step": cum,
                            "raw_factor_cumulative_tps": o.raw_factor * cum / o.tokens_per_step,
                            "concurrency": o.concurrency, "context": o.context, "skipped": o.skipped,
                        })  # fmt: skip
                        print(d.tick_line(), file=sys.stderr, flush=True)
                    await asyncio.sleep(a.interval)

        asyncio.run(collect())
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if len(rows) < 2:
        raise SystemExit(f"only {len(rows)} windows moved the factor; see {tmp / 'serve.log'}")
    result = {
        "what": "raw correction factor per window on a steady engine serve (constant closed-loop load)",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, CPU",
        "profile": str(profile_path),
        "model": a.model, "spec": a.spec, "k": a.k, "concurrency": a.concurrency,
        "raw_factor_window_tps": stats([r["raw_factor"] for r in rows]),
        "raw_factor_cumulative_tps": stats([r["raw_factor_cumulative_tps"] for r in rows]),
        "window_tokens_per_step": stats([r["window_tokens_per_step"] for r in rows]),
        "windows": rows,
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    for key in ("raw_factor_window_tps", "raw_factor_cumulative_tps", "window_tokens_per_step"):
        s = result[key]
        print(
            f"{key}: mean {s['mean']:.3f} sd {s['sd']:.3f} range {s['min']:.3f}-{s['max']:.3f} (n={s['n']})"
        )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
