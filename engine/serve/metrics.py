"""Prometheus metrics with vLLM's names, types, label sets and buckets.

Anything built to read a vLLM server (dashboards, the planner's correction daemon, the profiler's
http backend) reads this one unchanged. Names and labels were checked against the exposition of a
real vLLM (see tests/engine/serve/test_metrics_vs_vllm.py, which compares them); the recording rules
follow vLLM v1's ``IterationStats``:

- prompt tokens of a request count in the step that produced its first token;
- TTFT is observed once per request (arrival at the front end -> first token out of ``step()``);
- inter-token latency is observed once per request per later step that gave it tokens (a step that
  accepts several speculative tokens is one observation, as in vLLM);
- finished requests (``stop``, ``length``, ``abort``) feed ``request_success`` and the per-request
  histograms; spec-decode counters are only registered when speculation is on.

Each server owns its ``CollectorRegistry`` so several servers can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "FINISH_REASONS", "ServeMetrics", "build_1_2_5_buckets"]

# vLLM's FinishReason values (v0.32), in its order; request_success has a series for each from the
# start. "error" is an internal failure (the engine raised in a step); "repetition" is vLLM's
# hallucination guard, which this engine does not have, so that series stays at 0.
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(m * scale)
        scale *= 10


@dataclass
class FinishedRequest:
    """What the front end knows about a request when it ends."""

    finish_reason: str
    e2e_latency: float
    num_prompt_tokens: int
    num_generation_tokens: int
    max_tokens_param: int | None
    # Time from the first token to the last (0 when fewer than two tokens): vLLM's decode time.
    decode_time: float


class ServeMetrics:
    """The metric families of one served model (engine index 0), with vLLM-style record methods."""

    def __init__(self, model_name: str, *, max_model_len: int, num_spec_tokens: int = 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.labels = {"model_name": model_name, "engine": "0"}
        labelnames = ["model_name", "engine"]
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labelnames, registry=reg).labels(**self.labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labelnames, registry=reg).labels(**self.labels)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, labelnames, buckets=list(buckets), registry=reg).labels(**self.labels)

        token_buckets = build_1_2_5_buckets(max_model_len)

        # Scheduler state.
        self.num_requests_running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self.num_requests_waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        )
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )

        # Token counters.
        self.num_preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labelnames, "finished_reason"],
            registry=reg,
        )
        self.request_success = {r: success.labels(**self.labels, finished_reason=r) for r in FINISH_REASONS}

        # Per-request and per-step token histograms.
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKEN_BUCKETS,
        )
        self.request_max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            token_buckets,
        )
        self.request_params_n = histogram(
            "vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS
        )
        self.request_params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", token_buckets
        )

        # Latencies.
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            TOKEN_LATENCY_BUCKETS,
        )
        self.request_time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            TOKEN_LATENCY_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )

        # Speculative decoding (registered only when on, as vLLM does).
        self.num_spec_tokens = num_spec_tokens
        if num_spec_tokens > 0:
            self.spec_num_drafts = counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.")
            self.spec_num_draft_tokens = counter(
                "vllm:spec_decode_num_draft_tokens", "Number of draft tokens."
            )
            self.spec_num_accepted_tokens = counter(
                "vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens."
            )
            per_pos = Counter(
                "vllm:spec_decode_num_accepted_tokens_per_pos",
                "Accepted tokens per draft position.",
                [*labelnames, "position"],
                registry=reg,
            )
            self.spec_accepted_per_pos = [
                per_pos.labels(**self.labels, position=str(i)) for i in range(num_spec_tokens)
            ]

    # -- recording ------------------------------------------------------------------------------
    def set_scheduler_state(self, *, running: int, waiting: int, kv_usage: float) -> None:
        self.num_requests_running.set(running)
        self.num_requests_waiting.set(waiting)
        self.kv_cache_usage.set(kv_usage)

    def record_prefix_cache(self, *, queries: int, hits: int) -> None:
        if queries:
            self.prefix_cache_queries.inc(queries)
        if hits:
            self.prefix_cache_hits.inc(hits)

    def record_preemptions(self, count: int) -> None:
        if count:
            self.num_preemptions.inc(count)

    def record_iteration(
        self,
        *,
        num_prompt_tokens: int,
        num_generation_tokens: int,
        ttfts: Sequence[float],
        itls: Sequence[float],
    ) -> None:
        """One engine step: prompt tokens of requests whose first token came out, tokens generated."""
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_generation_tokens)
        if num_prompt_tokens + num_generation_tokens:
            self.iteration_tokens.observe(num_prompt_tokens + num_generation_tokens)
        for t in ttfts:
            self.time_to_first_token.observe(t)
        for t in itls:
            self.inter_token_latency.observe(t)

    def record_new_request(self, *, max_tokens: int, n: int = 1) -> None:
        """At arrival: vLLM observes the requested maximum generation length and ``n``."""
        self.request_max_num_generation_tokens.observe(max_tokens)
        self.request_params_n.observe(n)

    def record_finished(self, req: FinishedRequest) -> None:
        if req.finish_reason not in self.request_success:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {req.finish_reason!r}")
        self.request_success[req.finish_reason].inc()
        self.e2e_request_latency.observe(req.e2e_latency)
        self.request_decode_time.observe(req.decode_time)
        self.request_prompt_tokens.observe(req.num_prompt_tokens)
        self.request_generation_tokens.observe(req.num_generation_tokens)
        if req.num_generation_tokens > 1:
            self.request_time_per_output_token.observe(req.decode_time / (req.num_generation_tokens - 1))
        if req.max_tokens_param:
            self.request_params_max_tokens.observe(req.max_tokens_param)

    def record_spec(
        self, *, drafts: int, draft_tokens: int, accepted_tokens: int, accepted_per_pos: Sequence[int]
    ) -> None:
        """Increments since the last call (the front end diffs the engine's cumulative SpecStats)."""
        if self.num_spec_tokens <= 0:
            return
        self.spec_num_drafts.inc(drafts)
        self.spec_num_draft_tokens.inc(draft_tokens)
        self.spec_num_accepted_tokens.inc(accepted_tokens)
        for counter, value in zip(self.spec_accepted_per_pos, accepted_per_pos, strict=False):
            if value:
                counter.inc(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
