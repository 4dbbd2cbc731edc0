"""Reliability of ``planner serve`` through the real server: hostile profiles and racing overwrites.

Starts ``planner serve`` (uvicorn, a separate process) on 127.0.0.1 over a temporary directory.

``hostile``: posts every document of the hostile-profile corpus (tests/support/hostile_profiles.py),
then for each accepted one asks plans at the edges of the query bounds, capacity, the profile and the
dashboard; then restarts the server over a directory holding every corpus document as a file. Counts
answers by status: a server error is any 5xx or a server that does not start.

``race``: N clients (default 64) for a fixed time, each mixing plan queries and overwrites of one of a
few profile ids. Every overwrite gives the profile a new model name, which every plan answer carries.
A client overwrites an id only while holding that id's client-side lock, so for every id there is one
known last acknowledged version. A plan answer is checked when no overwrite of its id was in flight from
before the request was sent until the answer arrived (a sequence counter per id, odd while a write is in
flight): such an answer must carry the last acknowledged version. A writer also checks its own id right
after each 201. Stale = a checked answer that carries another version.

    python benchmarks/api_reliability_bench.py hostile
    python benchmarks/api_reliability_bench.py race [--clients 64] [--duration 30] [--ids 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.hostile_profiles import SYN, as_json, follow_ups, hostile_documents  # noqa: E402

JSON = {"content-type": "application/json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``planner serve`` in a child process; stopped on exit, even on errors."""

    def __init__(self, profiles: Path, *args: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = [
            sys.executable,
            "-m",
            "planner.cli",
            "serve",
            "--profiles",
            str(profiles),
            "--port",
            str(self.port),
        ]
        self.log = profiles.parent / f"serve-{self.port}.log"
        self.proc = subprocess.Popen(
            [*cmd, *args], env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT
        )

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"planner serve exited with {self.proc.returncode}:\n{self.log.read_text()}"
                )
            try:
                if httpx.get(f"{self.base}/healthz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("planner serve did not answer /healthz within 120 s")

    def __exit__(self, *_: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _ask(c: httpx.Client, method: str, url: str, **kw) -> tuple[int | str, str]:
    """Status and text; a dropped connection is an answer too ("no answer"), and a server failure."""
    try:
        r = c.request(method, url, **kw)
    except httpx.TransportError as exc:
        return "no answer", f"{type(exc).__name__}: {exc}"
    return r.status_code, r.text


def _server_error(code: int | str) -> bool:
    return not isinstance(code, int) or code >= 500


def run_hostile(work: Path) -> dict:
    docs = hostile_documents()
    profiles = work / "posted"
    profiles.mkdir()
    shutil.copy(SYN, profiles / "syn.json")
    posts: Counter[int | str] = Counter()
    reads: Counter[int | str] = Counter()
    failures: list[str] = []
    with Server(profiles) as srv, httpx.Client(base_url=srv.base, timeout=120) as c:
        for i, (name, doc) in enumerate(docs.items(), 1):
            print(f"[hostile {i}/{len(docs)}] POST {name}", flush=True)
            params = {"id": name, "overwrite": "true"}
            code, text = _ask(c, "POST", "/profiles", params=params, content=as_json(doc), headers=JSON)
            posts[code] += 1
            if _server_error(code):
                failures.append(f"POST {name}: {code} {text[:200]}")
            if code != 201:
                continue
            for url in follow_ups(name):
                code, text = _ask(c, "GET", url)
                reads[code] += 1
                if _server_error(code):
                    failures.append(f"GET {url}: {code} {text[:200]}")
    on_disk = work / "on_disk"
    on_disk.mkdir()
    shutil.copy(SYN, on_disk / "syn.json")
    for name, doc in docs.items():
        (on_disk / f"{name}.json").write_text(as_json(doc))
    print("[hostile] restart over every document as a file", flush=True)
    try:
        with Server(on_disk) as srv:
            health = httpx.get(f"{srv.base}/healthz", timeout=30).json()
    except RuntimeError as exc:
        failures.append(f"restart: {str(exc)[-300:]}")
        health = {"profiles": 0, "profile_load_errors": {}}
    return {
        "documents": len(docs),
        "post_status": {str(k): v for k, v in sorted(posts.items(), key=str)},
        "read_status": {str(k): v for k, v in sorted(reads.items(), key=str)},
        "server_errors": len(failures),
        "failures": failures,
        "restart": {"served": health["profiles"], "skipped_with_reason": len(health["profile_load_errors"])},
    }


class IdState:
    """Client-side record of one profile id: last acknowledged version, odd ``seq`` while a write runs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seq = 0
        self.version = 0


def _version_doc(base_doc: dict, pid: str, version: int) -> dict:
    """The base profile as version ``version`` of ``pid``: the version is in the model name, which every
    plan answer carries."""
    doc = json.loads(json.dumps(base_doc))
    doc["metadata"]["model"]["name"] = f"{pid}-v{version}"
    return doc


def _query(rng: random.Random, pid: str) -> dict:
    return {"itl_ms": rng.choice([10, 15, 20, 30, 50]), "isl": rng.choice([128, 512, 1024]), "profile": pid}


class Race:
    """What the client threads share: each id's state, the answer counters and the stale answers."""

    def __init__(self, ids: list[str], base_doc: dict, write_share: float) -> None:
        self.ids = ids
        self.base_doc = base_doc
        self.write_share = write_share
        self.state = {pid: IdState() for pid in ids}
        self.totals: Counter[str] = Counter()
        self.status: Counter[int] = Counter()
        self.stale: list[str] = []
        self._guard = threading.Lock()

    def record(self, code: int | None = None, **counts: int) -> None:
        with self._guard:
            self.totals.update(counts)
            if code is not None:
                self.status[code] += 1

    def client(self, n: int, base: str, stop_at: float) -> None:
        """One client until ``stop_at``: an overwrite when its draw says so and no other client is
        writing that id, else a plan query."""
        rng = random.Random(n)
        with httpx.Client(base_url=base, timeout=120) as c:
            while time.monotonic() < stop_at:
                pid = rng.choice(self.ids)
                st = self.state[pid]
                if rng.random() < self.write_share and st.lock.acquire(blocking=False):
                    try:
                        self._overwrite(c, rng, pid, st)
                    finally:
                        st.lock.release()
                else:
                    self._read(c, rng, pid, st)

    def _overwrite(self, c: httpx.Client, rng: random.Random, pid: str, st: IdState) -> None:
        """Post the id's next version (the caller holds its lock); after a 201 the writer's own plan
        query must already carry that version."""
        version = st.version + 1
        doc = _version_doc(self.base_doc, pid, version)
        st.seq += 1  # odd: a write is in flight
        r = c.post("/profiles", params={"id": pid, "overwrite": "true"}, json=doc)
        if r.status_code == 201:
            st.version = version
        st.seq += 1
        self.record(r.status_code, writes=1, writes_ok=int(r.status_code == 201))
        if r.status_code != 201:
            return
        got = c.get("/plan", params=_query(rng, pid))
        self.record(got.status_code)
        if got.status_code == 200:
            self.record(checked=1, checked_after_own_201=1)
            self._check(pid, version, got)

    def _read(self, c: httpx.Client, rng: random.Random, pid: str, st: IdState) -> None:
        """A plan query, checked only when no overwrite of the id was in flight from before it was sent
        until its answer arrived."""
        seq0, expected = st.seq, st.version
        got = c.get("/plan", params=_query(rng, pid))
        self.record(got.status_code, reads=1)
        if got.status_code != 200 or seq0 % 2 or st.seq != seq0:
            return
        self.record(checked=1)
        self._check(pid, expected, got)

    def _check(self, pid: str, version: int, got: httpx.Response) -> None:
        if got.json()["model"] != f"{pid}-v{version}":
            self.stale.append(f"{pid}: acknowledged v{version}, served {got.json()['model']}")


def run_race(work: Path, clients: int, duration: float, n_ids: int, write_share: float) -> dict:
    base_doc = json.loads(SYN.read_text())
    ids = [f"p{i}" for i in range(n_ids)]
    profiles = work / "race"
    profiles.mkdir()
    for pid in ids:
        (profiles / f"{pid}.json").write_text(json.dumps(_version_doc(base_doc, pid, 0)))
    race = Race(ids, base_doc, write_share)
    with Server(profiles) as srv:
        stop_at = time.monotonic() + duration
        print(f"[race] {clients} clients, {n_ids} profile ids, {duration:g} s ...", flush=True)
        threads = [threading.Thread(target=race.client, args=(n, srv.base, stop_at)) for n in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
    return {
        "clients": clients,
        "profile_ids": n_ids,
        "duration_s": round(elapsed, 1),
        "write_share": write_share,
        **dict(race.totals),
        "status": dict(sorted(race.status.items())),
        "server_errors": sum(v for k, v in race.status.items() if k >= 500),
        "stale": len(race.stale),
        "stale_examples": race.stale[:5],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["hostile", "race"])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--ids", type=int, default=4, help="profile ids the race overwrites")
    ap.add_argument("--write-share", type=float, default=0.05, help="share of operations that overwrite")
    ap.add_argument("--out", help="write the result JSON here too")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="api-reliability-") as tmp:
        if a.what == "hostile":
            res = run_hostile(Path(tmp))
        else:
            res = run_race(Path(tmp), a.clients, a.duration, a.ids, a.write_share)
    res = {"bench": a.what, "host": f"{platform.node()} ({os.cpu_count()} CPUs)", **res}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    failed = res["server_errors"] > 0 or res.get("stale", 0) > 0
    if a.what == "hostile":
        failed |= res["restart"]["served"] + res["restart"]["skipped_with_reason"] != res["documents"] + 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
