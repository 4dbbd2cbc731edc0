"""Latency of ``GET /plan`` through the real server on loopback, and the planner's interpolation error.

Starts ``planner serve`` (uvicorn, a separate process) on 127.0.0.1 over a directory holding the
synthetic profile, then runs N closed-loop clients (default 64) on keep-alive HTTP/1.1 connections
for a fixed duration: each client sends a request, reads the whole response, and sends the next. Two
query mixes: ``same`` (one query over and over: the plan cache answers) and ``distinct`` (every request a
different SLA/workload, so every plan is computed). Client-side latency covers the full round trip; the
server's own ``planner_plan_seconds`` histogram is read from /metrics for the handler time alone.

The interpolation section fits the synthetic profile (analytic model, planner.synthetic) and reports
the relative step-time error at held-out (concurrency, context) points it did not measure.

    python benchmarks/plan_bench.py [--clients 64] [--duration 10] [--port 8089]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.metrics import percentile  # noqa: E402
from planner.surface import Surfaces  # noqa: E402
from planner.synthetic import AnalyticModel, synthetic_profile  # noqa: E402

PROFILE = REPO / "configs" / "profiles" / "synthetic-vicuna-7b-h100.json"


def distinct_queries(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = f"itl_ms={rng.uniform(3, 80):.4f}&isl={rng.choice([128, 256, 512, 768, 1024])}"
        q += f"&osl={rng.choice([64, 128, 256, 512])}"
        if rng.random() < 0.5:
            q += f"&request_rate={rng.uniform(1, 200):.3f}"
        out.append(q)
    return out


async def client(
    host: str, port: int, queries: list[str], stop_at: float, lat: list[float], rng_seed: int
) -> int:
    """One closed-loop client on one keep-alive connection; returns the number of errors."""
    reader, writer = await asyncio.open_connection(host, port)
    rng = random.Random(rng_seed)
    errors = 0
    try:
        while time.perf_counter() < stop_at:
            q = queries[rng.randrange(len(queries))]
            req = f"GET /plan?{q} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            t0 = time.perf_counter()
            writer.write(req)
            status = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if not status.startswith(b"HTTP/1.1 200"):
                errors += 1
    finally:
        writer.close()
    return errors


async def load(host: str, port: int, clients: int, duration: float, queries: list[str]) -> dict:
    lat: list[float] = []
    stop_at = time.perf_counter() + duration
    t0 = time.perf_counter()
    errors = await asyncio.gather(*(client(host, port, queries, stop_at, lat, i) for i in range(clients)))
    wall = time.perf_counter() - t0
    ms = [x * 1000 for x in lat]
    return {
        "requests": len(ms),
        "errors": int(sum(errors)),
        "rps": len(ms) / wall,
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
    }


WRK_DISTINCT = """
math.randomseed(1)
local isl = {128, 256, 512, 768, 1024}
local osl = {64, 128, 256, 512}
request = function()
  local q = string.format("/plan?itl_ms=%.4f&isl=%d&osl=%d", 3 + math.random() * 77,
                          isl[math.random(#isl)], osl[math.random(#osl)])
  if math.random() < 0.5 then q = q .. string.format("&request_rate=%.3f", 1 + math.random() * 199) end
  return wrk.format("GET", q)
end
"""


def _wrk_ms(value: str) -> float:
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * scale
    raise ValueError(f"cannot parse wrk latency {value!r}")


def load_wrk(wrk: str, base: str, clients: int, duration: float, mix: str, query: str) -> dict:
    """The same closed loop driven by wrk (C, one thread): far less client CPU than the Python client."""
    cmd = [wrk, "-t1", f"-c{clients}", f"-d{int(duration)}s", "--latency"]
    with tempfile.TemporaryDirectory() as tmp:
        if mix == "distinct":
            script = Path(tmp) / "distinct.lua"
            script.write_text(WRK_DISTINCT)
            cmd += ["-s", str(script)]
        url = f"{base}/plan?{query}"
        out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    res: dict = {"client": "wrk"}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "75%", "90%", "99%"):
            res[f"p{parts[0][:-1]}_ms"] = _wrk_ms(parts[1])
        elif line.startswith("Requests/sec:"):
            res["rps"] = float(parts[1])
        elif "requests in" in line:
            res["requests"] = int(parts[0])
        elif line.strip().startswith("Latency") and len(parts) >= 4:
            res["max_ms"] = _wrk_ms(parts[3])
        elif line.strip().startswith("Non-2xx"):
            res["errors"] = int(parts[-1])
    res.setdefault("errors", 0)
    return res


def run_loop(coro):
    """asyncio.run, on uvloop when it is installed (a cheaper client leaves more CPU to the server)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def server_stack() -> str:
    """What uvicorn will pick in 'auto' mode: httptools + uvloop when installed, else h11 + asyncio."""
    found = []
    for mod in ("httptools", "uvloop"):
        try:
            found.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            found.append(f"no {mod}")
    return ", ".join(found)


def server_histogram(base: str) -> tuple[float, float]:
    """(count, sum seconds) of the server's planner_plan_seconds."""
    count = total = 0.0
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("planner_plan_seconds_count"):
            count = float(line.split()[-1])
        elif line.startswith("planner_plan_seconds_sum"):
            total = float(line.split()[-1])
    return count, total


def interpolation_error() -> dict:
    m = AnalyticModel()
    surfaces = Surfaces(synthetic_profile(m))
    errs = []
    for (tp, method, k), surf in surfaces.decode.items():
        for L in (384, 768, 1280):
            lo, hi = surf.concurrency_bounds(L)
            cs = [c for c in range(lo, hi + 1) if c & (c - 1)]  # every non-power-of-two (not measured)
            pred = surf.step_ms(np.array(cs, dtype=float), L)
            errs += [abs(p / m.step_ms(tp, method, k, c, L) - 1) for c, p in zip(cs, pred, strict=True)]
    e = np.array(errs) * 100
    return {"points": int(e.size), "mean_pct": float(e.mean()), "p99_pct": float(np.percentile(e, 99)),
            "max_pct": float(e.max())}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per query mix")
    ap.add_argument("--port", type=int, default=8089)
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument(
        "--client", choices=("auto", "wrk", "python"), default="auto",
        help="load generator: wrk when installed (auto), else the asyncio client in this file",
    )  # fmt: skip
    a = ap.parse_args()

    err = interpolation_error()
    print(f"interpolation (held-out step time, {err['points']} points): mean {err['mean_pct']:.3f}% "
          f"p99 {err['p99_pct']:.3f}% max {err['max_pct']:.3f}%")  # fmt: skip

    tmp = Path(tempfile.mkdtemp(prefix="plan_bench_"))
    shutil.copy(PROFILE, tmp / "synthetic.json")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "planner.cli", "serve", "--profiles", str(tmp), "--port", str(a.port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{a.port}"
    results: dict = {"interpolation": err, "clients": a.clients, "duration_s": a.duration}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        sample = httpx.get(f"{base}/plan?itl_ms=30").json()
        print(f"warm-up: {sample['message']}")
        results["stack"] = server_stack()
        results["loadavg_before"] = os.getloadavg()
        loadavg = " ".join(f"{x:.2f}" for x in results["loadavg_before"])
        print(f"server/client stack: {results['stack']}; load average {loadavg} on {os.cpu_count()} CPUs")
        mixes = {"same": ["itl_ms=30&isl=512&osl=256"], "distinct": distinct_queries(200_000)}
        print(f"{'mix':<9} {'clients':>7} {'requests':>8} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} "
              f"{'p99 ms':>7} {'max ms':>7} {'server mean ms':>14} {'errors':>6}", flush=True)  # fmt: skip
        wrk = shutil.which("wrk") if a.client in ("auto", "wrk") else None
        if a.client == "wrk" and wrk is None:
            raise SystemExit("--client wrk: wrk is not installed")
        results["client"] = "wrk" if wrk else "python asyncio"
        print(f"client: {results['client']}")
        for name, queries in mixes.items():
            c0, s0 = server_histogram(base)
            if wrk:
                r = load_wrk(wrk, base, a.clients, a.duration, name, mixes["same"][0])
            else:
                r = run_loop(load("127.0.0.1", a.port, a.clients, a.duration, queries))
            c1, s1 = server_histogram(base)
            r["server_mean_ms"] = (s1 - s0) / max(1.0, c1 - c0) * 1000
            results[name] = r
            print(f"{name:<9} {a.clients:>7} {r['requests']:>8} {r['rps']:>7.0f} {r['p50_ms']:>7.2f} "
                  f"{r['p90_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['max_ms']:>7.2f} {r['server_mean_ms']:>14.3f} "
                  f"{r['errors']:>6}")  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
