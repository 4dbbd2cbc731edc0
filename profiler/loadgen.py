"""Closed-loop streaming load against an OpenAI-compatible ``/v1/completions`` endpoint.

``concurrency`` workers each keep exactly one request in flight until ``num_requests`` have finished,
so the server sees a fixed batch (what a decode point means). Every streamed chunk is timestamped on
arrival. Under speculative decoding one chunk may carry several tokens, so output tokens are counted
by the server's ``usage`` (``stream_options.include_usage``); without it, by tokenizing the streamed
text with the caller's tokenizer; without one, by counting chunks (a lower bound). Each request records
which of the three it used.

The steady window (``steady_window``) is the span in which the target concurrency was really decoding
at once: closed-loop ramp-up (requests waiting for their first token) and ramp-down (the last requests
finishing alone) have fewer in flight, and a throughput over the whole run understates the point.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import httpx

TokenCountSource = Literal["usage", "tokenizer", "chunks"]


@dataclass
class RequestRecord:
    """One request: perf_counter timestamps (seconds) of its send and of every chunk with output."""

    send: float
    first: float | None = None
    last: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)  # tokens per chunk when known (tokenizer)
    text: str = ""
    output_tokens: int = 0
    prompt_tokens: int | None = None
    token_count_source: TokenCountSource = "chunks"
    finish_reason: str | None = None
    error: str | None = None
    end: float | None = None  # when the stream closed

    @property
    def ok(self) -> bool:
        return self.error is None and self.first is not None


def _apply_event(rec: RequestRecord, obj: dict, now: float) -> None:
    usage = obj.get("usage")
    if usage:
        rec.output_tokens = int(usage.get("completion_tokens") or 0)
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.token_count_source = "usage"
    for choice in obj.get("choices") or []:
        text = choice.get("text")
        if text is None:  # chat-style delta
            text = (choice.get("delta") or {}).get("content")
        if choice.get("finish_reason"):
            rec.finish_reason = choice["finish_reason"]
        if text:
            if rec.first is None:
                rec.first = now
            rec.last = now
            rec.chunk_times.append(now)
            rec.text += text


async def stream_one(
    client: httpx.AsyncClient, url: str, body: dict, count_tokens: Callable[[str], int] | None = None
) -> RequestRecord:
    """Send one streaming completion and timestamp its chunks; errors are recorded, never raised."""
    rec = RequestRecord(send=time.perf_counter())
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                rec.error = f"HTTP {resp.status_code}: {resp.text[:300]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(payload)
                if "error" in obj and not obj.get("choices"):
                    rec.error = f"server error in stream: {str(obj['error'])[:300]}"
                    return rec
                _apply_event(rec, obj, now)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
        return rec
    rec.end = time.perf_counter()
    if rec.token_count_source != "usage":
        if count_tokens is not None:
            rec.output_tokens = count_tokens(rec.text)
            rec.token_count_source = "tokenizer"
        else:
            rec.output_tokens = len(rec.chunk_times)
    return rec


def completion_body(model: str, prompt: str | list[int], max_tokens: int) -> dict:
    """Greedy, fixed-length (``ignore_eos``), streamed with a final usage chunk; ``prompt`` is text or
    token ids (the OpenAI API takes both: ids make the prompt length exact)."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass
class ClosedLoopRun:
    records: list[RequestRecord]
    start: float  # perf_counter when the first request was sent
    end: float  # perf_counter when the last request finished

    @property
    def window_s(self) -> float:
        return self.end - self.start


async def closed_loop(
    url: str,
    model: str,
    prompts: Sequence[str | list[int]],
    *,
    concurrency: int,
    num_requests: int,
    max_tokens: int | Sequence[int],
    timeout_s: float = 600.0,
    count_tokens: Callable[[str], int] | None = None,
) -> ClosedLoopRun:
    """Keep ``concurrency`` requests in flight until ``num_requests`` are done (prompts cycle; a
    sequence of ``max_tokens`` gives request ``i`` the ``i``-th length, cycling too)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    lengths = [max_tokens] if isinstance(max_tokens, int) else list(max_tokens)
    if not lengths or min(lengths) < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not prompts:
        raise ValueError("prompts must not be empty")
    url = url.rstrip("/")
    next_index = iter(range(num_requests))
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            for i in next_index:  # a shared iterator: each index is taken by exactly one worker
                body = completion_body(model, prompts[i % len(prompts)], lengths[i % len(lengths)])
                records.append(await stream_one(client, url, body, count_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
        end = time.perf_counter()
    return ClosedLoopRun(records, start, end)


@dataclass(frozen=True)
class SteadyWindow:
    """Where ``concurrency`` requests were decoding at once, and what came out in that span."""

    start: float
    end: float
    mean_in_flight: float  # time-average of requests between their first and last token
    output_tokens: float  # tokens after each request's first, spread evenly over its decode span

    @property
    def duration_s(self) -> float:
        return self.end - self.start


def steady_window(records: Sequence[RequestRecord], concurrency: int) -> SteadyWindow | None:
    """From the first moment ``concurrency`` requests were decoding (between first and last token) to
    the last such moment; when that never happened, the same for the most that ever were. None when no
    request decoded two tokens. Tokens inside the window are counted by spreading each request's
    ``output_tokens - 1`` evenly over its ``(first, last)`` span (the server's usage gives totals only).
    """
    spans = [
        (r.first, r.last, r.output_tokens)
        for r in records
        if r.ok and r.first is not None and r.last is not None and r.last > r.first and r.output_tokens > 1
    ]
    if not spans:
        return None
    events = sorted(
        [(a, 1) for a, _, _ in spans] + [(b, -1) for _, b, _ in spans], key=lambda e: (e[0], e[1])
    )
    level, peak = 0, 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    want = min(concurrency, peak)
    level, start, end = 0, None, None
    for t, d in events:
        if level >= want and d < 0 and start is not None:
            end = t  # leaving the target level: the latest such moment wins
        level += d
        if level >= want and start is None:
            start = t
    if start is None or end is None or end <= start:
        return None
    busy = tokens = 0.0
    for a, b, n in spans:
        overlap = max(0.0, min(b, end) - max(a, start))
        busy += overlap
        tokens += (n - 1) * overlap / (b - a)
    return SteadyWindow(start, end, busy / (end - start), tokens)
