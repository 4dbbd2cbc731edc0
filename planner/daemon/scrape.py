"""Parse a Prometheus exposition that uses vLLM's metric names into one snapshot of totals.

Label sets (several engines, model names, finish reasons) are summed; the per-position acceptance
counter is kept per ``position``. A metric the server does not export stays ``None`` so the daemon can
say what it could not observe instead of reading it as zero. Older vLLM names are accepted as fallbacks
(``vllm:time_per_output_token_seconds`` for ITL, ``vllm:gpu_cache_usage_perc`` for KV usage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import httpx
from prometheus_client.parser import text_string_to_metric_families

ITL = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
TTFT = ("vllm:time_to_first_token_seconds",)
RUNNING = ("vllm:num_requests_running",)
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
DRAFTS = ("vllm:spec_decode_num_drafts_total",)
DRAFT_TOKENS = ("vllm:spec_decode_num_draft_tokens_total",)
ACCEPTED = ("vllm:spec_decode_num_accepted_tokens_total",)
ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
GENERATION = ("vllm:generation_tokens_total",)
PROMPT = ("vllm:prompt_tokens_total",)
SUCCESS = ("vllm:request_success_total",)

# Monotone series: a decrease of any of them between scrapes means the engine restarted.
COUNTER_FIELDS = (
    "itl_sum",
    "itl_count",
    "ttft_sum",
    "ttft_count",
    "drafts",
    "draft_tokens",
    "accepted",
    "generation_tokens",
    "prompt_tokens",
    "request_success",
)


@dataclass
class MetricsSnapshot:
    """Totals of one scrape (seconds for latency sums)."""

    itl_sum: float | None = None
    itl_count: float | None = None
    ttft_sum: float | None = None
    ttft_count: float | None = None
    running: float | None = None
    kv_usage: float | None = None
    drafts: float | None = None
    draft_tokens: float | None = None
    accepted: float | None = None
    accepted_per_pos: dict[int, float] = field(default_factory=dict)
    generation_tokens: float | None = None
    prompt_tokens: float | None = None
    request_success: float | None = None

    def counters(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in COUNTER_FIELDS}


def _sum_samples(
    samples: dict[str, list[tuple[dict[str, str], float]]], names: tuple[str, ...]
) -> float | None:
    for name in names:
        if name in samples:
            return float(sum(v for _, v in samples[name]))
    return None


def parse_metrics(text: str) -> MetricsSnapshot:
    """Snapshot of the vLLM series in ``text`` (Prometheus text format 0.0.4)."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("vllm:"):
            continue
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    snap = MetricsSnapshot(
        itl_sum=_sum_samples(samples, tuple(n + "_sum" for n in ITL)),
        itl_count=_sum_samples(samples, tuple(n + "_count" for n in ITL)),
        ttft_sum=_sum_samples(samples, tuple(n + "_sum" for n in TTFT)),
        ttft_count=_sum_samples(samples, tuple(n + "_count" for n in TTFT)),
        running=_sum_samples(samples, RUNNING),
        kv_usage=None,
        drafts=_sum_samples(samples, DRAFTS),
        draft_tokens=_sum_samples(samples, DRAFT_TOKENS),
        accepted=_sum_samples(samples, ACCEPTED),
        generation_tokens=_sum_samples(samples, GENERATION),
        prompt_tokens=_sum_samples(samples, PROMPT),
        request_success=_sum_samples(samples, SUCCESS),
    )
    for name in KV_USAGE:  # a usage fraction: average over engines, not a sum
        if name in samples:
            vals = [v for _, v in samples[name]]
            snap.kv_usage = sum(vals) / len(vals)
            break
    for labels, value in samples.get(ACCEPTED_PER_POS, []):
        pos = labels.get("position")
        if pos is not None and pos.isdigit():
            snap.accepted_per_pos[int(pos)] = snap.accepted_per_pos.get(int(pos), 0.0) + value
    return snap


