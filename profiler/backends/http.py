"""Closed-loop load against an OpenAI-compatible server (``/v1/completions``, streaming).

``concurrency`` workers each keep one request in flight until ``num_requests`` have finished. Every
streamed chunk gets a timestamp; a chunk may carry several tokens under speculation, so output tokens
are counted from the server's ``usage`` (``stream_options.include_usage``), falling back to one token
per non-empty chunk (recorded in ``token_count_source``). TTFT, ITL and throughput follow
``planner.metrics_def``. ``/metrics`` is scraped before and after the point; the counter deltas give
draft coverage and per-position acceptance (vLLM metric names).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from planner import metrics_def as md


@dataclass
class RequestRecord:
    send: float
    first: float | None = None
    last: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    token_count_source: str = "chunks"
    error: str | None = None


@dataclass
class SpecCounters:
    """Deltas of vLLM's speculative-decoding counters over a window."""

    drafts: float
    draft_tokens: float
    accepted: float
    accepted_per_pos: list[float]
    generation_tokens: float
    first_tokens: float

    @property
    def decode_steps(self) -> float:
        return md.vllm_decode_steps(self.generation_tokens, self.accepted, self.first_tokens)

    @property
    def draft_coverage(self) -> float:
        return md.draft_coverage(self.drafts, self.decode_steps)

    @property
    def acceptance_per_pos(self) -> list[float]:
        return md.acceptance_given_draft(self.accepted_per_pos, self.drafts)

    @property
    def tokens_per_step(self) -> float:
        """``1 + accepted / decode_steps`` (equals coverage x acceptance given a draft)."""
        steps = self.decode_steps
        return 1.0 + self.accepted / steps if steps > 0 else 1.0


@dataclass
class LoadResult:
    records: list[RequestRecord]
    window_s: float
    counters: SpecCounters | None

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.error is None and r.first is not None]

    def itl_ms(self) -> list[float]:
        out = []
        for r in self.ok:
            v = md.request_itl(r.first, r.last, r.output_tokens)  # type: ignore[arg-type]
            if v is not None:
                out.append(v * 1000.0)
        return out

    def ttft_ms(self) -> list[float]:
        return [md.ttft(r.send, r.first) * 1000.0 for r in self.ok]  # type: ignore[arg-type]

    def chunk_gaps_ms(self) -> list[float]:
        return [g * 1000.0 for r in self.ok for g in md.chunk_gaps(r.chunk_times)]

    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.ok)


def parse_counters(text: str) -> dict[str, float]:
    """Counter samples summed over labels other than ``position`` (name[pos] for per-position)."""
    out: dict[str, float] = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.endswith("_total"):
                continue
            name = s.name
            if "position" in s.labels:
                name += f"[{s.labels['position']}]"
            out[name] += s.value
    return dict(out)


def counter_delta(
    before: dict[str, float], after: dict[str, float], num_requests: int
) -> SpecCounters | None:
    """Speculative counters over the window, or None when the server exposes none (no speculation)."""

    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    if "vllm:spec_decode_num_drafts_total" not in after:
        return None
    prefix = "vllm:spec_decode_num_accepted_tokens_per_pos_total["
    positions = sorted(int(n[len(prefix) : -1]) for n in after if n.startswith(prefix))
    return SpecCounters(
        drafts=d("vllm:spec_decode_num_drafts_total"),
        draft_tokens=d("vllm:spec_decode_num_draft_tokens_total"),
        accepted=d("vllm:spec_decode_num_accepted_tokens_total"),
        accepted_per_pos=[d(f"{prefix}{p}]") for p in positions],
        generation_tokens=d("vllm:generation_tokens_total"),
        first_tokens=float(num_requests),
    )


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> RequestRecord:
    rec = RequestRecord(send=time.perf_counter())
    chunks_with_text = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                rec.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(payload)
                if obj.get("usage"):
                    rec.output_tokens = int(obj["usage"].get("completion_tokens") or 0)
                    rec.prompt_tokens = obj["usage"].get("prompt_tokens")
                    rec.token_count_source = "usage"
                choices = obj.get("choices") or []
                if any(c.get("text") for c in choices):
                    rec.first = rec.first if rec.first is not None else now
                    rec.last = now
                    rec.chunk_times.append(now)
                    chunks_with_text += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    if rec.token_count_source != "usage":
        rec.output_tokens = chunks_with_text
    return rec


async def _closed_loop(
    url: str,
    model: str,
    prompts: list[str],
    concurrency: int,
    num_requests: int,
    max_tokens: int,
    timeout_s: float,
) -> tuple[list[RequestRecord], float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num_requests):
        queue.put_nowait(i)
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = {
                    "model": model,
                    "prompt": prompts[i % len(prompts)],
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                records.append(await _one(client, url, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        window = time.perf_counter() - t0
    return records, window


def run_load(
    url: str,
    model: str,
    prompts: list[str],
    *,
    concurrency: int,
    num_requests: int | None = None,
    max_tokens: int = 64,
    timeout_s: float = 600.0,
    scrape: bool = True,
) -> LoadResult:
    """One closed-loop point; scrapes ``{url}/metrics`` before and after when ``scrape``."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not prompts:
        raise ValueError("prompts must not be empty")
    url = url.rstrip("/")
    n = num_requests or 2 * concurrency
    before = _scrape(url) if scrape else None
    records, window = asyncio.run(_closed_loop(url, model, prompts, concurrency, n, max_tokens, timeout_s))
    after = _scrape(url) if scrape else None
    started = sum(1 for r in records if r.first is not None)
    counters = counter_delta(before, after, started) if before is not None and after is not None else None
    return LoadResult(records, window, counters)


def _scrape(url: str) -> dict[str, float] | None:
    try:
        r = httpx.get(f"{url}/metrics", timeout=30.0)
    except httpx.HTTPError:
        return None
    return parse_counters(r.text) if r.status_code == 200 else None


def served_model_name(url: str) -> str:
    """The first model the server lists at ``/v1/models``."""
    r = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=30.0)
    r.raise_for_status()
    return str(r.json()["data"][0]["id"])


def to_decode_point(spec, result: LoadResult, gpus: int):
    """A profile DecodePoint from one load result (``spec`` is a profiler.grid.PointSpec)."""
    from planner.profile import DecodePoint

    itls = result.itl_ms()
    base = dict(
        tp=spec.tp, method=spec.method, k=spec.k, concurrency=spec.concurrency, context_len=spec.context_len
    )
    failed = [r.error for r in result.records if r.error]
    if not itls:
        why = failed[0] if failed else "no request produced 2 or more tokens"
        return DecodePoint(**base, error=f"{len(failed)}/{len(result.records)} requests failed: {why}")
    tps = result.counters.tokens_per_step if (result.counters and spec.method != "none") else 1.0
    stats = md.summarize(itls)
    return DecodePoint(
        **base,
        step_ms=stats.mean * tps,
        tokens_per_step=max(1.0, tps),
        itl_ms=stats,
        throughput_per_gpu=md.throughput_per_gpu(result.output_tokens(), result.window_s, gpus),
        samples=len(itls),
    )
