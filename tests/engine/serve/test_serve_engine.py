"""`engine serve` over the real engine: the official openai client, a 64-client load test with early
disconnects, speculative-decoding counters, a real chat model, and the CLI as a subprocess."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.serve.app import app_for_engine
from engine.serve.launcher import ServerThread

REPO = Path(__file__).resolve().parents[3]


def _wait_for(cond, timeout: float = 60.0) -> None:
    """Poll until ``cond()`` holds (a liveness bound for background work, never a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


class Scrape:
    """/metrics of one server, parsed with prometheus_client's parser."""

    def __init__(self, server, promtext) -> None:
        self.server, self.pt = server, promtext

    def __call__(self):
        return self.pt.parse(httpx.get(self.server.base_url + "/metrics").text)

    def value(self, fams, sample: str, **labels: str) -> float:
        return self.pt.value(fams, sample, **labels)


def _serve(engine: LLMEngine, name: str, k: int = 0) -> ServerThread:
    return ServerThread(app_for_engine(engine, name, num_spec_tokens=k)).start()


@pytest.fixture(scope="module")
def tiny():
    engine = LLMEngine(EngineConfig("tiny", max_num_seqs=32, num_gpu_blocks=512, seed=0))
    server = _serve(engine, "tiny")
    yield engine, server
    server.stop()


def _idle(engine: LLMEngine, scrape: Scrape) -> bool:
    fams = scrape()
    return (
        scrape.value(fams, "vllm:num_requests_running") == 0
        and scrape.value(fams, "vllm:num_requests_waiting") == 0
        and not engine.has_unfinished()
    )


def test_openai_client_completions_and_chat(tiny, promtext) -> None:
    engine, server = tiny
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    ask = dict(
        model="tiny",
        prompt="The quick brown fox",
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    plain = c.completions.create(**ask)
    streamed = list(c.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == plain.choices[0].text
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 24 == streamed[-1].usage.completion_tokens
    assert plain.usage.prompt_tokens == len(engine.tokenizer.encode("The quick brown fox"))

    msgs = [{"role": "user", "content": "hi"}]
    chat = c.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=msgs,
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat.choices[0].message.content
    assert chat.usage.prompt_tokens == len(
        engine.tokenizer.encode(engine.tokenizer.apply_chat_template(msgs))
    )

    # Seeded sampling is reproducible through the server.
    a = c.completions.create(model="tiny", prompt="x", max_tokens=16, temperature=0.9, seed=7)
    b = c.completions.create(model="tiny", prompt="x", max_tokens=16, temperature=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text
    _wait_for(lambda: _idle(engine, Scrape(server, promtext)))
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_context_limit_and_bad_input_are_400(tiny) -> None:
    engine, server = tiny
    too_long = {"model": "tiny", "prompt": "x" * engine.max_model_len}
    r = httpx.post(server.base_url + "/v1/completions", json=too_long)
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    r = httpx.post(
        server.base_url + "/v1/completions",
        json={"model": "tiny", "prompt": "x", "max_tokens": engine.max_model_len},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "top_p": 1.5})
    assert r.status_code == 400 and "top_p" in r.json()["error"]["message"]
    assert httpx.get(server.base_url + "/health").status_code == 200


async def _load(server, n: int, seed: int, scrape: Scrape) -> tuple[list[dict], float]:
    """n concurrent streaming clients of random lengths; every fourth disconnects after a few chunks."""
    rng = random.Random(seed)
    client = openai.AsyncOpenAI(
        base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120
    )
    max_waiting = 0.0
    done = asyncio.Event()

    async def poll() -> None:
        nonlocal max_waiting
        async with httpx.AsyncClient() as h:
            while not done.is_set():
                fams = scrape.pt.parse((await h.get(server.base_url + "/metrics")).text)
                max_waiting = max(max_waiting, scrape.value(fams, "vllm:num_requests_waiting"))
                await asyncio.sleep(0.02)

    async def one(i: int) -> dict:
        quitter = i % 4 == 0
        max_tokens = rng.randint(100, 200) if quitter else rng.randint(1, 48)
        prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 60)))
        quit_after = rng.randint(1, 4)
        stream = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=rng.choice([0.0, 0.8]), seed=i,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        res = {"prompt": prompt, "max_tokens": max_tokens, "chunks": 0, "finish": None, "usage": None}
        async for ch in stream:
            if ch.choices:
                res["chunks"] += 1
                res["finish"] = ch.choices[0].finish_reason or res["finish"]
            if ch.usage is not None:
                res["usage"] = ch.usage
            if quitter and res["chunks"] >= quit_after and res["finish"] is None:
                await stream.close()
                res["quit"] = True
                return res
        res["quit"] = False
        return res

    poller = asyncio.create_task(poll())
    try:
        results = await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        done.set()
        await poller
        await client.close()
    return results, max_waiting


