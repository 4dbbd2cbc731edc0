"""The `engine` command: generate and bench on the tiny preset, errors as exit code 2."""

from __future__ import annotations

import pytest

from engine.cli import main


def test_generate_labels_random_weights(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["generate", "--model", "tiny", "--prompt", "hello", "--max-tokens", "5", "--device", "cpu"])
        == 0
    )
    err = capsys.readouterr().err
    assert "random weights" in err and "5 tokens" in err


def test_bench_prints_a_row_per_point(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--model", "tiny", "--device", "cpu", "--batch", "1,2", "--context", "32"]
    assert main([*argv, "--steps", "2", "--warmup", "0"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("1", "32"), ("2", "32")]
    assert all(float(r[4]) > 0 for r in rows)


def test_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", "no-such-model", "--prompt", "x", "--device", "cpu"]) == 2
    assert "no-such-model" in capsys.readouterr().err
