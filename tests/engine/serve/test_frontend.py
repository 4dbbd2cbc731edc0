"""HTTP front end over a deterministic fake engine: protocol, SSE, stop strings, aborts, waiting, 400s."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def _wait_for(cond, timeout: float = 20.0) -> None:
    """Poll until ``cond()`` (a liveness bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def _metrics(server, promtext):
    return promtext.parse(httpx.get(server.base_url + "/metrics").text)


def test_completion_plain_and_streamed_match(fake, fake_server) -> None:
    with fake_server() as (server, _):
        c = _client(server)
        r = c.completions.create(model="fake", prompt="hi there", max_tokens=10, seed=3)
        assert r.choices[0].text == fake.expected_text(10, seed=3)
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (8, 10, 18)

        chunks = list(
            c.completions.create(
                model="fake",
                prompt="hi there",
                max_tokens=10,
                seed=3,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text == r.choices[0].text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_plain_and_streamed(fake, fake_server) -> None:
    with fake_server() as (server, _):
        c = _client(server)
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
        r = c.chat.completions.create(model="fake", messages=msgs, max_completion_tokens=7)
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == fake.expected_text(7)
        prompt = "system: be brief\nuser: hello\nassistant: "
        assert r.usage.prompt_tokens == len(prompt.encode())

        stream = c.chat.completions.create(model="fake", messages=msgs, max_tokens=7, stream=True)
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == fake.expected_text(7)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert all(ch.usage is None for ch in chunks)  # no include_usage: no usage chunk


def test_stop_string_truncates_and_ends_request(fake, fake_server, promtext) -> None:
    engine = fake.FakeEngine(step_delay=0.002)
    with fake_server(engine) as (server, _):
        c = _client(server)
        r = c.completions.create(model="fake", prompt="x", max_tokens=100, stop=["world"])
        assert r.choices[0].text == "hello "
        assert r.choices[0].finish_reason == "stop"
        streamed = c.completions.create(
            model="fake", prompt="x", max_tokens=100, stop=["wor", "lo w"], stream=True
        )
        assert "".join(ch.choices[0].text for ch in streamed) == "hel"
        _wait_for(lambda: len(engine.aborted) == 2 and not engine.has_unfinished())
        fams = _metrics(server, promtext)
        assert promtext.value(fams, "vllm:request_success_total", finished_reason="stop") == 2
        assert promtext.value(fams, "vllm:request_success_total", finished_reason="abort") == 0


def test_eos_finishes_with_stop(fake, fake_server) -> None:
    with fake_server(fake.FakeEngine(eos_after=4)) as (server, _):
        r = _client(server).completions.create(model="fake", prompt="x", max_tokens=50)
        assert r.choices[0].text == "hell" and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == 5  # the EOS token counts, its text is empty


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "abc"}, "max_tokens"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "temperature": 3.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "n": 2}, "n"),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", "b"]}, "batch"),
        ({"prompt": [1, 2, 999]}, "999"),
        ({"prompt": "x" * 300}, "maximum context length"),
        ({"prompt": "x" * 200, "max_tokens": 100}, "maximum context length"),
        ({"prompt": "hi", "logprobs": 3}, "logprobs"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"max_tokens": 3}, "prompt"),
    ],
)
def test_bad_completion_input_is_400(fake_server, body, needle) -> None:
    with fake_server() as (server, _):
        r = httpx.post(server.base_url + "/v1/completions", json={"model": "fake", **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == 400
        assert needle in err["message"]
        assert httpx.get(server.base_url + "/health").status_code == 200  # still serving


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 3}]}, "content"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_chat_input_is_400(fake_server, body, needle) -> None:
    with fake_server() as (server, _):
        r = httpx.post(server.base_url + "/v1/chat/completions", json={"model": "fake", **body})
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]["message"]


def test_malformed_json_and_unknown_model(fake_server) -> None:
    with fake_server() as (server, _):
        r = httpx.post(
            server.base_url + "/v1/completions",
            content=b'{"prompt": "hi",',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            _client(server).completions.create(model="other", prompt="hi")
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            _client(server).completions.create(model="fake", prompt="hi", max_tokens=0)


def test_engine_rejection_is_400_and_leaves_nothing(fake, fake_server) -> None:
    engine = fake.FakeEngine()
    with fake_server(engine) as (server, _):
        r = httpx.post(server.base_url + "/v1/completions", json={"prompt": [1, 300, 2]})
        assert r.status_code == 400 and "token 300" in r.json()["error"]["message"]
        assert not engine.has_unfinished()


def test_models_and_health(fake_server) -> None:
    with fake_server() as (server, _):
        models = _client(server).models.list()
        assert [m.id for m in models.data] == ["fake"]
        assert httpx.get(server.base_url + "/health").status_code == 200


def test_stream_disconnect_aborts_at_once(fake, fake_server, promtext) -> None:
    engine = fake.FakeEngine(step_delay=0.01)
    with fake_server(engine) as (server, _):
        body = {"prompt": "x", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(5)]
        assert all(not g or g.startswith("data: ") for g in got)
        _wait_for(lambda: len(engine.aborted) == 1)
        assert not engine.has_unfinished()
        _wait_for(
            lambda: (
                promtext.value(
                    _metrics(server, promtext), "vllm:request_success_total", finished_reason="abort"
                )
                == 1
            )
        )
        fams = _metrics(server, promtext)
        assert promtext.value(fams, "vllm:num_requests_running") == 0
        assert promtext.value(fams, "vllm:generation_tokens_total") < 200


def test_non_stream_disconnect_aborts(fake, fake_server) -> None:
    engine = fake.FakeEngine(step_delay=0.01)
    with fake_server(engine) as (server, _):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                server.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 250}, timeout=0.3
            )
        _wait_for(lambda: len(engine.aborted) == 1)
        assert not engine.has_unfinished()


