"""The correction daemon against endpoints that lie: bad numbers, outliers, huge or empty bodies, garbage.

The endpoint is a real HTTP server whose body the test sets per scrape: a good body is prometheus_client's
exposition of known traffic (as in test_daemon.py), a bad one is that body with one sample replaced.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest

from planner.daemon import CorrectionDaemon, DaemonConfig, FileConnector
from planner.plan import Planner
from planner.synthetic import synthetic_profile


def _load_daemon_helpers():
    """Import test_daemon.py's registry and traffic helpers (tests are not a package here)."""
    name = "_daemon_test_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("test_daemon.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


H = _load_daemon_helpers()
Traffic, VllmRegistry, serve_request, gap_for_factor = (
    H.Traffic,
    H.VllmRegistry,
    H.serve_request,
    H.gap_for_factor,
)


class Endpoint:
    """Serves ``body`` at /metrics (whatever the test puts there), over real HTTP."""

    def __init__(self) -> None:
        self.body = b""
        self.reg = VllmRegistry()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                body = outer.body
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def good(self) -> str:
        self.body = generate_latest(self.reg.registry)
        return self.body.decode()

    def with_sample(self, name: str, value: str) -> None:
        """The current good body with sample ``name`` set to ``value`` (e.g. NaN, +Inf, 1e300)."""
        lines = [f"{name} {value}" if line.split(" ")[0].split("{")[0] == name else line
                 for line in self.good().splitlines()]  # fmt: skip
        assert any(line.startswith(f"{name} {value}") for line in lines), name
        self.body = ("\n".join(lines) + "\n").encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ep():
    e = Endpoint()
    e.reg.running.set(4)
    yield e
    e.close()


@pytest.fixture(scope="module")
def planner() -> Planner:
    return Planner(synthetic_profile(), "synthetic")


def make(planner: Planner, url: str, connector=None, itl_ms: float = 30.0, **kw) -> CorrectionDaemon:
    cfg = DaemonConfig(metrics_url=url, itl_ms=itl_ms, isl=512, osl=256, tp=1, method="ngram", k=2,
                       min_tokens=1, interval_s=0.01, **kw)  # fmt: skip
    return CorrectionDaemon(planner, cfg, connector)


def tick(d: CorrectionDaemon) -> None:
    async def go() -> None:
        async with httpx.AsyncClient() as client:
            await d.tick(client)

    asyncio.run(go())


ITL_SUM = "vllm:inter_token_latency_seconds_sum"


def good_windows(planner: Planner, ep: Endpoint, d: CorrectionDaemon, n: int, factor: float = 1.0) -> None:
    t = Traffic(gap_s=gap_for_factor(planner, factor, Traffic()))
    for _ in range(n):
        serve_request(ep.reg, t)
        ep.good()
        tick(d)


@pytest.mark.parametrize("bad", ["NaN", "+Inf", "-Inf", "-5"])
def test_bad_numbers_are_skipped_and_the_loop_lives(planner: Planner, ep: Endpoint, bad: str) -> None:
    d = make(planner, ep.url)
    ep.good()
    tick(d)
    good_windows(planner, ep, d, 2, factor=1.5)
    serve_request(ep.reg, Traffic(gap_s=gap_for_factor(planner, 1.5, Traffic())))
    ep.with_sample(ITL_SUM, bad)
    tick(d)
    assert d.state.stale and "itl_sum" in d.state.last_error and d.state.skipped_windows == 1
    assert d.state.factor == pytest.approx(1.5, rel=1e-6)
    good_windows(planner, ep, d, 1, factor=1.5)  # the next good scrape spans both windows
    assert not d.state.stale and d.state.factor == pytest.approx(1.5, rel=1e-6)


def test_zero_itl_sum_is_skipped(planner: Planner, ep: Endpoint) -> None:
    d = make(planner, ep.url)
    ep.good()
    tick(d)
    good_windows(planner, ep, d, 2, factor=1.2)
    serve_request(ep.reg, Traffic())
    ep.with_sample(ITL_SUM, "0.0")  # a decrease: read as a restart, whose window has ITL sum 0
    tick(d)
    assert "ITL sum 0" in d.state.last_window.skipped and d.state.factor == pytest.approx(1.2, rel=1e-6)


