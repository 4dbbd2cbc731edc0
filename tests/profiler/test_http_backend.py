"""http backend: closed-loop load, usage-based token counts, metric definitions, counter deltas.

Servers: ``fake_openai.FakeServer`` (scripted multi-token chunks and counters), a tokenizer-fallback
server without ``usage``, our ``engine serve`` on the tiny model (with and without ngram speculation),
and the real vLLM of the ``vllm_server`` fixture (SmolLM2, ngram k=4).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from common import metrics as md
from engine.serve.app import app_for_engine
from engine.serve.launcher import ServerThread
from planner.profile import DecodePoint
from profiler.backends import http as httpb
from profiler.grid import PointSpec
from profiler.loadgen import closed_loop
from profiler.prompts import SPEC_BENCH

REPO = Path(__file__).resolve().parents[2]

_spec = importlib.util.spec_from_file_location("fake_openai", Path(__file__).with_name("fake_openai.py"))
fake_openai = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_openai)  # type: ignore[union-attr]


def test_closed_loop_gives_each_request_its_own_output_length() -> None:
    with fake_openai.FakeServer(tokens_per_chunk=1, chunk_delay_s=0.001) as srv:
        res = httpb.run_load(srv.url, "fake", ["hi"], concurrency=2, num_requests=5, max_tokens=[3, 8, 5])
    assert sorted(r.output_tokens for r in res.records) == [3, 3, 5, 8, 8]  # lengths cycle over requests
    with pytest.raises(ValueError, match="max_tokens"):
        httpb.run_load("http://127.0.0.1:1", "m", ["x"], concurrency=1, max_tokens=[4, 0])


def test_closed_loop_counts_tokens_from_usage_and_computes_itl() -> None:
    with fake_openai.FakeServer(tokens_per_chunk=3, chunk_delay_s=0.003) as srv:
        res = httpb.run_load(srv.url, "fake", ["hi"], concurrency=3, num_requests=6, max_tokens=13)
        assert srv.requests == 6
    assert len(res.records) == 6 and all(r.error is None for r in res.records)
    # 13 tokens arrive as 1 + 3 + 3 + 3 + 3: five chunks, but usage says 13 tokens.
    for r in res.records:
        assert r.token_count_source == "usage"
        assert r.output_tokens == 13
        assert len(r.chunk_times) == 5
        assert r.first <= r.last and r.send <= r.first
    itl = res.itl_ms()
    expect = [(r.last - r.first) / 12 * 1000 for r in res.records]
    assert itl == pytest.approx(expect)
    # chunk gaps are reported apart from ITL: 4 gaps per request spanning first..last chunk
    gaps = res.chunk_gaps_ms()
    assert len(gaps) == 6 * 4
    assert sum(gaps) == pytest.approx(sum((r.last - r.first) * 1000 for r in res.records))
    assert res.output_tokens() == 78


def test_counter_deltas_give_coverage_and_acceptance() -> None:
    with fake_openai.FakeServer(tokens_per_chunk=3, chunk_delay_s=0.0, k=4) as srv:
        httpb.run_load(
            srv.url, "fake", ["warm"], concurrency=1, num_requests=1, max_tokens=4
        )  # counters != 0
        res = httpb.run_load(srv.url, "fake", ["hi"], concurrency=2, num_requests=4, max_tokens=7)
    c = res.counters
    assert c is not None
    # per request: first token from "prefill", then 3 + 3 tokens from two drafted steps, 2 accepted each
    assert (c.drafts, c.accepted, c.generation_tokens, c.first_tokens) == (8, 16, 28, 4)
    assert c.decode_steps == 28 - 16 - 4
    assert c.draft_coverage == 1.0
    assert c.acceptance_per_pos == [1.0, 1.0, 0.0, 0.0]
    assert c.tokens_per_step == pytest.approx(3.0)


def test_decode_point_from_load_and_failed_requests() -> None:
    spec = PointSpec(tp=1, method="ngram", k=4, concurrency=2, context_len=64)
    with fake_openai.FakeServer(tokens_per_chunk=2, chunk_delay_s=0.002, fail_every=2) as srv:
        res = httpb.run_load(srv.url, "fake", ["hi"], concurrency=2, num_requests=4, max_tokens=9)
    failed = [r for r in res.records if r.error]
    assert len(failed) == 2 and all("HTTP 500" in r.error for r in failed)
    point = httpb.to_decode_point(spec, res, gpus=1)
    assert point.ok and point.samples == 2
    assert point.tokens_per_step == pytest.approx(res.counters.tokens_per_step)
    assert point.step_ms == pytest.approx(point.itl_ms.mean * point.tokens_per_step)
    w = res.steady  # throughput over the span both surviving requests decoded, not the whole run
    assert w is not None and 0 < w.output_tokens <= 16 and w.duration_s <= res.window_s
    assert point.throughput_per_gpu == pytest.approx(w.output_tokens / w.duration_s)


def test_all_requests_failing_gives_an_error_point() -> None:
    spec = PointSpec(tp=1, method="none", k=0, concurrency=1, context_len=64)
    with fake_openai.FakeServer(fail_every=1) as srv:
        res = httpb.run_load(srv.url, "fake", ["hi"], concurrency=1, num_requests=2, max_tokens=4)
    point = httpb.to_decode_point(spec, res, gpus=1)
    assert not point.ok and "2/2 requests failed" in point.error and "HTTP 500" in point.error


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        httpb.run_load("http://127.0.0.1:1", "m", ["x"], concurrency=0)
    with pytest.raises(ValueError, match="prompts"):
        httpb.run_load("http://127.0.0.1:1", "m", [], concurrency=1)


# Chunks of a speculating server: one chunk per engine step, several tokens in some of them.
SCRIPT = ["Hello", " world, how", " are", " you doing", " today"]


def scripted_app(with_usage: bool, in_flight: list[int], peak: list[int]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and with_usage

        async def events() -> AsyncIterator[bytes]:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            try:
                for i, text in enumerate(SCRIPT):
                    await asyncio.sleep(0.002)
                    choice = {"index": 0, "text": text, "finish_reason": "length" if i == 4 else None}
                    yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
                if include_usage:
                    usage = {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}
                    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:
                in_flight[0] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.mark.parametrize("with_usage", [True, False])
def test_token_count_falls_back_to_tokenizer_then_chunks(with_usage: bool) -> None:
    in_flight, peak = [0], [0]
    words = lambda text: len(text.split())  # noqa: E731 - a stand-in tokenizer: one token per word
    with ServerThread(scripted_app(with_usage, in_flight, peak)) as server:
        run = asyncio.run(
            closed_loop(server.base_url, "m", ["p"], concurrency=3, num_requests=7, max_tokens=9,
                        count_tokens=words)
        )  # fmt: skip
        no_tok = asyncio.run(
            closed_loop(server.base_url, "m", ["p"], concurrency=2, num_requests=2, max_tokens=9)
        )
    assert len(run.records) == 7 and all(r.ok for r in run.records)
    assert peak[0] == 3  # closed loop: exactly `concurrency` requests in flight, never more
    for r in run.records:
        assert len(r.chunk_times) == len(SCRIPT)
        assert r.first == r.chunk_times[0] and r.last == r.chunk_times[-1]
        assert r.text == "".join(SCRIPT) and r.finish_reason == "length"
        if with_usage:
            assert (r.token_count_source, r.output_tokens, r.prompt_tokens) == ("usage", 9, 3)
        else:
            assert (r.token_count_source, r.output_tokens) == ("tokenizer", words("".join(SCRIPT)))
    expected_no_tok = ("usage", 9) if with_usage else ("chunks", len(SCRIPT))
    assert all((r.token_count_source, r.output_tokens) == expected_no_tok for r in no_tok.records)

    result = httpb.LoadResult(run.records, run.window_s, None)
    r0 = run.records[0]
    assert result.itl_ms()[0] == pytest.approx(1000 * (r0.last - r0.first) / (r0.output_tokens - 1))
    assert result.tokens_per_chunk() == pytest.approx((r0.output_tokens - 1) / (len(SCRIPT) - 1))
    # A speculating server without counters: tokens per step fall back to tokens per chunk.
    point = httpb.to_decode_point(PointSpec(1, "ngram", 4, 3, 16), result, gpus=2)
    assert point.tokens_per_step == pytest.approx(result.tokens_per_chunk())
    w = result.steady
    assert point.throughput_per_gpu == pytest.approx(w.output_tokens / w.duration_s / 2)


def _prompts(n: int) -> list[str]:
    lines = SPEC_BENCH.read_text().splitlines()[:n] if SPEC_BENCH.is_file() else []
    return [json.loads(x)["turns"][0] for x in lines] or ["Repeat: a b c a b c a b c"]


def _raw_counters(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            name = s.name + (f"[{s.labels['position']}]" if "position" in s.labels else "")
            out[name] = out.get(name, 0.0) + s.value
    return out


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 3])
def test_engine_serve_tiny(k: int) -> None:
    from engine.engine_config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.spec import SpecConfig

    spec_cfg = SpecConfig(method="ngram", k=k) if k else None
    engine = LLMEngine(EngineConfig("tiny", max_num_seqs=8, num_gpu_blocks=256, spec=spec_cfg, seed=0))
    with ServerThread(app_for_engine(engine, "tiny", num_spec_tokens=k)) as server:
        url = server.base_url
        assert httpb.served_model_name(url) == "tiny"
        before = _raw_counters(url)
        result = httpb.run_load(url, "tiny", _prompts(4), concurrency=4, num_requests=8, max_tokens=12)
        after = _raw_counters(url)
    delta = lambda n: after.get(n, 0.0) - before.get(n, 0.0)  # noqa: E731
    assert len(result.ok) == 8
    assert all(r.token_count_source == "usage" and r.output_tokens == 12 for r in result.ok)
    assert result.output_tokens() == delta("vllm:generation_tokens_total") == 96
    spec = PointSpec(1, "ngram" if k else "none", k, 4, 64)
    point = httpb.to_decode_point(spec, result, gpus=1)
    DecodePoint.model_validate(point.model_dump())
    assert point.ok and point.samples == 8
    assert point.itl_ms.mean == pytest.approx(sum(result.itl_ms()) / 8)
    assert point.itl_ms.p90 == pytest.approx(md.percentile(result.itl_ms(), 90))
    w = result.steady  # throughput over the window in which all 4 were in flight, not the whole run
    assert w is not None and 0 < w.duration_s <= result.window_s and 0 < w.output_tokens <= 96
    assert point.throughput_per_gpu == pytest.approx(w.output_tokens / w.duration_s)
    if not k:
        assert result.counters is None or result.counters.drafts == 0
        assert point.tokens_per_step == 1.0
        return
    c = result.counters
    assert c is not None and c.first_tokens == 8 and c.generation_tokens == 96
    assert c.drafts == delta("vllm:spec_decode_num_drafts_total")
    assert c.accepted == delta("vllm:spec_decode_num_accepted_tokens_total") == sum(c.accepted_per_pos)
    assert c.decode_steps == 96 - c.accepted - 8
    assert point.tokens_per_step == pytest.approx(1 + c.accepted / c.decode_steps)
    acc = httpb.to_acceptance(spec, result, model="tiny")
    if c.drafts:
        assert acc is not None and len(acc.accepted_per_pos) == 3
        assert acc.tokens_per_step == pytest.approx(point.tokens_per_step)


@pytest.mark.vllm
@pytest.mark.slow
def test_real_vllm_point_with_live_acceptance(vllm_server: str) -> None:
    url = vllm_server
    model = httpb.served_model_name(url)
    before = _raw_counters(url)
    result = httpb.run_load(url, model, _prompts(4), concurrency=2, num_requests=4, max_tokens=32)
    after = _raw_counters(url)
    delta = lambda n: after.get(n, 0.0) - before.get(n, 0.0)  # noqa: E731
    assert len(result.ok) == 4
    assert all(r.token_count_source == "usage" and r.output_tokens == 32 for r in result.ok)
    c = result.counters
    assert c is not None and len(c.accepted_per_pos) == 4  # the fixture runs ngram with k=4
    assert c.generation_tokens == delta("vllm:generation_tokens_total") == result.output_tokens() == 128
    assert c.first_tokens == 4
    assert c.accepted == sum(c.accepted_per_pos) == delta("vllm:spec_decode_num_accepted_tokens_total")
    assert c.decode_steps == 128 - c.accepted - 4
    spec = PointSpec(1, "ngram", 4, 2, 256)
    point = httpb.to_decode_point(spec, result, gpus=1)
    assert point.ok and point.tokens_per_step == pytest.approx(1 + c.accepted / c.decode_steps)
    # Under speculation a chunk can carry several tokens: chunks never outnumber tokens.
    assert all(len(r.chunk_times) <= r.output_tokens for r in result.ok)
    acc = httpb.to_acceptance(spec, result, model="smollm2-135m")
    if c.drafts:
        assert acc is not None and acc.source.kind == "live" and len(acc.accepted_per_pos) == 4
        assert acc.accepted_per_pos == pytest.approx([n / c.drafts for n in c.accepted_per_pos])


def _words(text: str) -> int:
    return len(text.split()) + 1  # words + BOS


def _mock_server(
    monkeypatch: pytest.MonkeyPatch, *, tokenize: bool, count=_words, limit: int = 400
) -> list[str]:
    """httpx.Client in the http backend talks to a handler: ``count(prompt)`` tokens, > ``limit`` is too
    long (HTTP 400)."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/tokenize":
            if not tokenize:
                return httpx.Response(404, json={"detail": "Not Found"})
            return httpx.Response(200, json={"tokens": list(range(count(body["prompt"])))})
        seen.append(body["prompt"])
        n = count(body["prompt"])
        if n > limit:
            return httpx.Response(400, json={"error": {"message": "prompt too long"}})
        return httpx.Response(200, json={"usage": {"prompt_tokens": n, "completion_tokens": 1}})

    real = httpx.Client
    monkeypatch.setattr(
        httpb.httpx, "Client", lambda **kw: real(transport=httpx.MockTransport(handler), **kw)
    )
    return seen


