"""Sweep reliability: prefill resume, concurrent writers, foreign profiles, disk full, all-failed exits."""

from __future__ import annotations

import errno
import multiprocessing
import os
from pathlib import Path

import pytest

from common.metrics import summarize
from planner.profile import (
    DecodePoint,
    EngineInfo,
    Hardware,
    Metadata,
    ModelInfo,
    ModelShape,
    PrefillPoint,
    ProfileMismatchError,
    append_point,
    load_profile,
    now_utc,
)
from profiler.cli import main
from profiler.grid import SweepConfig
from profiler.report import describe
from profiler.sweep import sweep_engine

SHAPE = {"layers": 1, "hidden": 8, "heads": 1, "kv_heads": 1, "head_dim": 8, "vocab": 8, "params": 100}


class FakeBackend:
    """Stands in for EngineBackend: same interface, instant points, scripted failures."""

    calls: list[str] = []
    model_name = "tiny"
    fail_decode: str | None = None  # error text for every decode point
    interrupt_prefill = False

    def __init__(self, model: str, **_: object) -> None:
        self.model = model

    def configure(self, tp: int, method: str, k: int) -> None:
        FakeBackend.calls.append(f"configure {tp} {method} {k}")

    @property
    def info(self) -> dict:
        return {
            "model_info": {"name": FakeBackend.model_name, "shape": SHAPE, "weights": "random"},
            "kv_capacity_blocks": 100, "block_size": 16, "device_name": "cpu", "dtype": "float32",
        }  # fmt: skip

    def measure(self, spec, **_: object) -> DecodePoint:
        FakeBackend.calls.append(f"decode {spec.concurrency}")
        if FakeBackend.fail_decode:
            raise RuntimeError(FakeBackend.fail_decode)
        step = 1.0 + spec.concurrency
        return DecodePoint(
            tp=spec.tp, method=spec.method, k=spec.k, concurrency=spec.concurrency,
            context_len=spec.context_len, step_ms=step, tokens_per_step=1.0, itl_ms=summarize([step]),
            throughput_per_gpu=spec.concurrency / step, samples=1,
        )  # fmt: skip

    def measure_prefill(self, tp: int, n: int) -> PrefillPoint:
        if FakeBackend.interrupt_prefill:
            raise KeyboardInterrupt  # killed between the decode and the prefill points
        FakeBackend.calls.append(f"prefill {n}")
        return PrefillPoint(
            tp=tp, input_len=n, ttft_ms=float(n), prefill_tokens_per_s_per_gpu=1000.0, samples=1
        )

    def close(self) -> None:
        pass


@pytest.fixture
def fake_backend(monkeypatch: pytest.MonkeyPatch) -> type[FakeBackend]:
    import profiler.backends.engine as eb

    monkeypatch.setattr(eb, "EngineBackend", FakeBackend)
    FakeBackend.calls, FakeBackend.model_name = [], "tiny"
    FakeBackend.fail_decode, FakeBackend.interrupt_prefill = None, False
    return FakeBackend


def _cfg() -> SweepConfig:
    return SweepConfig(model="tiny", concurrency=[1, 2], context=[64], prefill_lens=[32, 64])


def _sweep_args(out: Path, *extra: str) -> list[str]:
    return ["sweep", "--model", "tiny", "--concurrency", "1,2", "--context", "64", "--out", str(out),
            "--no-progress", "--no-plots", *extra]  # fmt: skip


def test_resume_measures_prefill_missing_after_a_kill(tmp_path: Path, fake_backend) -> None:
    out = tmp_path / "p.json"
    fake_backend.interrupt_prefill = True
    with pytest.raises(KeyboardInterrupt):
        sweep_engine(_cfg(), out, resume=False, command="t", progress=False)
    assert len(load_profile(out).decode) == 2 and load_profile(out).prefill == []
    fake_backend.interrupt_prefill, fake_backend.calls = False, []
    prof = sweep_engine(_cfg(), out, resume=True, command="t", progress=False)
    assert sorted(p.input_len for p in prof.prefill) == [32, 64]
    assert not [c for c in fake_backend.calls if c.startswith("decode")]  # decode points were kept