def test_cli_daemon_survives_nan_inf_and_zero(planner: Planner, ep: Endpoint, tmp_path: Path, capsys) -> None:
    from planner.cli import main
    from planner.profile import save_profile

    prof = tmp_path / "syn.json"
    save_profile(planner.profile, prof)
    ep.with_sample(ITL_SUM, "NaN")
    rc = main(["daemon", "--profile", str(prof), "--metrics-url", ep.url, "--itl-ms", "30", "--isl", "512",
               "--osl", "256", "--tp", "1", "--method", "ngram", "--k", "2", "--interval", "0.01",
               "--max-ticks", "3"])  # fmt: skip
    state = json.loads(capsys.readouterr().out)
    assert rc == 0 and state["consecutive_failures"] == 3 and state["factor"] == 1.0


def test_one_absurd_scrape_does_not_move_the_factor(planner: Planner, ep: Endpoint) -> None:
    d = make(planner, ep.url)
    ep.good()
    tick(d)
    good_windows(planner, ep, d, 4, factor=1.0)
    serve_request(ep.reg, Traffic(gap_s=gap_for_factor(planner, 1.0, Traffic())))
    ep.with_sample(ITL_SUM, "1e300")
    tick(d)
    assert "outside [0.1, 10]" in d.state.last_window.skipped
    assert d.state.factor == pytest.approx(1.0, rel=1e-6)
    good_windows(planner, ep, d, 2, factor=1.0)  # back to normal counters (read as a restart)
    assert d.state.factor == pytest.approx(1.0, rel=1e-6) and d.corrected.feasible


def test_outliers_are_held_until_they_persist(planner: Planner, ep: Endpoint) -> None:
    d = make(planner, ep.url)
    ep.good()
    tick(d)
    good_windows(planner, ep, d, 3, factor=1.0)
    good_windows(planner, ep, d, 1, factor=4.0)  # 4x the smoothed factor: held
    assert d.state.factor == pytest.approx(1.0, rel=1e-6) and "outlier" in d.state.last_window.skipped
    good_windows(planner, ep, d, 2, factor=4.0)  # three in a row: a real shift
    assert d.state.factor == pytest.approx(4.0, rel=1e-6)


def test_oversized_empty_and_garbage_bodies_are_stale_not_fatal(planner: Planner, ep: Endpoint) -> None:
    d = make(planner, ep.url, max_bytes=64 << 10)
    ep.body = b"# HELP x\n" * 200_000  # ~1.8 MB
    tick(d)
    assert d.state.stale and "limit" in d.state.last_error
    ep.body = b""
    tick(d)
    assert d.state.stale and "no vLLM series" in d.state.last_error
    ep.body = b"\x00\xff{not prometheus at all\n\tvllm:x{{{ 1 2 3\n"
    tick(d)
    assert d.state.stale and d.state.consecutive_failures == 3
    ep.good()
    tick(d)
    assert not d.state.stale


def test_parsing_runs_off_the_event_loop(planner: Planner, ep: Endpoint, monkeypatch) -> None:
    import planner.daemon.runner as runner

    threads: list[int] = []
    real = runner.parse_metrics

    def recording(text: str):
        threads.append(threading.get_ident())
        return real(text)

    monkeypatch.setattr(runner, "parse_metrics", recording)
    d = make(planner, ep.url)
    ep.good()
    loop_thread: list[int] = []

    async def go() -> None:
        loop_thread.append(threading.get_ident())
        async with httpx.AsyncClient() as client:
            await d.tick(client)

    asyncio.run(go())
    assert threads and threads[0] != loop_thread[0]


