"""The engine's KV admission follows kvbm.capacity's "engine" rule: an impossible request is refused
with the numbers, none blocks the queue, and preemption starts exactly where the rule says."""

from __future__ import annotations

import logging

import httpx
import pytest

from benchmarks.kv_capacity_engine import closed_loop, make_engine, measured_acceptance
from engine.engine_config import EngineConfig
from engine.errors import RequestError
from engine.llm_engine import LLMEngine
from engine.request import Request
from engine.sampling import SamplingParams
from engine.serve.app import app_for_engine
from engine.serve.launcher import ServerThread
from kvbm import capacity


def tiny_pool() -> LLMEngine:
    """8 blocks of 16 = 128 tokens of KV while max_model_len is 1024 (accepted, with a warning)."""
    return LLMEngine(
        EngineConfig(
            "tiny", device="cpu", num_gpu_blocks=8, block_size=16, max_model_len=1024, cuda_graphs=False
        )
    )


def test_a_request_the_pool_can_never_hold_is_refused_with_the_numbers() -> None:
    engine = tiny_pool()  # 128 tokens of KV, max_model_len accepted
    with pytest.raises(
        RequestError, match=r"needs 199 KV slots \(13 KV blocks of 16\).*holds 8 blocks \(128 tokens\)"
    ):
        engine.add_request("big", [256] * 100, SamplingParams(max_tokens=100, ignore_eos=True))
    with pytest.raises(RequestError, match="at most 29 fits"):
        engine.add_request("big", [256] * 100, SamplingParams(max_tokens=30))
    engine.add_request("ok", [256] * 100, SamplingParams(max_tokens=29, ignore_eos=True))  # 128 slots
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    assert [(o.request_id, len(o.token_ids)) for o in outs] == [("ok", 29)]
    assert engine.scheduler.num_preemptions == 0


def test_start_warns_when_the_pool_is_smaller_than_max_model_len(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="engine"):
        tiny_pool()
    assert "the KV pool holds 128 tokens (8 blocks of 16), fewer than max_model_len=1024" in caplog.text


def test_serve_answers_400_naming_the_numbers_and_keeps_serving() -> None:
    engine = tiny_pool()
    with ServerThread(app_for_engine(engine, "tiny")) as server:
        url = server.base_url + "/v1/completions"
        body = {"model": "tiny", "prompt": [256] * 100, "max_tokens": 100, "ignore_eos": True}
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 400, r.text
        assert "13 KV blocks of 16" in r.text and "8 blocks (128 tokens)" in r.text
        r = httpx.post(url, json={**body, "max_tokens": 8}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_a_request_too_big_to_run_alone_never_blocks_the_queue() -> None:
    """One that slipped past admission (added to the scheduler directly) ends as 'length'; the next runs.
    Before the fix it preempted itself at every step and held the head of the queue forever."""
    engine = tiny_pool()
    engine.scheduler.add(Request("stuck", [256] * 100, SamplingParams(max_tokens=100, ignore_eos=True), 0.0))
    engine.add_request("next", [256] * 20, SamplingParams(max_tokens=10, ignore_eos=True))
    done = {}
    for _ in range(200):
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
        if not engine.has_unfinished():
            break
    assert set(done) == {"stuck", "next"}
    assert done["stuck"].finish_reason == "length" and len(done["stuck"].token_ids) < 100
    assert len(done["next"].token_ids) == 10
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


# bs 8, 40 blocks: isl + osl - 1 = 24 | 25 | 32 | 33 slots -> 3 | 4 | 4 | 5 blocks per sequence
@pytest.mark.parametrize(("isl", "osl"), [(10, 15), (10, 16), (10, 23), (10, 24)])
def test_without_speculation_preemption_starts_exactly_at_the_rule(isl: int, osl: int) -> None:
    bound = capacity.static_bound("engine", "none", 0, 40, isl + osl, 8)
    assert closed_loop(make_engine(40, 8), bound.max_concurrency, 1, isl, osl) == 0
    assert closed_loop(make_engine(40, 8), bound.max_concurrency + 1, 1, isl, osl) > 0


@pytest.mark.slow
@pytest.mark.parametrize("k", [4, 8])
def test_ngram_onset_is_predicted_within_two_sequences(k: int) -> None:
    """Coverage and acceptance measured at low concurrency predict where a closed loop first preempts."""
    blocks, bs, isl, osl, waves = 40, 8, 10, 15, 3
    calib = make_engine(blocks, bs, k)
    assert closed_loop(calib, 3, waves, isl, osl) == 0
    coverage, acc = measured_acceptance(calib, k)
    pred = capacity.dynamic_bound("engine", blocks, bs, isl, osl, k, coverage, acc, waves=waves)
    preempting = [
        c
        for c in range(pred.onset - 2, pred.onset + 3)
        if closed_loop(make_engine(blocks, bs, k), c, waves, isl, osl)
    ]
    assert preempting, f"no preemption up to {pred.onset + 2} (predicted onset {pred.onset})"
    assert abs(min(preempting) - pred.onset) <= 2
