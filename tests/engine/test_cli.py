"""The engine CLI end to end on the tiny preset (random weights are labelled)."""

from __future__ import annotations

import pytest

from engine.cli import build_parser, main


def test_generate_labels_random_weights(capsys):
    assert (
        main(["generate", "--model", "tiny", "--device", "cpu", "--prompt", "hi", "--max-tokens", "4"]) == 0
    )
    err = capsys.readouterr().err
    assert "random weights" in err


def test_bench_prints_a_table_and_skips_points_that_do_not_fit(capsys):
    argv = [
        "bench",
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--batch",
        "1,2",
        "--context",
        "32",
        "--steps",
        "2",
    ]
    assert main([*argv, "--num-blocks", "8"]) == 0
    out = capsys.readouterr().out
    assert "random weights" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert [r[:2] for r in rows] == [["1", "32"], ["2", "32"]]
    assert (
        main(
            [
                "bench",
                "--model",
                "tiny",
                "--device",
                "cpu",
                "--batch",
                "64",
                "--context",
                "512",
                "--num-blocks",
                "8",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    assert "skipped" in capsys.readouterr().out


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--model", "tiny", "--batch", "0"])
    assert main(["generate", "--model", "no-such-model", "--prompt", "x"]) == 2
    assert "no such preset" in capsys.readouterr().err


def test_serve_subcommand_is_registered():
    args = build_parser().parse_args(["serve", "--model", "tiny"])
    assert args.command == "serve"
