"""The sweep grid: which (tp, method, k, concurrency, context) points to measure, validated up front.

Defaults come from ``configs/sweeps/default.yaml`` (section ``gpu`` or ``cpu`` by the machine); a
``--config`` file and command-line flags override them. Every problem is reported before any
measurement, naming the field and the value.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import configs
from common.methods import EngineMethod, Weights

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = configs.DEFAULT_SWEEP
Backend = Literal["engine", "http", "vllm", "hf"]


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


PositiveInt = Annotated[int, Field(ge=1)]
NonEmpty = Field(min_length=1)


class SweepConfig(BaseModel):
    """A sweep grid, checked when it is built: the field types and bounds below, then the rules that tie
    fields together. Any problem is a ``GridError`` that names each bad field and its value."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: Annotated[str, Field(min_length=1)]  # a model preset name or path
    backend: Backend = "engine"
    tp: Annotated[list[PositiveInt], NonEmpty] = [1]
    method: Annotated[list[EngineMethod], NonEmpty] = ["none"]
    k: Annotated[list[Annotated[int, Field(ge=0)]], NonEmpty] = [0]
    concurrency: Annotated[list[PositiveInt], NonEmpty] = [1]
    context: Annotated[list[PositiveInt], NonEmpty] = [512]
    steps: PositiveInt = 12
    warmup: Annotated[int, Field(ge=0)] = 3
    coverage: Annotated[list[Annotated[float, Field(ge=0.0, le=1.0)]], NonEmpty] = [1.0]  # engine: drafts
    min_repeats: PositiveInt = 1  # engine backend: repeats of `steps` timed steps until the median settles
    max_repeats: PositiveInt = 1
    # relative move of the running median that counts as settled
    repeat_tol: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.02
    prefill_lens: list[PositiveInt] = []
    draft_model: str | None = None
    sla_itl_ms: Annotated[float, Field(gt=0.0)] = 25.0
    acceptance: Annotated[float, Field(ge=0.0, le=1.0)] | None = None  # per-position acceptance
    dtype: str = "auto"
    url: str | None = None  # http backend
    served_model: str | None = None  # http/vllm: the model name requests carry
    vllm_python: str | None = None
    max_tokens: PositiveInt = 64
    requests_per_point: int | None = None  # http: default 2 x concurrency
    # Acceptance: measured with real weights on the shipped Spec-Bench prompts (engine backend), read
    # from the server's counters (http/vllm); never measured with random weights.
    measure_acceptance: bool = True
    acceptance_prompts: PositiveInt = 4  # per Spec-Bench category
    acceptance_batch: PositiveInt = 8  # prompts running at once (sizes the KV pool)
    categories: list[Annotated[str, Field(min_length=1)]] | None = None  # Spec-Bench categories (None: all)
    prompt_lookup_min: PositiveInt | None = None  # ngram window; vLLM's defaults when omitted
    prompt_lookup_max: PositiveInt | None = None
    kv_blocks: PositiveInt | None = None  # http: the server's KV blocks when its /metrics does not say
    weights: Weights | None = None  # http: real|random (a remote server's weights cannot be seen)

    def __init__(self, **fields: Any) -> None:
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise GridError(_describe(exc)) from None

    @model_validator(mode="after")
    def _k_fits_methods(self) -> SweepConfig:
        """Speculative methods are measured at k > 0 and method 'none' at k = 0, so the grid needs both."""
        if any(m != "none" for m in self.method) and not any(k > 0 for k in self.k):
            raise ValueError(f"field 'k': speculative methods {self.method} need some k > 0, got {self.k}")
        if self.method == ["none"] and 0 not in self.k:
            raise ValueError(f"field 'k': method 'none' needs k=0, got {self.k}")
        return self

    @model_validator(mode="after")
    def _bounds_ordered(self) -> SweepConfig:
        """Fields that are the two ends of one range."""
        if self.min_repeats > self.max_repeats:
            raise ValueError(
                f"fields 'min_repeats'/'max_repeats' need 1 <= min_repeats <= max_repeats, got "
                f"{self.min_repeats!r}/{self.max_repeats!r}"
            )
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"field 'prompt_lookup_min' ({lo}) must be <= prompt_lookup_max ({hi})")
        return self

    @model_validator(mode="after")
    def _http_says_where_and_what(self) -> SweepConfig:
        """A remote server is reached by its URL, and its weights cannot be seen from here."""
        if self.backend != "http":
            return self
        if not self.url:
            raise ValueError("field 'url' is required for backend 'http' (e.g. --url http://host:8000)")
        if self.weights is None:
            raise ValueError(
                "field 'weights' is required for backend 'http': a remote server's weights cannot be seen "
                "from here (pass --weights real or --weights random)"
            )
        return self

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
    return SweepConfig(**merged)


def _describe(exc: ValidationError) -> str:
    """One sentence per problem, each naming the field and the value it was given; unknown fields are
    listed once, beside the known ones."""
    parts: list[str] = []
    unknown: list[str] = []
    for err in exc.errors():
        loc = err["loc"]
        if err["type"] == "extra_forbidden":
            unknown.append(str(loc[0]))
        elif err["type"] == "value_error":  # a rule between fields: its message names them
            parts.append(str(err["ctx"]["error"]))
        elif err["type"] == "missing":
            parts.append(f"field '{loc[0]}' is required")
        else:
            where = f"'{loc[0]}'" + "".join(f"[{i}]" for i in loc[1:])
            parts.append(f"field {where}: {err['msg']}, got {err['input']!r}")
    if unknown:
        parts.append(f"unknown sweep field(s) {sorted(unknown)}; known: {sorted(SweepConfig.model_fields)}")
    return "; ".join(parts)


def quick(cfg: SweepConfig) -> SweepConfig:
    """A thinned grid (first/last concurrency and context, smallest and largest k) for smoke runs."""

    def ends(v: list[int]) -> list[int]:
        s = sorted(set(v))
        return s if len(s) <= 2 else [s[0], s[-1]]

    return cfg.model_copy(
        update={
            "concurrency": ends(cfg.concurrency),
            "context": ends(cfg.context),
            "k": ends(cfg.k),
            "steps": min(cfg.steps, 6),
        }
    )
