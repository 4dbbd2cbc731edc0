"""The ``http`` backend: one decode point = closed-loop load at fixed concurrency on a running server.

Load comes from ``profiler.loadgen`` (streaming, per-chunk timestamps, token counts from the server's
``usage``, else a tokenizer, else chunks). TTFT, ITL and throughput per GPU follow ``common.metrics``.
``/metrics`` is scraped before and after the point and parsed by the correction daemon's parser
(``planner.daemon.scrape``, vLLM metric names); the counter deltas give draft coverage and per-position
acceptance, with ``decode_steps = generated - accepted - first tokens`` because vLLM counts only steps
that carried a draft.

Throughput is taken over the steady window (``profiler.loadgen.steady_window``: the span in which the
point's concurrency was really decoding at once) and the mean number in flight there is recorded; a point
labelled context L gets prompts of exactly L tokens as the server counts them (``exact_prompts``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from prometheus_client.parser import text_string_to_metric_families

from common import metrics as md
from planner.daemon.scrape import MetricsSnapshot, parse_metrics, window
from planner.profile import Acceptance, AcceptanceSource, DecodePoint
from profiler.loadgen import ClosedLoopRun, RequestRecord, SteadyWindow, closed_loop, steady_window

if TYPE_CHECKING:
    from profiler.grid import PointSpec

log = logging.getLogger("profiler.http")

__all__ = [
    "LoadResult",
    "RequestRecord",
    "ServerInfo",
    "add_counters",
    "check_speculation",
    "served_model_root",
    "server_info",
    "SpecCounters",
    "counter_delta",
    "exact_prompts",
    "parse_counters",
    "run_load",
    "served_model_name",
    "to_acceptance",
    "to_decode_point",
    "tokenizer_counter",
]


@dataclass
class SpecCounters:
    """Deltas of vLLM's speculative-decoding counters over one point's window."""

    drafts: float
    draft_tokens: float
    accepted: float
    accepted_per_pos: list[float]  # counts per position 0..k-1
    generation_tokens: float
    first_tokens: float  # requests whose first token fell in the window (server's TTFT count)

    @property
    def decode_steps(self) -> float:
        return md.vllm_decode_steps(self.generation_tokens, self.accepted, self.first_tokens)

    @property
    def draft_coverage(self) -> float:
        return md.draft_coverage(self.drafts, self.decode_steps)

    @property
    def acceptance_per_pos(self) -> list[float]:
        """Share of drafts whose position i was accepted (acceptance given a draft)."""
        return md.acceptance_given_draft(self.accepted_per_pos, self.drafts)

    @property
    def tokens_per_step(self) -> float:
        """``1 + coverage * sum(acceptance_per_pos)`` (= ``1 + accepted / decode_steps``)."""
        if self.decode_steps <= 0:
            return 1.0
        return md.tokens_per_step(self.draft_coverage, self.acceptance_per_pos)


@dataclass
class LoadResult:
    records: list[RequestRecord]
    window_s: float
    counters: SpecCounters | None
    concurrency: int | None = None  # the closed loop's target; None = as many as ever decoded at once

    @property
    def steady(self) -> SteadyWindow | None:
        return steady_window(self.records, self.concurrency or len(self.records))

    def throughput_per_gpu(self, gpus: int) -> float:
        """Output tokens per second per GPU over the steady window (whole run when there is none)."""
        w = self.steady
        if w is None or w.duration_s <= 0:
            return md.throughput_per_gpu(self.output_tokens(), self.window_s, gpus)
        return md.throughput_per_gpu(w.output_tokens, w.duration_s, gpus)

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    def itl_ms(self) -> list[float]:
        """Per-request ITL: ``(last - first) / (output tokens - 1)``; requests of < 2 tokens have none."""
        out = []
        for r in self.ok:
            v = md.request_itl(r.first, r.last, r.output_tokens)  # type: ignore[arg-type]
            if v is not None:
                out.append(v * 1000.0)
        return out

    def ttft_ms(self) -> list[float]:
        return [md.ttft(r.send, r.first) * 1000.0 for r in self.ok]  # type: ignore[arg-type]

    def chunk_gaps_ms(self) -> list[float]:
        """Gaps between streamed chunks: reported on their own, never as ITL."""
        return [g * 1000.0 for r in self.ok for g in md.chunk_gaps(r.chunk_times)]

    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.ok)

    def tokens_per_chunk(self) -> float | None:
        """Output tokens per streamed chunk after the first (vLLM streams one chunk per engine step)."""
        tokens = sum(r.output_tokens - 1 for r in self.ok if len(r.chunk_times) > 1)
        chunks = sum(len(r.chunk_times) - 1 for r in self.ok if len(r.chunk_times) > 1)
        return tokens / chunks if chunks else None


def parse_counters(text: str) -> MetricsSnapshot:
    """One scrape of a vLLM-named exposition (the daemon's parser: one place for the names)."""
    return parse_metrics(text)


def counter_delta(
    before: MetricsSnapshot, after: MetricsSnapshot, first_tokens: float
) -> SpecCounters | None:
    """Speculative counters over the window; None when the server exports none (no speculation).

    ``first_tokens`` is the client's count of requests that got a first token; the server's own count
    (TTFT histogram observations) is used instead when it exports one.
    """
    if after.drafts is None or after.accepted is None or after.generation_tokens is None:
        return None
    w = window(before, after)
    if w.reset:
        raise RuntimeError("the server's counters went down during the point: it restarted mid-measurement")
    k = max(after.accepted_per_pos, default=-1) + 1
    return SpecCounters(
        drafts=w.drafts or 0.0,
        draft_tokens=(after.draft_tokens or 0.0) - (before.draft_tokens or 0.0),
        accepted=w.accepted or 0.0,
        accepted_per_pos=[w.accepted_per_pos.get(i, 0.0) for i in range(k)],
        generation_tokens=w.generation_tokens or 0.0,
        first_tokens=w.ttft_count if w.ttft_count is not None else float(first_tokens),
    )


def _scrape(client: httpx.Client, url: str) -> MetricsSnapshot | None:
    try:
        r = client.get(f"{url}/metrics")
    except httpx.HTTPError as exc:
        log.warning("cannot scrape %s/metrics: %s", url, exc)
        return None
    if r.status_code != 200:
        log.warning("%s/metrics answered HTTP %d", url, r.status_code)
        return None
    return parse_counters(r.text)


def run_load(
    url: str,
    model: str,
    prompts: Sequence[str],
    *,
    concurrency: int,
    num_requests: int | None = None,
    max_tokens: int | Sequence[int] = 64,
    timeout_s: float = 600.0,
    scrape: bool = True,
    count_tokens: Callable[[str], int] | None = None,
) -> LoadResult:
    """One closed-loop point (default ``2 x concurrency`` requests), with ``/metrics`` around it."""
    url = url.rstrip("/")
    n = num_requests or 2 * concurrency
    with httpx.Client(timeout=30.0) as client:
        before = _scrape(client, url) if scrape else None
        run: ClosedLoopRun = asyncio.run(
            closed_loop(
                url, model, prompts, concurrency=concurrency, num_requests=n, max_tokens=max_tokens,
                timeout_s=timeout_s, count_tokens=count_tokens,
            )
        )  # fmt: skip
        after = _scrape(client, url) if scrape else None
    started = sum(1 for r in run.records if r.first is not None)
    counters = counter_delta(before, after, started) if before and after else None
    return LoadResult(run.records, run.window_s, counters, concurrency)


def _probe_prompt_tokens(client: httpx.Client, url: str, model: str, text: str) -> int | None:
    """Prompt length of ``text`` as the server counts it (its usage), from a one-token completion;
    None when the server rejects the prompt (HTTP 400: longer than its context)."""
    body = {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0.0}
    r = client.post(f"{url}/v1/completions", json=body)
    if r.status_code == 400:
        return None
    if r.status_code != 200:
        raise RuntimeError(f"counting prompt tokens: HTTP {r.status_code} from {url}: {r.text[:200]}")
    n = (r.json().get("usage") or {}).get("prompt_tokens")
    if not isinstance(n, int):
        raise RuntimeError(f"counting prompt tokens: {url} reports no usage.prompt_tokens")
    return n


def _cut_to_tokens(client: httpx.Client, url: str, model: str, text: str, tokens: int) -> str | None:
    """The prefix of ``text`` the server counts as exactly ``tokens`` tokens: interpolation search on
    the cut (a few probes: tokens grow about linearly with characters), bisection after a cut the server
    rejects as too long (it says nothing about the count); None when no cut gives it."""
    lo, n_lo = 0, 0  # count(text[:lo]) = n_lo < tokens
    hi, n_hi = len(text) + 1, None  # count(text[:hi]) > tokens (None: unknown or rejected as too long)
    guess = min(len(text), 4 * tokens)
    while hi - lo > 1:
        n = _probe_prompt_tokens(client, url, model, text[:guess])
        if n == tokens:
            return text[:guess]
        if n is not None and n < tokens:
            lo, n_lo = guess, n
        else:
            hi, n_hi = guess, n
        if n is None:
            est = (lo + hi) / 2
        elif n_hi is not None and n_hi > n_lo:
            est = lo + (tokens - n_lo) * (hi - lo) / (n_hi - n_lo)
        else:
            est = lo + (tokens - n_lo) * (lo / n_lo if n_lo > 0 else 4.0)
        guess = int(min(max(round(est), lo + 1), hi - 1))
    return None


def exact_prompts(url: str, model: str, texts: Sequence[str], tokens: int) -> list[str | list[int]]:
    """One prompt of exactly ``tokens`` tokens (as the server counts them) per text.

    With a ``/tokenize`` endpoint (vLLM) the text's ids are cut to length and sent as ids; otherwise the
    text is cut where the server's usage says ``tokens`` (one-token completions as probes; a cut that
    no character gives exactly, rare with BPE merges, is retried one word further into the text)."""
    url = url.rstrip("/")
    out: list[str | list[int]] = []
    with httpx.Client(timeout=300.0) as client:
        for text in texts:
            long = text
            while len(long) < 8 * tokens:
                long += "\n\n" + text
            r = client.post(f"{url}/tokenize", json={"model": model, "prompt": long})
            ids = r.json().get("tokens") if r.status_code == 200 else None
            if isinstance(ids, list) and len(ids) >= tokens:
                out.append([int(t) for t in ids[:tokens]])
                continue
            found = None
            for _ in range(5):
                found = _cut_to_tokens(client, url, model, long, tokens)
                if found is not None:
                    break
                long = long.split(" ", 1)[-1] + " " + long.split(" ", 1)[0]
            if found is None:
                raise RuntimeError(f"prompt: no cut of the text gives exactly {tokens} tokens on {url}")
            out.append(found)
    return out


@dataclass
class ServerInfo:
    """What a server's ``/metrics`` says about its configuration (vLLM names; None = not exported)."""

    speculative_k: int | None  # draft positions of the acceptance counters; None = no speculation
    kv_blocks: int | None  # vllm:cache_config_info num_gpu_blocks: KV blocks of the whole server
    block_size: int | None

    def describe(self) -> str:
        spec = f"speculation with k={self.speculative_k}" if self.speculative_k else "no speculation"
        return f"{spec}, KV {self.kv_blocks} blocks of {self.block_size} tokens"


def _cache_config(text: str) -> dict[str, str]:
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:cache_config_info":
            for sample in family.samples:
                return dict(sample.labels)
    return {}


def _int_label(labels: dict[str, str], name: str) -> int | None:
    try:
        value = int(labels[name])
    except (KeyError, ValueError):
        return None
    return value if value > 0 else None


def server_info(url: str) -> ServerInfo:
    """Read speculation and KV capacity from ``url``/metrics; raises RuntimeError when unreadable.

    vLLM registers its spec-decode counters only when speculation is on, with one per-position series
    per draft token, so their presence and count give the server's num_speculative_tokens."""
    url = url.rstrip("/")
    try:
        r = httpx.get(f"{url}/metrics", timeout=30.0)
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot read {url}/metrics: {exc}") from None
    if r.status_code != 200:
        raise RuntimeError(f"{url}/metrics answered HTTP {r.status_code}")
    snap = parse_counters(r.text)
    k = None
    if snap.drafts is not None:
        k = max(snap.accepted_per_pos, default=-1) + 1 or None
    cache = _cache_config(r.text)
    return ServerInfo(k, _int_label(cache, "num_gpu_blocks"), _int_label(cache, "block_size"))


def check_speculation(info: ServerInfo, configs: Sequence[tuple[str, int]], url: str) -> None:
    """Refuse grid labels the server does not run: ValueError naming the field and both sides."""
    asked = ", ".join(f"{m} k={k}" for m, k in sorted(set(configs)))
    if info.speculative_k is None:
        if any(m != "none" for m, _ in configs):
            raise ValueError(
                f"field 'method': the server at {url} runs no speculation (its /metrics has no "
                f"vllm:spec_decode_* counters) but the grid asks for {asked}; sweep it with --method none "
                "--k 0, or start it with a --speculative-config"
            )
        return
    wrong = sorted({(m, k) for m, k in configs if m == "none" or k != info.speculative_k})
    if wrong:
        raise ValueError(
            f"field 'k': the server at {url} speculates with k={info.speculative_k} (from its /metrics) but "
            f"the grid asks for {', '.join(f'{m} k={k}' for m, k in wrong)}; sweep it with that k only"
        )


def served_model_root(url: str) -> str | None:
    """The model path or id the server was started with (vLLM's ``root`` in ``/v1/models``)."""
    r = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=30.0)
    r.raise_for_status()
    root = r.json()["data"][0].get("root")
    return str(root) if root else None


