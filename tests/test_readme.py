"""Every code block of README.md runs, in a form that fits a CPU machine, and shows what the README says.

- ``python`` blocks run as a script; a ``print(...)  # VALUE: why`` comment is the expected output line.
- ``bash`` blocks run line by line; ``console`` blocks run their ``$`` lines and the lines after a command
  are its expected output (``...`` elides). ``profiler``, ``planner`` and ``engine`` run as
  ``python -m <package>.cli`` from this checkout; a ``serve`` command starts in the background on a free
  port (the README's port is rewritten in the later commands) and is stopped at the end of the block.
- A ``json`` block is the answer of the first ``curl`` of the console block before it, abridged: every
  field it shows must equal the real answer (numbers to the precision shown).
- ``text`` blocks are synopses with placeholders, or sample output, and are not run (``SKIPPED_TEXT``).

Commands that cannot run here are listed in ``NOT_RUN`` or ``CPU_FORM`` with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CLIS = {"profiler", "planner", "engine"}

# Commands not run, by prefix, with the reason.
NOT_RUN = {
    "pip install": "installing is tested by tests/test_packaging.py (non-editable, fresh venv)",
    "pytest": "the whole suite: running it from inside itself would recurse",
}
# Commands run in another form on a machine without CUDA, with the reason.
CPU_FORM = {
    "engine bench --model vicuna-7b": (
        "engine bench --model tiny --batch 1,8 --context 512",
        "vicuna-7b needs ~27 GB in float32 on a CPU (it is a GPU command); engine bench refuses it by "
        "memory (tests/engine/test_memory_check.py); the same command runs on the tiny preset",
    ),
}
SKIPPED_TEXT = "synopsis with placeholders, or sample output of a noisy run: shown, not run"
SLOW_SECTIONS = ("Quickstart", "The engine")


@dataclass
class Block:
    index: int
    lang: str
    text: str
    section: str

    @property
    def id(self) -> str:
        return f"{self.index}-{self.lang}-{re.sub(r'[^a-z]+', '-', self.section.lower()).strip('-')}"


def parse_blocks(text: str) -> list[Block]:
    blocks, section = [], ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        m = re.match(r"^```(\w*)\s*$", line)
        if m:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            blocks.append(Block(len(blocks), m.group(1), "\n".join(lines[i + 1 : j]), section))
            i = j
        i += 1
    return blocks


BLOCKS = parse_blocks(README.read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined."""
    out, cur = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    return [line for line in out if line.strip()]


def _strip_comment(cmd: str) -> tuple[str, str]:
    """(command, trailing comment) split at a ``#`` outside quotes."""
    quote = None
    for i, ch in enumerate(cmd):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or cmd[i - 1] == " "):
            return cmd[:i].rstrip(), cmd[i + 1 :].strip()
    return cmd, ""