def test_load_64_streaming_clients_with_disconnects(tiny, promtext) -> None:
    engine, server = tiny
    scrape = Scrape(server, promtext)
    _wait_for(lambda: _idle(engine, scrape))
    before = scrape()
    results, max_waiting = asyncio.run(_load(server, 64, seed=1, scrape=scrape))
    _wait_for(lambda: _idle(engine, scrape))
    after = scrape()

    def delta(sample: str, **labels: str) -> float:
        return scrape.value(after, sample, **labels) - scrape.value(before, sample, **labels)

    completed = [r for r in results if not r["quit"]]
    quit_early = [r for r in results if r["quit"]]
    assert len(completed) + len(quit_early) == 64 and len(quit_early) >= 1
    for r in completed:  # each finished client saw exactly what it asked for
        assert r["finish"] == "length"
        assert r["usage"].completion_tokens == r["max_tokens"]
        assert r["usage"].prompt_tokens == len(engine.tokenizer.encode(r["prompt"]))

    # Every request either finished or was aborted, and the server counted each exactly once.
    finished = delta("vllm:request_success_total", finished_reason="length") + delta(
        "vllm:request_success_total", finished_reason="stop"
    )
    aborted = delta("vllm:request_success_total", finished_reason="abort")
    assert finished + aborted == 64
    assert len(completed) <= finished and 1 <= aborted <= len(quit_early)
    assert delta("vllm:request_success_total", finished_reason="error") == 0
    assert delta("vllm:e2e_request_latency_seconds_count") == 64

    # No KV block is left behind, and the gauges agree.
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks
    assert scrape.value(after, "vllm:kv_cache_usage_perc") == 0.0
    assert max_waiting >= 1  # 64 clients > max_num_seqs=32: the rest queued instead of failing

    # Token counters agree with the clients: completed requests exactly, aborted ones at least as
    # many tokens as their clients received before leaving.
    gen = delta("vllm:generation_tokens_total")
    assert gen == delta("vllm:request_generation_tokens_sum")
    assert gen >= sum(r["max_tokens"] for r in completed) + sum(r["chunks"] for r in quit_early)
    prompt = delta("vllm:prompt_tokens_total")
    assert prompt == delta("vllm:request_prompt_tokens_sum") - sum(
        0 for _ in ()
    )  # one prompt count per request
    assert prompt >= sum(r["usage"].prompt_tokens for r in completed)
    assert delta("vllm:time_to_first_token_seconds_count") >= len(completed)


