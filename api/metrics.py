"""The planner server's own Prometheus metrics (one registry per app, so tests and apps do not collide)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest


class ApiMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.plan_seconds = Histogram(
            "planner_plan_seconds",
            "Server-side time to answer GET /plan (cache hits included)",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=self.registry,
        )
        self.profiles = Gauge("planner_profiles_loaded", "Profiles being served", registry=self.registry)
        self.factor = Gauge(
            "planner_correction_factor",
            "Smoothed observed/predicted ITL",
            ["profile"],
            registry=self.registry,
        )
        self.stale = Gauge(
            "planner_correction_stale", "1 when the last scrape failed", ["profile"], registry=self.registry
        )
        self.tokens_per_step = Gauge(
            "planner_live_tokens_per_step", "Live tokens per decode step", ["profile"], registry=self.registry
        )
        self.resets = Gauge(
            "planner_correction_counter_resets", "Engine counter resets seen", ["profile"],
            registry=self.registry,
        )  # fmt: skip

    def update_daemons(self, daemons: dict) -> None:
        for pid, d in daemons.items():
            st = d.state
            self.factor.labels(pid).set(st.factor)
            self.stale.labels(pid).set(1.0 if st.stale else 0.0)
            self.resets.labels(pid).set(st.counter_resets)
            if st.acceptance is not None:
                self.tokens_per_step.labels(pid).set(st.acceptance.tokens_per_step)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