class Runner:
    """Runs one block's commands in a scratch directory that sees the repository's configs."""

    def __init__(self, tmp: Path) -> None:
        self.cwd = tmp
        (tmp / "configs").symlink_to(REPO / "configs")
        self.env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.servers: list[subprocess.Popen] = []
        self.ports: dict[str, str] = {}
        self.outputs: list[tuple[str, str]] = []

    def argv(self, cmd: str) -> list[str]:
        for old, new in self.ports.items():
            cmd = cmd.replace(f":{old}", f":{new}").replace(f"--port {old}", f"--port {new}")
        args = shlex.split(cmd)
        if args[0] in CLIS:
            args = [sys.executable, "-m", f"{args[0]}.cli", *args[1:]]
        return args

    def run(self, cmd: str, timeout: float = 600) -> tuple[int, str]:
        for prefix, reason in NOT_RUN.items():
            if cmd.startswith(prefix):
                self.outputs.append((cmd, f"(not run: {reason})"))
                return 0, ""
        for prefix, (replacement, _) in CPU_FORM.items():
            if cmd.startswith(prefix) and not _has_cuda():
                cmd = replacement
        if " serve " in f" {cmd} " and cmd.split()[0] in CLIS:
            return self.start_server(cmd)
        proc = subprocess.run(
            self.argv(cmd), cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        self.outputs.append((cmd, proc.stdout))
        return proc.returncode, proc.stdout + proc.stderr

    def start_server(self, cmd: str) -> tuple[int, str]:
        port = re.search(r"--port (\d+)", cmd)
        assert port, f"a serve command in the README names its port: {cmd}"
        self.ports[port.group(1)] = str(_free_port())
        log = (self.cwd / f"server-{len(self.servers)}.log").open("w")
        proc = subprocess.Popen(
            self.argv(cmd), cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.servers.append(proc)
        health = f"http://127.0.0.1:{self.ports[port.group(1)]}" + (
            "/healthz" if cmd.startswith("planner") else "/health"
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                if httpx.get(health).status_code == 200:
                    return 0, Path(log.name).read_text()
            except httpx.TransportError:
                time.sleep(0.3)
        raise AssertionError(f"{cmd}: not healthy within 300 s")

    def close(self) -> None:
        for proc in self.servers:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


@pytest.fixture
def runner(tmp_path: Path):
    r = Runner(tmp_path)
    yield r
    r.close()


def _commands(block: Block) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) in order."""
    if block.lang == "console":
        out: list[tuple[str, list[str]]] = []
        for line in _logical_lines(block.text):
            if line.startswith("$ "):
                out.append((line[2:].strip(), []))
            else:
                out[-1][1].append(line)
        return out
    cmds = []
    for line in _logical_lines(block.text):
        cmd, comment = _strip_comment(line.strip())
        for part in cmd.split(" && "):
            cmds.append((part.strip(), [comment[3:]] if comment.startswith("-> ") else []))
    return cmds


def _check_expected(cmd: str, out: str, expected: list[str]) -> None:
    got = [" ".join(line.split()) for line in out.splitlines()]
    for line in expected:
        if line.strip() in ("", "..."):
            continue
        want = " ".join(line.split())
        assert any(want in g for g in got), f"{cmd}: README shows {want!r}; the run printed:\n{out}"


def _params(lang: str):
    out = []
    for b in BLOCKS:
        if b.lang != lang:
            continue
        marks = [pytest.mark.slow] if b.section.startswith(SLOW_SECTIONS) else []
        out.append(pytest.param(b, id=b.id, marks=marks))
    return out


def test_every_block_has_a_known_language() -> None:
    langs = {b.lang for b in BLOCKS}
    assert langs <= {"bash", "console", "python", "json", "text"}, langs


@pytest.mark.parametrize("block", _params("python"))
def test_python_block(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block.text)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # ``print(x)  # VALUE: explanation``: VALUE is the line printed
    shown = [line.split("#")[-1] for line in block.text.splitlines() if line.startswith("print(")]
    expected = [c.split(":")[0].strip() for c in shown]
    assert proc.stdout.splitlines() == [e for e in expected if e], proc.stdout


@pytest.mark.parametrize("block", _params("bash") + _params("console"))
def test_shell_block(block: Block, runner: Runner) -> None:
    for cmd, expected in _commands(block):
        rc, out = runner.run(cmd)
        assert rc == 0, f"{cmd}: exit {rc}\n{out}"
        _check_expected(cmd, out, expected)
        if cmd.startswith("profiler sweep") and block.section == "Quickstart":
            sample = next(b for b in BLOCKS if b.lang == "text" and b.index > block.index)
            _check_expected(cmd, out, sample.text.splitlines()[:1])  # the headline, not noisy numbers


def _same(shown, real, path: str) -> None:
    if isinstance(shown, dict):
        assert isinstance(real, dict), path
        for key, value in shown.items():
            assert key in real, f"{path}.{key} missing from the real answer"
            _same(value, real[key], f"{path}.{key}")
    elif isinstance(shown, float):
        decimals = len(repr(shown).split(".")[1]) if "." in repr(shown) else 0
        assert abs(real - shown) <= 0.5 * 10**-decimals + 1e-12, f"{path}: README {shown}, real {real}"
    else:
        assert shown == real, f"{path}: README {shown!r}, real {real!r}"


@pytest.mark.parametrize("block", _params("json"))
def test_json_block_is_the_real_answer(block: Block, runner: Runner) -> None:
    console = next(b for b in reversed(BLOCKS[: block.index]) if b.lang == "console")
    answer = None
    for cmd, _ in _commands(console):
        rc, out = runner.run(cmd)
        assert rc == 0, f"{cmd}: exit {rc}\n{out}"
        if cmd.startswith("curl") and answer is None:
            answer = json.loads(out)
    _same(json.loads(block.text), answer, "answer")


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS if b.lang == "text"])
def test_text_block_is_not_run(block: Block) -> None:
    pytest.skip(SKIPPED_TEXT)