def test_resume_into_a_profile_of_another_model_is_refused(tmp_path: Path, fake_backend, capsys) -> None:
    out = tmp_path / "p.json"
    fake_backend.model_name = "smollm2-135m"
    sweep_engine(_cfg(), out, resume=False, command="t", progress=False)
    before = out.read_text()
    fake_backend.model_name, fake_backend.calls = "tiny", []
    with pytest.raises(
        ProfileMismatchError, match="'smollm2-135m' \\(in the file\\) vs 'tiny' \\(this run\\)"
    ):
        sweep_engine(_cfg(), out, resume=True, command="t", progress=False)
    assert out.read_text() == before
    assert main(_sweep_args(out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "smollm2-135m" in err and "tiny" in err and "Traceback" not in err
    assert out.read_text() == before
    assert not [c for c in fake_backend.calls if c.startswith(("decode", "prefill"))]


def test_append_point_refuses_foreign_metadata(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    append_point(
        out, PrefillPoint(tp=1, input_len=8, ttft_ms=1.0, prefill_tokens_per_s_per_gpu=8.0), _meta("a")
    )
    with pytest.raises(ProfileMismatchError, match="model 'a'.*'b'"):
        append_point(
            out, PrefillPoint(tp=1, input_len=9, ttft_ms=1.0, prefill_tokens_per_s_per_gpu=9.0), _meta("b")
        )
    assert [p.input_len for p in load_profile(out).prefill] == [8]


def _meta(name: str = "m") -> Metadata:
    return Metadata(
        model=ModelInfo(name=name, shape=ModelShape(**SHAPE)), hardware=Hardware(gpu_name="cpu", gpu_count=1),
        engine=EngineInfo(name="t", version="0"), backend="engine", dtype="float32",
        block_size=16, kv_capacity_blocks_per_gpu=10, weights="random", source="measured",
        created_at=now_utc(), command="test",
    )  # fmt: skip


def _writer(out: str, first: int, n: int) -> None:
    for i in range(first, first + n):
        append_point(
            out, PrefillPoint(tp=1, input_len=i, ttft_ms=1.0, prefill_tokens_per_s_per_gpu=1.0), _meta()
        )


@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_writers_lose_nothing(tmp_path: Path, writers: int) -> None:
    out = tmp_path / "p.json"
    n = 40
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(out), 1 + w * n, n)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert sorted(p.input_len for p in load_profile(out).prefill) == list(range(1, 1 + writers * n))


def test_disk_full_is_one_line_non_zero_and_keeps_finished_points(
    tmp_path: Path, fake_backend, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "p.json"
    real_fsync, writes = os.fsync, []

    def fsync(fd: int) -> None:
        writes.append(fd)
        if len(writes) > 1:  # the first point lands, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(_sweep_args(out)) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "No space" in line] == [err.strip().splitlines()[-1]]
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert [p.concurrency for p in load_profile(out).decode] == [1]
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def test_sweep_where_every_point_failed_exits_non_zero_with_the_cause_in_full(
    tmp_path: Path, fake_backend, capsys
) -> None:
    out = tmp_path / "p.json"
    log_tail = "\n".join(f"INFO line {i} of the server log " + "x" * 40 for i in range(60))
    fake_backend.fail_decode = (
        f"vLLM exited with code 1 before becoming healthy; log:\n{log_tail}\n"
        "ModuleNotFoundError: No module named 'vllm'"
    )
    assert main(_sweep_args(out)) == 1
    err = capsys.readouterr().err
    assert "every decode point failed" in err and "No module named 'vllm'" in err
    assert "before becoming healthy" in err
    assert all("No module named 'vllm'" in p.error for p in load_profile(out).decode)


def test_vllm_backend_without_vllm_fails_before_any_point(tmp_path: Path, capsys) -> None:
    import sys

    out = str(tmp_path / "v.json")
    args = ["sweep", "--backend", "vllm", "--model", "facebook/opt-125m", "--vllm-python", sys.executable,
            "--concurrency", "1", "--context", "64", "--out", out, "--no-progress"]  # fmt: skip
    try:
        import vllm  # noqa: F401

        pytest.skip("this interpreter has vllm")
    except ImportError:
        pass
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot import vllm" in err and "No module named 'vllm'" in err
    assert not list(tmp_path.iterdir())


def test_failed_rows_do_not_widen_the_table(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    for c in (1, 2):
        step = 1.0 + c
        append_point(out, DecodePoint(
            tp=1, method="none", k=0, concurrency=c, context_len=64, step_ms=step, tokens_per_step=1.0,
            itl_ms=summarize([step]), throughput_per_gpu=c / step, samples=1), _meta())  # fmt: skip
    narrow = describe(load_profile(out))
    long_error = "RuntimeError: vLLM exited before becoming healthy; " + "y" * 400
    append_point(out, DecodePoint(tp=1, method="none", k=0, concurrency=4, context_len=64, error=long_error))
    wide = describe(load_profile(out))
    header = next(line for line in narrow.splitlines() if line.lstrip().startswith("tp"))
    assert next(line for line in wide.splitlines() if line.lstrip().startswith("tp")) == header
    assert "FAILED" in wide and "c=4 L=64: RuntimeError: vLLM exited" in wide
