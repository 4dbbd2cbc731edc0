"""Points lost by profile writers: concurrent appenders, and sweeps killed with SIGKILL then resumed.

1. ``--writers`` processes each append ``--points`` distinct prefill points to one profile at once
   (``planner.profile.append_point``, the call every sweep uses); lost = expected - found.
2. ``--kills`` times: start ``profiler sweep --model tiny`` on a small grid, SIGKILL it after a random
   delay, then finish it with ``--resume`` (not killed); lost = grid points (decode and prefill) missing
   from the final profile, duplicated = points stored twice.

    python benchmarks/reliability_bench.py --writers 2,4 --points 150 --kills 10 \\
        --out benchmarks/results/reliability.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from planner.profile import (  # noqa: E402
    EngineInfo,
    Hardware,
    Metadata,
    ModelInfo,
    ModelShape,
    PrefillPoint,
    append_point,
    load_profile,
    now_utc,
)

SWEEP = ["--model", "tiny", "--method", "none,ngram", "--k", "0,2", "--concurrency", "1,2,4",
         "--context", "64,128", "--steps", "3", "--no-plots", "--no-progress"]  # fmt: skip
EXPECTED_DECODE = 2 * 3 * 2  # methods x concurrency x context
EXPECTED_PREFILL = 2  # the default prefill lengths of a tiny engine sweep (64, 256)


def _meta() -> Metadata:
    shape = ModelShape(layers=1, hidden=8, heads=1, kv_heads=1, head_dim=8, vocab=8, params=100)
    return Metadata(
        model=ModelInfo(name="m", shape=shape), hardware=Hardware(gpu_name="cpu", gpu_count=1),
        engine=EngineInfo(name="t", version="0"), backend="engine", dtype="float32", block_size=16,
        kv_capacity_blocks_per_gpu=10, weights="random", source="measured", created_at=now_utc(),
        command="reliability_bench",
    )  # fmt: skip


def _writer(path: str, first: int, n: int) -> None:
    for i in range(first, first + n):
        append_point(
            path, PrefillPoint(tp=1, input_len=i, ttft_ms=1.0, prefill_tokens_per_s_per_gpu=1.0), _meta()
        )


def concurrent_writers(writers: int, points: int, tmp: Path) -> dict:
    out = tmp / f"writers{writers}.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(out), 1 + w * points, points)) for w in range(writers)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    found = {p.input_len for p in load_profile(out).prefill}
    expected = writers * points
    codes = [p.exitcode for p in procs]
    seconds = time.perf_counter() - t0
    return {"writers": writers, "points": expected, "lost": expected - len(found), "writer_exit_codes": codes,
            "seconds": seconds}  # fmt: skip


def killed_sweep(run: int, tmp: Path, rng: random.Random, max_delay_s: float) -> dict:
    out = tmp / f"kill{run}.json"
    cmd = [sys.executable, "-m", "profiler.cli", "sweep", *SWEEP, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    delay = rng.uniform(0.5, max_delay_s)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(load_profile(out).decode) if out.exists() else 0
    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True)
    prof = load_profile(out)
    decode = Counter(p.key for p in prof.decode)
    prefill = Counter(p.key for p in prof.prefill)
    return {
        "run": run, "killed_after_s": round(delay, 2), "decode_points_at_kill": before,
        "resume_exit_code": resumed.returncode,
        "lost": (EXPECTED_DECODE - len(decode)) + (EXPECTED_PREFILL - len(prefill)),
        "duplicated": sum(n - 1 for n in decode.values()) + sum(n - 1 for n in prefill.values()),
        "failed_points": sum(not p.ok for p in prof.decode),
        "temp_files_left": len(list(tmp.glob(f".kill{run}.json.*.tmp"))),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writers", default="2,4")
    ap.add_argument("--points", type=int, default=150, help="points per writer")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--max-delay", type=float, default=25.0, help="latest SIGKILL, seconds after start")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="reliability_"))
    rng = random.Random(a.seed)
    writers = []
    for w in (int(x) for x in a.writers.split(",")):
        writers.append(concurrent_writers(w, a.points, tmp))
        print(f"writers={w}: lost {writers[-1]['lost']} of {writers[-1]['points']}", flush=True)
    kills = []
    for run in range(a.kills):
        kills.append(killed_sweep(run, tmp, rng, a.max_delay))
        k = kills[-1]
        at_kill = k["decode_points_at_kill"]
        print(f"kill {run} after {k['killed_after_s']} s ({at_kill} decode points on disk):"
              f" lost {k['lost']}, duplicated {k['duplicated']}, resume exit {k['resume_exit_code']}",
              flush=True)  # fmt: skip
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, CPU",
        "concurrent_writers": writers,
        "killed_sweeps": kills,
        "points_per_sweep": EXPECTED_DECODE + EXPECTED_PREFILL,
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    lost = sum(w["lost"] for w in writers) + sum(k["lost"] + k["duplicated"] for k in kills)
    print(f"wrote {a.out}; points lost or duplicated in all runs: {lost}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
