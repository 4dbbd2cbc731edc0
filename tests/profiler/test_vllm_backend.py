"""The vllm backend: the `vllm serve` command it builds, its server lifecycle, and a real vLLM point.

Lifecycle tests run a stand-in ``vllm.entrypoints.openai.api_server`` module (on PYTHONPATH) that
spawns a child process, answers ``/health`` and ignores nothing: stop() must take the whole process
group down. The integration test measures the session's real vLLM (fixture ``vllm_server``: SmolLM2,
ngram k=4), which that fixture starts and stops through this same module.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from planner.profile import Acceptance, DecodePoint
from profiler.backends.vllm import VllmLaunch, VllmServer, VllmServerError, running_server

FAKE_SERVER = textwrap.dedent(
    """
    import http.server, os, subprocess, sys, time
    port = int(sys.argv[sys.argv.index("--port") + 1])
    mode = os.environ.get("FAKE_VLLM_MODE", "ok")
    # A child in the same process group, like vLLM's engine-core process.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(os.environ["FAKE_VLLM_PIDS"], "w").write(f"{os.getpid()} {child.pid}")
    print("fake vllm argv:", sys.argv[1:], flush=True)
    if mode == "crash":
        print("CUDA out of memory (fake)", flush=True)
        sys.exit(3)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 200 if mode == "ok" else 503
            self.send_response(code); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a):
            pass
    time.sleep(0.3)
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "fakepkg" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(FAKE_SERVER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fakepkg"))
    monkeypatch.setenv("FAKE_VLLM_PIDS", str(tmp_path / "pids"))
    return tmp_path / "pids"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def _wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_command_is_the_vllm_serve_equivalent() -> None:
    launch = VllmLaunch(model="m", tp=2, method="ngram", k=3, max_num_seqs=64, max_model_len=4096,
                        python="/v/bin/python", port=8123)  # fmt: skip
    argv = launch.command()
    assert argv[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    opt = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert opt("--model") == "m" and opt("--port") == "8123" and opt("--tensor-parallel-size") == "2"
    assert opt("--max-num-seqs") == "64" and opt("--max-model-len") == "4096"
    spec = json.loads(opt("--speculative-config"))
    # both lookup bounds stated, resolved as vLLM would (5..5 when neither is given)
    assert spec == {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_min": 5,
        "prompt_lookup_max": 5,
    }
    assert launch.drafter_settings() == {"prompt_lookup_min": 5, "prompt_lookup_max": 5}
    only_max = VllmLaunch(model="m", method="ngram", k=3, prompt_lookup_max=4, python="p")
    assert only_max.speculative_config()["prompt_lookup_min"] == 4
    line = launch.vllm_serve_line()
    assert line.startswith("vllm serve m --host 127.0.0.1 --port 8123 --tensor-parallel-size 2")
    assert shlex.split(line)[-1] == opt("--speculative-config")

    draft = VllmLaunch(model="big", method="draft", k=5, draft_model="small", python="p")
    assert draft.speculative_config() == {
        "method": "draft_model",
        "num_speculative_tokens": 5,
        "model": "small",
    }
    plain = VllmLaunch(model="m", python="p").command()
    assert "--speculative-config" not in plain and "--max-num-seqs" not in plain


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "ngram", "k": 0}, "k is 0 exactly when method is 'none'"),
        ({"method": "none", "k": 2}, "k is 0 exactly when method is 'none'"),
        ({"method": "lookahead", "k": 2}, "method must be one of"),
        ({"method": "draft", "k": 2}, "needs draft_model"),
        ({"tp": 0}, "tp must be >= 1, got 0"),
        ({"max_num_seqs": 0}, "max_num_seqs must be >= 1, got 0"),
    ],
)
def test_bad_launch_names_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VllmLaunch(model="m", python="p", **kwargs)


def test_start_health_and_stop_take_the_process_group_down(fake_vllm: Path, tmp_path: Path) -> None:
    launch = VllmLaunch(model="m", method="ngram", k=2, python=sys.executable)
    with running_server(launch, timeout_s=60, log_path=tmp_path / "s.log") as server:
        parent, child = map(int, fake_vllm.read_text().split())
        assert _alive(parent) and _alive(child)
        assert server.base_url.endswith(f":{server.port}")
    assert _wait_gone(parent) and _wait_gone(child)
    log = (tmp_path / "s.log").read_text()
    assert log.startswith("# ") and '"num_speculative_tokens":2' in log  # the command is logged first


def test_interrupt_still_stops_the_server(fake_vllm: Path, tmp_path: Path) -> None:
    launch = VllmLaunch(model="m", python=sys.executable)
    with pytest.raises(KeyboardInterrupt), running_server(launch, timeout_s=60, log_path=tmp_path / "s.log"):
        raise KeyboardInterrupt  # Ctrl-C in the middle of a point
    parent, child = map(int, fake_vllm.read_text().split())
    assert _wait_gone(parent) and _wait_gone(child)


