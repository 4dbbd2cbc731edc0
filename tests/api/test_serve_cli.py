"""``planner serve`` as a user runs it: a real uvicorn process on loopback, with the daemon attached."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path):
    shutil.copy(REPO / "configs" / "profiles" / "synthetic-vicuna-7b-h100.json", tmp_path / "syn.json")
    port, dead = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    dead_url = f"http://127.0.0.1:{dead}/metrics"
    cmd = [sys.executable, "-m", "planner.cli", "serve", "--profiles", str(tmp_path), "--port", str(port),
           "--metrics-url", dead_url, "--itl-ms", "30", "--interval", "0.2"]  # fmt: skip
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_serve_answers_plans_and_reports_a_dead_metrics_endpoint(server: str) -> None:
    plan = httpx.get(f"{server}/plan", params={"itl_ms": 30}).json()
    assert plan["feasible"] and plan["profile"] == "syn" and plan["source"] == "synthetic"
    assert httpx.get(f"{server}/plan", params={"itl_ms": "x"}).status_code == 422
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = httpx.get(f"{server}/correction").json()["profiles"]["syn"]
        if state["consecutive_failures"] >= 2:
            break
        time.sleep(0.1)
    assert state["stale"] and "ConnectError" in state["last_error"]
    corrected = httpx.get(f"{server}/plan", params={"itl_ms": 30, "corrected": "true"}).json()
    assert corrected["inputs"]["itl_correction"] == 1.0 and corrected["choice"] == plan["choice"]
    assert httpx.get(f"{server}/healthz").json()["correction"] == "stale: syn"


def _start(tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None):
    shutil.copy(REPO / "configs" / "profiles" / "synthetic-vicuna-7b-h100.json", tmp_path / "syn.json")
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **(env_extra or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "planner.cli",
        "serve",
        "--profiles",
        str(tmp_path),
        "--port",
        str(port),
        *args,
    ]
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
    proc.kill()
    raise AssertionError("planner serve did not come up")


def test_serve_takes_the_token_from_the_environment_and_limits_bodies(tmp_path: Path) -> None:
    proc, base = _start(tmp_path, "--max-body-bytes", "200000", env_extra={"SPECPLAN_API_KEY": "tok"})
    try:
        doc = httpx.get(f"{base}/profiles/syn").json()
        assert httpx.post(f"{base}/profiles", params={"id": "x"}, json=doc).status_code == 401
        auth = {"Authorization": "Bearer tok"}
        assert httpx.post(f"{base}/profiles", params={"id": "x"}, json=doc, headers=auth).status_code == 201
        big = httpx.post(f"{base}/profiles", params={"id": "y"}, content=b" " * 300_000, headers=auth)
        assert big.status_code == 413 and "200000" in big.json()["detail"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_read_only_refuses_writes(tmp_path: Path) -> None:
    proc, base = _start(tmp_path, "--read-only")
    try:
        doc = httpx.get(f"{base}/profiles/syn").json()
        r = httpx.post(f"{base}/profiles", params={"id": "x"}, json=doc)
        assert r.status_code == 403 and not (tmp_path / "x.json").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_body_limit_below_one_byte(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "planner.cli", "serve", "--profiles", str(tmp_path), "--max-body-bytes", "0"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "max_body_bytes=0" in out.stderr


def test_serve_prints_its_url_profiles_and_default(server: str, tmp_path: Path) -> None:
    out = (tmp_path / "serve.log").read_text()
    assert "planner serve: loaded 1 profiles from" in out and ": syn" in out
    assert "default profile syn (the only loaded profile)" in out
    assert f"listening on {server} (dashboard /, API reference /docs)" in out