def test_overload_queues_and_reports_waiting(fake, fake_server, promtext) -> None:
    engine = fake.FakeEngine(max_num_seqs=2, step_delay=0.005)
    with fake_server(engine) as (server, _):
        results: list[str] = []

        def one() -> None:
            r = _client(server).completions.create(model="fake", prompt="q", max_tokens=60)
            results.append(r.choices[0].finish_reason)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        max_waiting = 0.0
        while any(t.is_alive() for t in threads):
            fams = _metrics(server, promtext)
            max_waiting = max(max_waiting, promtext.value(fams, "vllm:num_requests_waiting"))
            assert promtext.value(fams, "vllm:num_requests_running") <= 2
            time.sleep(0.01)
        for t in threads:
            t.join()
        assert results == ["length"] * 6  # queued, none refused
        assert max_waiting >= 1


def test_counters_agree_with_clients(fake, fake_server, promtext) -> None:
    with fake_server() as (server, _):
        c = _client(server)
        usages = []
        for i in range(5):
            r = c.completions.create(model="fake", prompt="p" * (i + 1), max_tokens=3 + i)
            usages.append(r.usage)
        fams = _metrics(server, promtext)
        assert promtext.value(fams, "vllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
        assert promtext.value(fams, "vllm:generation_tokens_total") == sum(
            u.completion_tokens for u in usages
        )
        assert promtext.value(fams, "vllm:request_success_total", finished_reason="length") == 5
        assert promtext.value(fams, "vllm:time_to_first_token_seconds_count") == 5
        assert promtext.value(fams, "vllm:e2e_request_latency_seconds_count") == 5
        assert promtext.value(fams, "vllm:request_generation_tokens_sum") == sum(
            u.completion_tokens for u in usages
        )
        # one ITL observation per later step: tokens - 1 per request (one token per fake step)
        assert promtext.value(fams, "vllm:inter_token_latency_seconds_count") == sum(
            u.completion_tokens - 1 for u in usages
        )
        assert fams["vllm:request_success"].type == "counter"
        assert fams["vllm:time_to_first_token_seconds"].type == "histogram"
        assert fams["vllm:num_requests_running"].type == "gauge"


def test_sse_wire_format(fake_server) -> None:
    with fake_server() as (server, _):
        body = {"prompt": "x", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = [line for line in resp.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert all(p["object"] == "text_completion" for p in payloads)
        assert (
            all(p["usage"] is None for p in payloads[:-1]) and payloads[-1]["usage"]["completion_tokens"] == 3
        )


def test_engine_failure_fails_requests_not_server(fake, fake_server, promtext) -> None:
    engine = fake.FakeEngine(fail_at_step=3)
    with fake_server(engine) as (server, _):
        body = {"prompt": "x", "max_tokens": 20, "stream": True}
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body) as resp:
            events = [line for line in resp.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        assert "simulated device failure" in json.loads(events[-2].removeprefix("data: "))["error"]["message"]
        r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == fake.expected_text(4)
        fams = _metrics(server, promtext)
        assert promtext.value(fams, "vllm:request_success_total", finished_reason="error") == 1
        assert promtext.value(fams, "vllm:request_success_total", finished_reason="length") == 1


def test_tokenize_gives_the_ids_a_completion_is_given(fake_server) -> None:
    """vLLM's /tokenize: the profiler cuts exact-length prompts from these ids (no probing)."""
    with fake_server() as (server, _):
        r = httpx.post(server.base_url + "/tokenize", json={"model": "fake", "prompt": "hi there"})
        assert r.status_code == 200
        body = r.json()
        done = _client(server).completions.create(model="fake", prompt="hi there", max_tokens=1)
        assert body["count"] == len(body["tokens"]) == done.usage.prompt_tokens
        assert body["tokens"] == list(b"hi there") and body["max_model_len"] > 0
        bad = httpx.post(server.base_url + "/tokenize", json={"prompt": "x", "add_special_tokens": False})
        assert bad.status_code == 400 and "add_special_tokens" in bad.text
        unknown = httpx.post(server.base_url + "/tokenize", json={"model": "nope", "prompt": "x"})
        assert unknown.status_code == 404