def test_crash_before_health_reports_the_log_tail(
    fake_vllm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "crash")
    server = VllmServer(VllmLaunch(model="m", python=sys.executable), log_path=tmp_path / "s.log")
    server.start()
    try:
        with pytest.raises(VllmServerError, match=r"(?s)exited with code 3.*CUDA out of memory \(fake\)"):
            server.wait_healthy(60)
    finally:
        server.stop()
    _, child = map(int, fake_vllm.read_text().split())
    assert _wait_gone(child)  # the orphaned child of the crashed leader is killed too


def test_unhealthy_server_times_out(fake_vllm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "sick")
    launch = VllmLaunch(model="m", python=sys.executable)
    with (
        pytest.raises(VllmServerError, match="did not answer /health within 2 s"),
        running_server(launch, timeout_s=2, log_path=tmp_path / "s.log"),
    ):
        pass
    parent, child = map(int, fake_vllm.read_text().split())
    assert _wait_gone(parent) and _wait_gone(child)


def test_sweep_records_a_config_that_cannot_start(
    fake_vllm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from profiler.grid import SweepConfig
    from profiler.server_sweep import sweep_vllm

    monkeypatch.setenv("FAKE_VLLM_MODE", "crash")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    cfg = SweepConfig(model=str(model), backend="vllm", method=["ngram"], k=[2], concurrency=[1, 2],
                      context=[16], vllm_python=sys.executable)  # fmt: skip
    profile = sweep_vllm(cfg, tmp_path / "p.json", resume=False, command="test", progress=False)
    assert [p.key for p in profile.decode] == [(1, "ngram", 2, 1, 16, 1.0), (1, "ngram", 2, 2, 16, 1.0)]
    assert all(not p.ok and "exited with code 3" in p.error for p in profile.decode)
    log = (tmp_path / "p-vllm-logs" / "tp1-ngram-k2.log").read_text()
    assert "--max-num-seqs 2" in log and '"num_speculative_tokens":2' in log


TINY_CONFIG = {
    "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "vocab_size": 512, "tie_word_embeddings": True,
}  # fmt: skip


@pytest.mark.vllm
@pytest.mark.slow
def test_real_vllm_sweep_points_with_live_acceptance(
    vllm_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep over the session's real vLLM (SmolLM2, ngram k=4): the http path the vllm backend runs.

    The prompts repeat a pattern the model continues, so prompt lookup finds 4-gram matches and the
    window is sure to hold drafts (Spec-Bench questions at 24 output tokens may hold none).
    """
    from profiler import server_sweep
    from profiler.grid import SweepConfig
    from profiler.server_sweep import sweep_http

    patterns = ["1 2 3 4 5 6 7 8 ", "red green blue red green blue ", "one, two, three, one, two, three, "]
    monkeypatch.setattr(
        server_sweep, "prompts_of_length",
        lambda n, approx_tokens, path=None: [f"Continue: {patterns[i % 3] * 8}" for i in range(n)],
    )  # fmt: skip

    model = Path(__file__).resolve().parents[2] / "build" / "smollm2-hf"  # the fixture's model
    cfg = SweepConfig(
        model=str(model), backend="http", url=vllm_server, method=["ngram"], k=[4], concurrency=[1, 2],
        context=[128], max_tokens=32, requests_per_point=4, weights="real", prompt_lookup_max=4,
    )  # fmt: skip
    profile = sweep_http(cfg, tmp_path / "p.json", resume=False, command="test", progress=False)
    assert profile.metadata.backend == "http" and profile.metadata.weights == "real"
    # the server's KV capacity and model path, read from vLLM itself
    assert profile.metadata.kv_capacity_blocks_per_gpu > 0
    assert profile.metadata.served_model == str(model.relative_to(model.parents[1]))
    assert [p.key for p in profile.decode] == [(1, "ngram", 4, 1, 128, 1.0), (1, "ngram", 4, 2, 128, 1.0)]
    for point in profile.decode:
        DecodePoint.model_validate(point.model_dump())
        assert point.ok and point.samples == 4
        assert point.itl_ms.p99 >= point.itl_ms.p50 > 0 and point.throughput_per_gpu > 0
        assert 1.0 <= point.tokens_per_step <= 5.0
    acc = profile.acceptance_for("ngram", 4)
    assert isinstance(acc, Acceptance) and acc.source.kind == "live" and len(acc.accepted_per_pos) == 4
    assert 0.0 < acc.draft_coverage <= 1.0
    assert acc.tokens_per_step <= acc.tokens_per_draft
    # every point's window is pooled into the (method, k) entry, the first point's included
    assert "pooled over 2 point(s)" in (acc.source.detail or "")
    assert acc.drafter_settings == {"prompt_lookup_min": 4, "prompt_lookup_max": 4}
    lo, hi = sorted(p.tokens_per_step for p in profile.decode)
    assert lo - 1e-9 <= acc.tokens_per_step <= hi + 1e-9
    assert httpx.get(f"{vllm_server}/health", timeout=30).status_code == 200
