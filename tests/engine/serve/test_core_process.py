"""`engine serve` with its engine in a core process of its own: the same answers and counters as the
engine on a thread, errors from start-up, a dead core seen by clients, nothing left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from engine.engine_config import EngineConfig
from engine.errors import EngineError
from engine.llm_engine import LLMEngine
from engine.serve.app import app_for_engine
from engine.serve.core_process import CoreProcessEngine, app_for_core, wants_engine_process
from engine.serve.launcher import ServerThread
from engine.spec import SpecConfig

REPO = Path(__file__).resolve().parents[3]
K = 3
PROMPTS = ["abcabcabcabcabcabc", "hello hello hello hello", "xyxyxyxyxyxyxyxy", "the cat the cat the cat"]


def _config() -> EngineConfig:
    return EngineConfig(
        "tiny", max_num_seqs=16, num_gpu_blocks=256, spec=SpecConfig(method="ngram", k=K), seed=0
    )


def _completions(base_url: str) -> list[str]:
    c = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    ask = dict(model="tiny", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    plain = [c.completions.create(prompt=p, **ask).choices[0].text for p in PROMPTS]
    streamed = [
        "".join(ch.choices[0].text for ch in c.completions.create(prompt=p, stream=True, **ask))
        for p in PROMPTS
    ]
    assert streamed == plain
    return plain


def _metric(base_url: str, promtext, sample: str, **labels: str) -> float:
    return promtext.value(promtext.parse(httpx.get(base_url + "/metrics").text), sample, **labels)


def _wait_for(cond, timeout: float = 60.0) -> None:
    """Poll until ``cond()`` holds (a liveness bound, never a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def core_server():
    app = app_for_core(_config(), "tiny", log_level="warning")
    with ServerThread(app) as server:
        yield server, app.state.serve.async_engine


def test_same_text_and_counters_as_the_engine_on_a_thread(core_server, promtext) -> None:
    server, core = core_server
    in_process = LLMEngine(_config())
    with ServerThread(app_for_engine(in_process, "tiny", num_spec_tokens=K)) as reference:
        want = _completions(reference.base_url)
    assert _completions(server.base_url) == want

    base = server.base_url
    _wait_for(lambda: _metric(base, promtext, "vllm:num_requests_running") == 0)
    stats = in_process.spec_stats
    assert stats is not None and stats.num_drafts > 0
    # The core's counters crossed the process boundary as recorded events, one for one.
    assert _metric(base, promtext, "vllm:generation_tokens_total") == 2 * 24 * len(PROMPTS)
    assert _metric(base, promtext, "vllm:spec_decode_num_drafts_total") == stats.num_drafts
    assert _metric(base, promtext, "vllm:spec_decode_num_accepted_tokens_total") == stats.num_accepted_tokens
    assert _metric(base, promtext, "vllm:request_success_total", finished_reason="length") == 2 * len(PROMPTS)
    assert _metric(base, promtext, "vllm:time_to_first_token_seconds_count") == 2 * len(PROMPTS)
    assert _metric(base, promtext, "vllm:kv_cache_usage_perc") == 0.0


def test_a_rejected_request_is_a_400_and_the_core_keeps_serving(core_server) -> None:
    server, _ = core_server
    r = httpx.post(server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x" * 100_000})
    assert r.status_code == 400
    r = httpx.post(
        server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4}
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_start_up_error_names_the_problem() -> None:
    with pytest.raises(EngineError, match="no-such-model"):
        CoreProcessEngine.launch(EngineConfig("no-such-model"), log_level="warning")


def test_a_dead_core_is_a_503_not_a_hang() -> None:
    app = app_for_core(_config(), "tiny", log_level="warning")
    core = app.state.serve.async_engine
    with ServerThread(app) as server:
        assert httpx.get(server.base_url + "/health").status_code == 200
        core.kill()
        _wait_for(lambda: httpx.get(server.base_url + "/health").status_code == 503)
        r = httpx.post(server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "hi"})
        assert r.status_code == 503


def test_default_is_a_core_process_on_a_gpu_only() -> None:
    assert wants_engine_process(None, EngineConfig("tiny", device="cpu")) is False
    assert wants_engine_process(True, EngineConfig("tiny", device="cpu")) is True


def test_cli_with_engine_process_serves_and_leaves_no_process_behind() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", "tiny", "--port", "0", "--engine-process"]
    port = _free_port()
    cmd[cmd.index("0")] = str(port)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for(lambda: _up(port) or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        children = _children(proc.pid)
        assert children, "the engine core should be a child process of the server"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        _wait_for(lambda: not any(_alive(pid) for pid in children), timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc: field 4 of stat is the parent's pid)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
