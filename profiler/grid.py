"""The sweep grid: which (tp, method, k, concurrency, context) points to measure, validated up front.

Defaults come from ``configs/sweeps/default.yaml`` (section ``gpu`` or ``cpu`` by the machine); a
``--config`` file and command-line flags override them. Every problem is reported before any
measurement, naming the field and the value.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

import configs
from common.methods import METHODS, WEIGHT_KINDS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = configs.DEFAULT_SWEEP
BACKENDS = ("engine", "http", "vllm", "hf")


class GridError(ValueError):
    """An invalid sweep grid; the message names the field and the value."""


@dataclass(frozen=True)
class PointSpec:
    tp: int
    method: str
    k: int
    concurrency: int
    context_len: int
    coverage: float | None = None  # draft coverage to measure at (engine backend); None: every sequence

    @property
    def key(self) -> tuple[int, str, int, int, int, float]:
        cov = 0.0 if self.method == "none" else (1.0 if self.coverage is None else self.coverage)
        return (self.tp, self.method, self.k, self.concurrency, self.context_len, cov)

    def label(self) -> str:
        cov = "" if self.coverage is None else f" coverage={self.coverage:g}"
        return f"tp={self.tp} {self.method} k={self.k} c={self.concurrency} L={self.context_len}{cov}"


@dataclass
class SweepConfig:
    model: str
    backend: str = "engine"
    tp: list[int] = field(default_factory=lambda: [1])
    method: list[str] = field(default_factory=lambda: ["none"])
    k: list[int] = field(default_factory=lambda: [0])
    concurrency: list[int] = field(default_factory=lambda: [1])
    context: list[int] = field(default_factory=lambda: [512])
    steps: int = 12
    warmup: int = 3
    coverage: list[float] = field(default_factory=lambda: [1.0])  # engine backend: draft coverages
    min_repeats: int = 1  # engine backend: repeats of `steps` timed steps until the median settles
    max_repeats: int = 1
    repeat_tol: float = 0.02  # relative move of the running median that counts as settled
    prefill_lens: list[int] = field(default_factory=list)
    draft_model: str | None = None
    sla_itl_ms: float = 25.0
    acceptance: float | None = None
    dtype: str = "auto"
    url: str | None = None  # http backend
    served_model: str | None = None  # http/vllm: the model name requests carry
    vllm_python: str | None = None
    max_tokens: int = 64
    requests_per_point: int | None = None  # http: default 2 x concurrency
    # Acceptance: measured with real weights on the shipped Spec-Bench prompts (engine backend), read
    # from the server's counters (http/vllm); never measured with random weights.
    measure_acceptance: bool = True
    acceptance_prompts: int = 4  # per Spec-Bench category
    acceptance_batch: int = 8  # prompts running at once (sizes the KV pool)
    categories: list[str] | None = None  # Spec-Bench categories (None: all)
    prompt_lookup_min: int | None = None  # ngram window; vLLM's defaults when omitted
    prompt_lookup_max: int | None = None
    kv_blocks: int | None = None  # http: the server's KV blocks when its /metrics does not say
    weights: str | None = None  # http: real|random (a remote server's weights cannot be seen)

    def validate(self) -> SweepConfig:
        def ints(name: str, lo: int) -> None:
            vals = getattr(self, name)
            if not isinstance(vals, list) or not vals:
                raise GridError(f"field '{name}' must be a non-empty list, got {vals!r}")
            for v in vals:
                if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                    raise GridError(f"field '{name}': every value must be an integer >= {lo}, got {v!r}")

        if not isinstance(self.model, str) or not self.model:
            raise GridError(f"field 'model' must be a model preset name or path, got {self.model!r}")
        if self.backend not in BACKENDS:
            raise GridError(f"field 'backend' must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        ints("tp", 1)
        ints("k", 0)
        ints("concurrency", 1)
        ints("context", 1)
        for m in self.method:
            if m not in METHODS:
                raise GridError(f"field 'method' must hold values from {', '.join(METHODS)}, got {m!r}")
        if not self.method:
            raise GridError("field 'method' must be a non-empty list, got []")
        if any(m != "none" for m in self.method) and not any(k > 0 for k in self.k):
            raise GridError(f"field 'k': speculative methods {self.method} need some k > 0, got {self.k}")
        if "none" in self.method and 0 not in self.k and self.method == ["none"]:
            raise GridError(f"field 'k': method 'none' needs k=0, got {self.k}")
        for name in ("steps", "warmup", "max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "warmup" else 1):
                raise GridError(f"field '{name}' must be a positive integer, got {v!r}")
        for v in self.coverage if isinstance(self.coverage, list) else [self.coverage]:
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                raise GridError(f"field 'coverage': every value must be a number in [0, 1], got {v!r}")
        if not self.coverage:
            raise GridError("field 'coverage' must be a non-empty list, got []")
        if not isinstance(self.min_repeats, int) or not 1 <= self.min_repeats <= self.max_repeats:
            raise GridError(
                f"fields 'min_repeats'/'max_repeats' need 1 <= min_repeats <= max_repeats, got "
                f"{self.min_repeats!r}/{self.max_repeats!r}"
            )
        if not isinstance(self.repeat_tol, int | float) or not 0 < self.repeat_tol < 1:
            raise GridError(f"field 'repeat_tol' must be a number in (0, 1), got {self.repeat_tol!r}")
        for v in self.prefill_lens:
            if not isinstance(v, int) or v < 1:
                raise GridError(f"field 'prefill_lens': every value must be an integer >= 1, got {v!r}")
        if self.backend == "http" and not self.url:
            raise GridError("field 'url' is required for backend 'http' (e.g. --url http://host:8000)")
        if self.sla_itl_ms <= 0:
            raise GridError(f"field 'sla_itl_ms' must be > 0, got {self.sla_itl_ms!r}")
        self._validate_acceptance()
        return self

    def _validate_acceptance(self) -> None:
        for name in ("acceptance_prompts", "acceptance_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GridError(f"field '{name}' must be an integer >= 1, got {v!r}")
        for name in ("prompt_lookup_min", "prompt_lookup_max", "kv_blocks"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise GridError(f"field '{name}' must be an integer >= 1, got {v!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is not None and hi is not None and lo > hi:
            raise GridError(f"field 'prompt_lookup_min' ({lo}) must be <= prompt_lookup_max ({hi})")
        if self.acceptance is not None and not 0.0 <= self.acceptance <= 1.0:
            raise GridError(
                f"field 'acceptance' must be a per-position acceptance in [0, 1], got {self.acceptance!r}"
            )
        if self.weights is not None and self.weights not in WEIGHT_KINDS:
            raise GridError(f"field 'weights' must be real or random, got {self.weights!r}")
        if self.backend == "http" and self.weights is None:
            raise GridError(
                "field 'weights' is required for backend 'http': a remote server's weights cannot be seen "
                "from here (pass --weights real or --weights random)"
            )
        if self.categories is not None and (
            not isinstance(self.categories, list)
            or not all(isinstance(c, str) and c for c in self.categories)
        ):
            raise GridError(
                f"field 'categories' must be a list of Spec-Bench categories, got {self.categories!r}"
            )

    def points(self) -> Iterator[PointSpec]:
        """Grid points; method 'none' pairs only with k=0 and speculative methods only with k>0.

        Ordered so each (tp, method, k) is contiguous (one engine or server per configuration).
        """
        for tp in sorted(set(self.tp)):
            for method in dict.fromkeys(self.method):
                ks = [0] if method == "none" else sorted({k for k in self.k if k > 0})
                for k in ks:
                    for ctx in sorted(set(self.context)):
                        for c in sorted(set(self.concurrency)):
                            for cov in self._coverages(method, c):
                                yield PointSpec(tp, method, k, c, ctx, cov)

    def _coverages(self, method: str, c: int) -> list[float | None]:
        """Draft coverages of a speculative engine point, as ``c`` sequences realise them (c=1 has only
        0 and 1): other backends measure the coverage their drafter really has."""
        if method == "none" or self.backend != "engine":
            return [None]
        return sorted({round(cov * c) / c for cov in self.coverage})


def _section(path: Path, section: str | None) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise GridError(f"--config {path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise GridError(f"--config {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise GridError(f"--config {path}: top level must be a mapping")
    if section and isinstance(data.get(section), dict):
        data = data[section]
    return data


def load_config(
    path: Path | None = None, *, gpu: bool, overrides: dict[str, Any] | None = None
) -> SweepConfig:
    """Defaults for this machine, then the ``path`` file, then ``overrides`` (None values ignored)."""
    section = "gpu" if gpu else "cpu"
    merged: dict[str, Any] = dict(_section(DEFAULT_CONFIG, section))
    if path is not None:
        merged.update(_section(Path(path), section))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = set(SweepConfig.__dataclass_fields__)
    unknown = sorted(set(merged) - known)
    if unknown:
        raise GridError(f"unknown sweep field(s) {unknown}; known: {sorted(known)}")
    try:
        cfg = SweepConfig(**merged)
    except TypeError as exc:
        raise GridError(str(exc)) from None
    return cfg.validate()


def quick(cfg: SweepConfig) -> SweepConfig:
    """A thinned grid (first/last concurrency and context, smallest and largest k) for smoke runs."""

    def ends(v: list[int]) -> list[int]:
        s = sorted(set(v))
        return s if len(s) <= 2 else [s[0], s[-1]]

    return replace(
        cfg,
        concurrency=ends(cfg.concurrency),
        context=ends(cfg.context),
        k=ends(cfg.k),
        steps=min(cfg.steps, 6),
    )