@pytest.mark.parametrize("tokenize", [False, True])
def test_exact_prompts_have_the_labelled_length(monkeypatch: pytest.MonkeyPatch, tokenize: bool) -> None:
    seen = _mock_server(monkeypatch, tokenize=tokenize)
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "one two three"]
    prompts = httpb.exact_prompts("http://mock", "m", texts, 50)
    if tokenize:
        assert prompts == [list(range(50))] * 2 and not seen  # ids cut to length, no probing
    else:
        assert [len(p.split()) + 1 for p in prompts] == [50, 50]  # as the server counts them
        assert len(seen) < 2 * 12  # interpolation search: a few probes per prompt


def test_exact_prompts_bisect_when_the_server_rejects_the_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte-level tokenizer (a token per character) with a 300-token context: the first guess (4
    characters per token) is rejected as too long, and the search must not then walk down one character
    per probe (it did: hundreds of probes, each a prefill, for every prompt)."""
    seen = _mock_server(monkeypatch, tokenize=False, count=lambda text: len(text) + 1, limit=300)
    texts = ["the quick brown fox jumps over the lazy dog " * 5]
    prompts = httpb.exact_prompts("http://mock", "m", texts, 200)
    assert [len(p) + 1 for p in prompts] == [200]
    assert len(seen) < 20
