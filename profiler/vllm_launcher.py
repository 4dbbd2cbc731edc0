"""Start and stop a real ``vllm serve`` process: command line, health wait, clean stop.

Used by the profiler's ``vllm`` backend (one server per (tp, method, k)) and by the test fixture
``vllm_server``. The server runs in its own process group so stopping it also stops vLLM's engine-core
and worker processes; ``stop`` is safe to call twice and from a ``finally`` after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


class VllmLaunchError(RuntimeError):
    """The server exited or did not become healthy in time; the message quotes its log tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def speculative_config(
    method: str, k: int, *, draft_model: str | None = None, prompt_lookup_max: int = 4
) -> dict | None:
    """vLLM's ``--speculative-config`` for (method, k); ``None`` without speculation."""
    if method == "none" or k == 0:
        if method != "none" or k != 0:
            raise ValueError(f"method {method!r} with k={k}: k is 0 exactly when method is 'none'")
        return None
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": prompt_lookup_max}
    if method == "draft":
        if not draft_model:
            raise ValueError("method 'draft' needs draft_model (a Hugging Face id or directory)")
        return {"method": "draft_model", "model": draft_model, "num_speculative_tokens": k}
    if method in ("eagle", "eagle3", "medusa", "mtp"):
        if not draft_model:
            raise ValueError(f"method {method!r} needs draft_model (the head checkpoint)")
        return {"method": method, "model": draft_model, "num_speculative_tokens": k}
    raise ValueError(f"method must be one of none, ngram, draft, eagle, eagle3, medusa, mtp; got {method!r}")


@dataclass
class VllmServerSpec:
    """Everything that decides the ``vllm serve`` command line."""

    model: str
    python: str = "python"
    tp: int = 1
    method: str = "none"
    k: int = 0
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    draft_model: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def command(self, port: int) -> list[str]:
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        cmd += ["--host", self.host, "--port", str(port), "--tensor-parallel-size", str(self.tp)]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if self.max_num_seqs is not None:
            cmd += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        spec = speculative_config(self.method, self.k, draft_model=self.draft_model)
        if spec is not None:
            cmd += ["--speculative-config", json.dumps(spec, separators=(",", ":"))]
        return cmd + list(self.extra_args)


class VllmServer:
    """A running ``vllm serve``; use as a context manager or call ``start``/``stop``."""

    def __init__(
        self, spec: VllmServerSpec, *, log_path: str | os.PathLike[str], health_timeout_s: float = 900.0
    ):
        self.spec = spec
        self.port = spec.port or free_port()
        self.log_path = Path(log_path)
        self.health_timeout_s = health_timeout_s
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    @property
    def command_line(self) -> str:
        return shlex.join(self.spec.command(self.port))

    def start(self) -> str:
        """Launch and block until ``/health`` answers 200; returns the base URL."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.spec.env}
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {self.command_line}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.spec.command(self.port),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self.url

    def _wait_healthy(self, t0: float) -> None:
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise VllmLaunchError(
                    f"vllm exited with code {self.proc.returncode}; log tail:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            if time.monotonic() - t0 > self.health_timeout_s:
                raise VllmLaunchError(
                    f"vllm not healthy after {self.health_timeout_s:.0f} s; log tail:\n{self.log_tail()}"
                )
            time.sleep(1.0)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``grace_s``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # Workers may outlive the parent briefly; they share its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
