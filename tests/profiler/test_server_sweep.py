"""Server sweeps (http backend) against the fake OpenAI server: the server's own speculation and KV
capacity, the model path it was served from, truthful weights, and acceptance pooled over every point."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from profiler.backends import http as httpb
from profiler.cli import main
from profiler.grid import GridError, SweepConfig
from profiler.server_sweep import sweep_http

_spec = importlib.util.spec_from_file_location("fake_openai", Path(__file__).with_name("fake_openai.py"))
fake_openai = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_openai)  # type: ignore[union-attr]


def _cfg(url: str, **kw) -> SweepConfig:
    base = dict(model="tiny", backend="http", url=url, method=["ngram"], k=[4], concurrency=[1, 2],
                context=[32], max_tokens=9, requests_per_point=2, weights="random")  # fmt: skip
    return SweepConfig(**{**base, **kw})


def test_kv_capacity_served_model_and_every_points_acceptance(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    with fake_openai.FakeServer(tokens_per_chunk=3, chunk_delay_s=0.0, k=4, kv_blocks=1234) as srv:
        info = httpb.server_info(srv.url)
        assert (info.speculative_k, info.kv_blocks, info.block_size) == (4, 1234, 16)
        prof = sweep_http(_cfg(srv.url, prompt_lookup_max=4), out, resume=False, command="t", progress=False)
    meta = prof.metadata
    assert meta.kv_capacity_blocks_per_gpu == 1234 and meta.kv_capacity_blocks_by_tp == {1: 1234}
    assert meta.served_model == "/models/fake" and meta.weights == "random"
    assert [p.concurrency for p in prof.decode if p.ok] == [1, 2]
    [acc] = prof.acceptance
    assert acc.source.kind == "live" and acc.drafter_settings == {
        "prompt_lookup_min": 4,
        "prompt_lookup_max": 4,
    }
    # both points' windows are pooled: 2 + 2 requests of 9 tokens = 1 + 3 + 3 + 2 chunks, 3 drafted steps each
    assert acc.samples == 4 * 3
    assert "pooled over 2 point(s)" in acc.source.detail and "c=1 L=32" in acc.source.detail
    assert acc.tokens_per_step == pytest.approx(prof.decode[0].tokens_per_step)


def test_first_point_acceptance_is_written(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    with fake_openai.FakeServer(tokens_per_chunk=2, chunk_delay_s=0.0, k=4, kv_blocks=64) as srv:
        prof = sweep_http(_cfg(srv.url, concurrency=[1]), out, resume=False, command="t", progress=False)
    assert len(prof.acceptance) == 1 and prof.acceptance[0].samples > 0


def test_server_without_speculation_refuses_spec_labels(tmp_path: Path) -> None:
    with fake_openai.FakeServer(k=0, kv_blocks=64) as srv:
        with pytest.raises(GridError, match=r"runs no speculation .* asks for ngram k=4"):
            sweep_http(_cfg(srv.url), tmp_path / "p.json", resume=False, command="t", progress=False)
        prof = sweep_http(_cfg(srv.url, method=["none"], k=[0]), tmp_path / "q.json", resume=False,
                          command="t", progress=False)  # fmt: skip
    assert [p.method for p in prof.decode] == ["none", "none"] and prof.acceptance == []
    assert not (tmp_path / "p.json").exists()  # refused before any point


def test_k_mismatch_and_missing_kv_capacity_are_refused(tmp_path: Path, capsys) -> None:
    with fake_openai.FakeServer(k=4) as srv:
        with pytest.raises(GridError, match="speculates with k=4 .* asks for ngram k=2"):
            sweep_http(_cfg(srv.url, k=[2]), tmp_path / "p.json", resume=False, command="t", progress=False)
        with pytest.raises(GridError, match="field 'kv_blocks'.*--kv-blocks"):
            sweep_http(_cfg(srv.url), tmp_path / "p.json", resume=False, command="t", progress=False)
        prof = sweep_http(_cfg(srv.url, kv_blocks=500, concurrency=[1]), tmp_path / "p.json", resume=False,
                          command="t", progress=False)  # fmt: skip
        assert prof.metadata.kv_capacity_blocks_per_gpu == 500
        args = ["sweep", "--backend", "http", "--url", srv.url, "--model", "tiny", "--method", "ngram",
                "--k", "2", "--weights", "real", "--out", str(tmp_path / "r.json"), "--no-plots"]  # fmt: skip
        assert main(args) == 2
    assert "speculates with k=4" in capsys.readouterr().err


def test_http_weights_must_be_stated() -> None:
    with pytest.raises(GridError, match="field 'weights' is required for backend 'http'"):
        _cfg("http://127.0.0.1:1", weights=None)
