"""The one place where the project's serving metrics are defined.

The profiler (which measures), the planner (which predicts) and the correction daemon (which reads live
counters) all import these functions, so a number called "ITL" or "tokens per step" means the same thing
everywhere. Definitions follow aiperf / genai-perf / Dynamo:

- TTFT: arrival of the first output token minus the time the request was sent.
- ITL (the SLA metric): per request ``(last token time - first token time) / (output tokens - 1)``;
  summarised over requests as mean, p50, p90, p99. Gaps between streamed chunks are *not* ITL (a chunk
  may carry several tokens under speculation) and are reported separately.
- Throughput per GPU: output tokens per second over the measured window divided by the GPUs used.
- Tokens per decode step: ``1 + draft_coverage * sum_i accepted_per_pos[i]`` where draft coverage is
  ``drafts / decode_steps`` and ``accepted_per_pos[i]`` is the share of drafts whose position ``i`` was
  accepted. ``1 + sum_i accepted_per_pos[i]`` alone is the acceptance *given* a draft and overstates the
  speed-up whenever coverage is below one.
- vLLM counts only steps that carried a draft, so over a window of its counters
  ``decode_steps = generation_tokens - accepted_tokens - first_tokens`` (one first token per request that
  started: its first token comes from prefill, not from a decode step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field


class LatencyStats(BaseModel):
    """Mean and percentiles of a latency distribution, in milliseconds."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN/Infinity are not JSON

    mean: float = Field(ge=0)
    p50: float = Field(ge=0)
    p90: float = Field(ge=0)
    p99: float = Field(ge=0)


MAX_TIMING_SPREAD = 0.25  # a measured point whose timing_spread is above this is noisy (flagged unstable)


def timing_spread(samples: Sequence[float]) -> float:
    """(p90 - p10) / median of repeated timings of one point (0 with one sample): how far to trust it."""
    if len(samples) < 2:
        return 0.0
    return (percentile(samples, 90) - percentile(samples, 10)) / percentile(samples, 50)


def percentile(values: Sequence[float], q: float) -> float:
    """Percentile ``q`` (0..100) with linear interpolation between closest ranks (numpy's default).

    Written out so that every component computes percentiles identically without depending on a
    particular numpy version's default method.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be within [0, 100], got {q}")
    data = sorted(float(v) for v in values)
    rank = (len(data) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (rank - lo)


def summarize(values: Sequence[float]) -> LatencyStats:
    """Mean, p50, p90 and p99 of ``values`` (milliseconds)."""
    if not values:
        raise ValueError("cannot summarize an empty sequence")
    return LatencyStats(
        mean=sum(values) / len(values),
        p50=percentile(values, 50),
        p90=percentile(values, 90),
        p99=percentile(values, 99),
    )


def request_itl(first_token_time: float, last_token_time: float, output_tokens: int) -> float | None:
    """ITL of one request in the time unit of the inputs; ``None`` when it has fewer than 2 tokens."""
    if output_tokens < 2:
        return None
    if last_token_time < first_token_time:
        raise ValueError(f"last_token_time {last_token_time} precedes first_token_time {first_token_time}")
    return (last_token_time - first_token_time) / (output_tokens - 1)


def ttft(send_time: float, first_token_time: float) -> float:
    """Time to first token, in the time unit of the inputs."""
    if first_token_time < send_time:
        raise ValueError(f"first_token_time {first_token_time} precedes send_time {send_time}")
    return first_token_time - send_time


def chunk_gaps(chunk_times: Sequence[float]) -> list[float]:
    """Gaps between consecutive streamed chunks: reported on their own, never as ITL."""
    return [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]


def throughput_per_gpu(output_tokens: float, window_s: float, gpus: int) -> float:
    """Output tokens per second over the window, divided by the GPUs that served them."""
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    if gpus <= 0:
        raise ValueError(f"gpus must be > 0, got {gpus}")
    return output_tokens / window_s / gpus


def tokens_per_step(draft_coverage: float, accepted_per_pos: Sequence[float]) -> float:
    """Expected output tokens per decode step: ``1 + coverage * sum(accepted_per_pos)``."""
    return 1.0 + draft_coverage * float(sum(accepted_per_pos))


def acceptance_given_draft(accepted_per_pos_counts: Sequence[float], drafts: float) -> list[float]:
    """Per-position acceptance rate given a draft: ``accepted_at_pos[i] / drafts``."""
    if drafts <= 0:
        return [0.0 for _ in accepted_per_pos_counts]
    return [float(c) / drafts for c in accepted_per_pos_counts]


def draft_coverage(drafts: float, decode_steps: float) -> float:
    """Share of decode steps that carried a draft, clipped to [0, 1]."""
    if decode_steps <= 0:
        return 0.0
    return min(1.0, max(0.0, drafts / decode_steps))


def vllm_decode_steps(generation_tokens: float, accepted_tokens: float, first_tokens: float) -> float:
    """Decode steps over a window of vLLM counters (vLLM does not count steps without a draft).

    Every generated token came either from prefill (one first token per request that started) or from
    a decode step, which emits one token of its own plus the accepted draft tokens.
    """
    return max(0.0, generation_tokens - accepted_tokens - first_tokens)


def itl_from_step(step_ms: float, tokens_per_step_: float) -> float:
    """Mean ITL of a steady decode step: its time spread over the tokens it emits per sequence."""
    if tokens_per_step_ <= 0:
        raise ValueError(f"tokens_per_step must be > 0, got {tokens_per_step_}")
    return step_ms / tokens_per_step_


def decode_throughput_per_gpu(concurrency: float, step_ms: float, tokens_per_step_: float, tp: int) -> float:
    """Output tokens/s per GPU of ``concurrency`` sequences each emitting ``tokens_per_step`` per step."""
    if step_ms <= 0:
        raise ValueError(f"step_ms must be > 0, got {step_ms}")
    if tp <= 0:
        raise ValueError(f"tp must be > 0, got {tp}")
    return concurrency * tokens_per_step_ / (step_ms / 1000.0) / tp