def has_series(snap: MetricsSnapshot) -> bool:
    """False for a scrape with no vLLM series at all (an empty 200, another exporter): nothing to learn."""
    return bool(snap.accepted_per_pos) or any(
        getattr(snap, f.name) is not None for f in fields(snap) if f.name != "accepted_per_pos"
    )


def _bad_number(name: str, value: float | None) -> str | None:
    if value is not None and (not math.isfinite(value) or value < 0):
        return f"{name} is {value!r}"
    return None


def invalid_snapshot(snap: MetricsSnapshot) -> str | None:
    """Why a scrape cannot be used (a NaN, infinite or negative counter or gauge), else None."""
    values = [(f.name, getattr(snap, f.name)) for f in fields(snap) if f.name != "accepted_per_pos"]
    values += [(f"accepted_per_pos[{p}]", v) for p, v in snap.accepted_per_pos.items()]
    return next((why for why in (_bad_number(n, v) for n, v in values) if why), None)


def invalid_window(w: Window) -> str | None:
    """Why a window cannot be used (a non-finite or negative delta), else None."""
    names = ("itl_sum", "itl_count", "ttft_count", "drafts", "accepted", "generation_tokens", "prompt_tokens",
             "request_success", "running")  # fmt: skip
    values = [(n, getattr(w, n)) for n in names]
    values += [(f"accepted_per_pos[{p}]", v) for p, v in w.accepted_per_pos.items()]
    return next((why for why in (_bad_number(n, v) for n, v in values) if why), None)


async def fetch_bounded(client: httpx.AsyncClient, url: str, timeout_s: float, max_bytes: int) -> bytes:
    """GET ``url``; raise ValueError once the body passes ``max_bytes`` (it is not read further)."""
    async with client.stream("GET", url, timeout=timeout_s) as resp:
        resp.raise_for_status()
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise ValueError(f"response of {int(declared)} bytes is over the {max_bytes}-byte limit")
        chunks, size = [], 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise ValueError(f"response is over the {max_bytes}-byte limit")
            chunks.append(chunk)
    return b"".join(chunks)


def is_reset(prev: MetricsSnapshot, cur: MetricsSnapshot) -> bool:
    """True when any counter went down: the engine restarted and counts began again from zero."""
    for name, value in cur.counters().items():
        before = getattr(prev, name)
        if value is not None and before is not None and value < before:
            return True
    return any(v < prev.accepted_per_pos.get(p, 0.0) for p, v in cur.accepted_per_pos.items())


@dataclass
class Window:
    """Counter increases between two scrapes (after a reset: the counts since the restart)."""

    itl_sum: float | None
    itl_count: float | None
    ttft_count: float | None
    drafts: float | None
    accepted: float | None
    accepted_per_pos: dict[int, float]
    generation_tokens: float | None
    prompt_tokens: float | None
    request_success: float | None
    running: float | None
    kv_usage: float | None
    reset: bool


def window(prev: MetricsSnapshot, cur: MetricsSnapshot) -> Window:
    """Deltas of ``cur`` over ``prev``; gauges are averaged over the two scrapes."""
    reset = is_reset(prev, cur)

    def delta(name: str) -> float | None:
        now, before = getattr(cur, name), getattr(prev, name)
        if now is None:
            return None
        return now if reset or before is None else now - before

    per_pos = {
        p: (v if reset else v - prev.accepted_per_pos.get(p, 0.0)) for p, v in cur.accepted_per_pos.items()
    }
    gauges = {}
    for name in ("running", "kv_usage"):
        vals = [v for v in (getattr(prev, name), getattr(cur, name)) if v is not None]
        gauges[name] = sum(vals) / len(vals) if vals else None
    return Window(
        itl_sum=delta("itl_sum"),
        itl_count=delta("itl_count"),
        ttft_count=delta("ttft_count"),
        drafts=delta("drafts"),
        accepted=delta("accepted"),
        accepted_per_pos=per_pos,
        generation_tokens=delta("generation_tokens"),
        prompt_tokens=delta("prompt_tokens"),
        request_success=delta("request_success"),
        running=gauges["running"],
        kv_usage=gauges["kv_usage"],
        reset=reset,
    )