def test_counters_exact_without_disconnects(tiny, promtext) -> None:
    engine, server = tiny
    scrape = Scrape(server, promtext)
    _wait_for(lambda: _idle(engine, scrape))
    before = scrape()
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    usages = [
        c.completions.create(
            model="tiny",
            prompt="p" * (i + 2),
            max_tokens=5 + i,
            temperature=0,
            extra_body={"ignore_eos": True},
        ).usage
        for i in range(6)
    ]
    _wait_for(lambda: _idle(engine, scrape))
    after = scrape()
    d = lambda s, **lb: scrape.value(after, s, **lb) - scrape.value(before, s, **lb)  # noqa: E731
    assert d("vllm:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert d("vllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert d("vllm:request_success_total", finished_reason="length") == 6
    assert d("vllm:time_to_first_token_seconds_count") == 6
    # Without speculation every later token is one inter-token observation.
    assert d("vllm:inter_token_latency_seconds_count") == sum(u.completion_tokens - 1 for u in usages)


def test_spec_ngram_counters_match_engine(promtext) -> None:
    from engine.spec import SpecConfig

    k = 3
    engine = LLMEngine(
        EngineConfig(
            "tiny", max_num_seqs=16, num_gpu_blocks=256, spec=SpecConfig(method="ngram", k=k), seed=0
        )
    )
    server = _serve(engine, "tiny", k=k)
    try:
        scrape = Scrape(server, promtext)
        c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        prompts = [
            "abcabcabcabcabcabc",
            "hello hello hello hello",
            "xyxyxyxyxyxyxyxy",
            "the cat the cat the cat",
        ]
        plain = [
            c.completions.create(
                model="tiny", prompt=p, max_tokens=32, temperature=0, extra_body={"ignore_eos": True}
            )
            for p in prompts
        ]
        streamed = [
            "".join(
                ch.choices[0].text
                for ch in c.completions.create(
                    model="tiny",
                    prompt=p,
                    max_tokens=32,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
            )
            for p in prompts
        ]
        assert streamed == [r.choices[0].text for r in plain]
        _wait_for(lambda: _idle(engine, scrape))
        fams = scrape()
        stats = engine.spec_stats
        assert stats is not None and stats.num_drafts > 0
        assert scrape.value(fams, "vllm:spec_decode_num_drafts_total") == stats.num_drafts
        assert scrape.value(fams, "vllm:spec_decode_num_draft_tokens_total") == stats.num_draft_tokens
        assert scrape.value(fams, "vllm:spec_decode_num_accepted_tokens_total") == stats.num_accepted_tokens
        for pos in range(k):
            want = stats.accepted_per_pos[pos] if pos < len(stats.accepted_per_pos) else 0
            got = scrape.value(fams, "vllm:spec_decode_num_accepted_tokens_per_pos_total", position=str(pos))
            assert got == want
        assert scrape.value(fams, "vllm:generation_tokens_total") == 2 * 32 * len(prompts)
        assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks
    finally:
        server.stop()


@pytest.mark.slow
def test_smollm2_chat_real_weights(promtext) -> None:
    engine = LLMEngine(EngineConfig("smollm2-135m", max_num_seqs=4, num_gpu_blocks=256, max_model_len=1024))
    server = _serve(engine, "smollm2-135m")
    try:
        c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = c.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=24, temperature=0)
        text = r.choices[0].message.content
        assert "Paris" in text
        chunks = list(
            c.chat.completions.create(
                model="smollm2-135m", messages=msgs, max_tokens=24, temperature=0, stream=True
            )
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
        stop = c.chat.completions.create(
            model="smollm2-135m", messages=msgs, max_tokens=24, temperature=0, stop=["Paris"]
        )
        assert stop.choices[0].finish_reason == "stop" and "Paris" not in stop.choices[0].message.content
        assert text.startswith(stop.choices[0].message.content)
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_serves_curl_style_completion() -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    flags = f"--model tiny --host 127.0.0.1 --port {port} --max-num-seqs 4 --num-gpu-blocks 64"
    flags += " --spec ngram --k 2 --warm-up"  # the start-up warm-up a GPU server runs by default
    cmd = [sys.executable, "-m", "engine.serve.cli", *flags.split(), "--log-level", "info"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "server exited"
            try:
                return httpx.get(base + "/health").status_code == 200
            except httpx.TransportError:
                return False

        _wait_for(up, timeout=120)
        r = httpx.post(
            base + "/v1/completions",
            json={"model": "tiny", "prompt": "San Francisco is a", "max_tokens": 7, "ignore_eos": True},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7
        metrics = httpx.get(base + "/metrics").text
        # the counters start after the warm-up: 7 tokens generated, none by the warm-up's steps
        assert re.search(r"^vllm:generation_tokens_total\{[^}]*\} 7\.0$", metrics, re.M), metrics
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = proc.stdout.read().decode() if proc.stdout else ""
    assert "warm-up: batch sizes 4, 2, 1;" in log, log