def test_each_window_uses_its_own_tokens_per_step(planner: Planner, ep: Endpoint) -> None:
    """Acceptance changes between windows at the same true step time: the raw factor stays 1."""
    d = make(planner, ep.url)
    ep.good()
    tick(d)
    high = Traffic()  # 1.6 tokens per step
    low = Traffic(steps=216, drafts=120, accepted_per_pos=(30, 10))  # ~1.19 tokens per step
    for t in (high, high, low, low):
        serve_request(ep.reg, Traffic(**{**t.__dict__, "gap_s": gap_for_factor(planner, 1.0, t)}))
        ep.good()
        tick(d)
        assert d.state.last_window.raw_factor == pytest.approx(1.0, rel=1e-6)
    assert d.state.last_window.tokens_per_step == pytest.approx(256 / 216)


def test_decision_is_resent_when_the_predicted_itl_moves(
    planner: Planner, ep: Endpoint, tmp_path: Path
) -> None:
    out = tmp_path / "decision.json"
    d = make(planner, ep.url, FileConnector(out), itl_ms=1000.0)  # concurrency is not SLA-bound here
    ep.good()
    tick(d)
    good_windows(planner, ep, d, 3, factor=1.0)
    first = json.loads(out.read_text())
    good_windows(planner, ep, d, 1, factor=1.0)
    assert json.loads(out.read_text())["time"] == first["time"]  # nothing material changed
    good_windows(planner, ep, d, 3, factor=1.5)
    second = json.loads(out.read_text())
    keys = ("tp", "method", "k", "max_num_seqs", "decode_replicas")
    assert [second[k] for k in keys] == [first[k] for k in keys]  # same configuration ...
    assert second["predicted_itl_ms"] > 1.2 * first["predicted_itl_ms"]  # ... but a new prediction: re-sent


def test_window_outside_the_measured_contexts_warns(planner: Planner, ep: Endpoint, caplog) -> None:
    d = make(planner, ep.url)
    ep.good()
    tick(d)
    t = Traffic(prompt=8000)
    serve_request(ep.reg, Traffic(prompt=8000, gap_s=gap_for_factor(planner, 1.0, t)))
    ep.good()
    with caplog.at_level(logging.WARNING, logger="planner.daemon"):
        tick(d)
    assert any("outside the measured [256, 1536]" in n for n in d.state.notes)
    assert "outside the measured" in caplog.text


def test_one_line_per_tick(planner: Planner, ep: Endpoint, caplog) -> None:
    d = make(planner, ep.url)
    ep.good()
    with caplog.at_level(logging.INFO, logger="planner.daemon"):
        tick(d)
        good_windows(planner, ep, d, 2, factor=1.3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tick ")]
    assert len(lines) == 3
    last = lines[-1]
    parts = ("ITL observed", "vs predicted", "factor 1.300", "acceptance 1.60 tok/step", "concurrency 4.0",
             "context 640")  # fmt: skip
    for part in parts:
        assert part in last, (part, last)


def test_inside_serve_a_failing_daemon_shows_in_healthz(
    planner: Planner, ep: Endpoint, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from planner.profile import save_profile

    save_profile(planner.profile, tmp_path / "syn.json")
    cfg = DaemonConfig(metrics_url=ep.url, itl_ms=30.0, isl=512, osl=256, interval_s=0.02,
                       tp=1, method="ngram", k=2, min_tokens=1)  # fmt: skip
    ep.with_sample(ITL_SUM, "NaN")
    with TestClient(create_app(tmp_path, daemon=cfg)) as client:
        deadline = time.monotonic() + 30
        while client.get("/correction").json()["profiles"]["syn"]["consecutive_failures"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get("/healthz").json()["correction"] == "stale: syn"
        corr = client.get("/correction").json()["profiles"]["syn"]
        assert corr["loop"] == "running" and "itl_sum is nan" in corr["last_error"]
        r = client.get("/plan", params={"itl_ms": 30, "isl": 512, "osl": 256, "corrected": "true"})
        assert r.status_code == 200, r.text
        serve_request(ep.reg, Traffic())
        ep.good()
        while client.get("/healthz").json()["correction"] != "live":
            assert time.monotonic() < deadline
            time.sleep(0.02)