def served_model_name(url: str) -> str:
    """The first model the server lists at ``/v1/models``."""
    r = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=30.0)
    r.raise_for_status()
    return str(r.json()["data"][0]["id"])


def tokenizer_counter(model_dir: str | Path) -> Callable[[str], int] | None:
    """Token counter from ``model_dir/tokenizer.json`` (for servers that send no usage), else None."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def to_decode_point(spec: PointSpec, result: LoadResult, gpus: int) -> DecodePoint:
    """A profile DecodePoint from one load result.

    ITL statistics are over requests; throughput is output tokens per GPU over the steady window (see
    ``LoadResult.throughput_per_gpu``); the mean number in flight there is logged. Tokens per step come
    from the spec-decode counters (1 without speculation); when a speculating server exports none,
    from tokens per streamed chunk (one chunk per engine step). ``step_ms`` is mean
    ITL x tokens per step: the time of one engine step as a request sees it.
    """
    base = dict(
        tp=spec.tp, method=spec.method, k=spec.k, concurrency=spec.concurrency, context_len=spec.context_len
    )
    itls = result.itl_ms()
    failed = [r.error for r in result.records if r.error]
    if not itls:
        why = failed[0] if failed else "no request produced 2 or more tokens"
        return DecodePoint(**base, error=f"{len(failed)}/{len(result.records)} requests failed: {why}")
    if failed:
        log.warning("%s: %d of %d requests failed: %s", spec, len(failed), len(result.records), failed[0])
    if spec.method == "none":
        tps = 1.0
    elif result.counters is not None and result.counters.decode_steps > 0:
        tps = result.counters.tokens_per_step
    else:
        tps = result.tokens_per_chunk() or 1.0
    stats = md.summarize(itls)
    w = result.steady
    if w is not None:
        log.info(
            "%s: steady window %.2f s of %.2f s, mean %.2f in flight", spec, w.duration_s, result.window_s,
            w.mean_in_flight,
        )  # fmt: skip
    return DecodePoint(
        **base,
        step_ms=stats.mean * max(1.0, tps),
        tokens_per_step=max(1.0, tps),
        itl_ms=stats,
        throughput_per_gpu=result.throughput_per_gpu(gpus),
        samples=len(itls),
    )


def add_counters(a: SpecCounters | None, b: SpecCounters) -> SpecCounters:
    """Counters over two windows together (points of one (method, k) pooled into one acceptance)."""
    if a is None:
        return b
    n = max(len(a.accepted_per_pos), len(b.accepted_per_pos))
    pad = lambda v: v + [0.0] * (n - len(v))  # noqa: E731
    return SpecCounters(
        drafts=a.drafts + b.drafts,
        draft_tokens=a.draft_tokens + b.draft_tokens,
        accepted=a.accepted + b.accepted,
        accepted_per_pos=[
            x + y for x, y in zip(pad(a.accepted_per_pos), pad(b.accepted_per_pos), strict=True)
        ],
        generation_tokens=a.generation_tokens + b.generation_tokens,
        first_tokens=a.first_tokens + b.first_tokens,
    )


def to_acceptance(
    spec: PointSpec,
    result: LoadResult,
    *,
    model: str,
    detail: str | None = None,
    settings: dict[str, str | int | float] | None = None,
    counters: SpecCounters | None = None,
) -> Acceptance | None:
    """Live acceptance of (method, k) from the point's counter deltas (or ``counters``, several points
    pooled); None without drafts. ``settings``: the drafter settings the server ran, when known."""
    c = counters if counters is not None else result.counters
    if c is None or spec.method == "none" or c.drafts <= 0 or c.decode_steps <= 0:
        return None
    per_pos = (c.acceptance_per_pos + [0.0] * spec.k)[: spec.k]
    if len(c.acceptance_per_pos) > spec.k and any(c.acceptance_per_pos[spec.k :]):
        raise ValueError(
            f"server accepted drafts at positions beyond k={spec.k} "
            f"({len(c.acceptance_per_pos)} positions): it does not run the configuration being measured"
        )
    return Acceptance(
        method=spec.method,  # type: ignore[arg-type]
        k=spec.k,
        draft_coverage=c.draft_coverage,
        accepted_per_pos=[min(1.0, max(0.0, a)) for a in per_pos],
        source=AcceptanceSource(
            kind="live", model=model, detail=detail or f"/metrics deltas at concurrency {spec.concurrency}"
        ),
        samples=int(c.decode_steps),
        drafter_settings=settings,
    )
