"""The profile document: the contract between the profiler (writer) and the planner (reader).

A profile is one JSON file holding the measured decode, prefill and acceptance surfaces of one model on
one hardware/engine combination, with enough metadata to reproduce it. It is versioned by
``schema_version``; a reader refuses a newer version instead of guessing. Writes are atomic (temp file in
the same directory + ``os.replace``) so a sweep killed mid-write never leaves a truncated profile, and
``append_point`` lets the profiler persist every finished point at once (``--resume`` relies on it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from planner.metrics_def import LatencyStats
from planner.metrics_def import tokens_per_step as _tokens_per_step

SCHEMA_VERSION = 1

Method = Literal["none", "ngram", "draft", "medusa", "eagle", "eagle3", "mtp"]
Backend = Literal["engine", "http", "vllm", "hf"]


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelShape(_Strict):
    """Transformer shape: what step time depends on."""

    layers: int = Field(gt=0)
    hidden: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab: int = Field(gt=0)
    params: int = Field(gt=0, description="total parameter count")


class ModelInfo(_Strict):
    name: str = Field(min_length=1)
    shape: ModelShape


class Hardware(_Strict):
    """Per-replica hardware: ``gpu_name`` is ``"cpu"`` for CPU runs (then memory is host memory)."""

    gpu_name: str = Field(min_length=1)
    gpu_count: int = Field(ge=1)
    gpu_memory_gib: float | None = Field(default=None, gt=0)


class EngineInfo(_Strict):
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)


class Metadata(_Strict):
    model: ModelInfo
    hardware: Hardware
    engine: EngineInfo
    backend: Backend
    dtype: str = Field(min_length=1)
    block_size: int = Field(gt=0)
    kv_capacity_blocks_per_gpu: int = Field(
        ge=0,
        description="KV blocks (all layers and KV heads) one GPU's memory holds next to the weights; "
        "a replica of tp GPUs holds tp times that unless kv_capacity_blocks_by_tp says otherwise",
    )
    kv_capacity_blocks_by_tp: dict[int, int] | None = Field(
        default=None, description="measured KV blocks per replica for a given tp (overrides tp x per-GPU)"
    )
    weights: Literal["real", "random", "none"] = Field(
        description="'none' for a synthetic profile that ran no model at all"
    )
    kv_capacity_model: Literal["engine", "vllm"] | None = Field(
        default=None,
        description="which serving engine's KV admission rule plans apply (kvbm.capacity); "
        "None = from the backend: 'engine' for the engine backend, 'vllm' otherwise",
    )
    source: Literal["measured", "synthetic"]
    created_at: datetime
    command: str = Field(description="the exact command that produced this profile")
    notes: str | None = None


class DecodePoint(_Strict):
    """One measured decode point: ``concurrency`` sequences at ``context_len`` under (tp, method, k).

    A failed point keeps its coordinates and ``error`` (e.g. the KV pool could not hold it) so a resumed
    sweep skips it and the planner knows the region is infeasible rather than unmeasured.
    """

    tp: int = Field(ge=1)
    method: Method
    k: int = Field(ge=0, description="num_speculative_tokens; 0 without speculation")
    concurrency: int = Field(ge=1)
    context_len: int = Field(ge=0)
    draft_ms: float | None = Field(default=None, ge=0)
    verify_ms: float | None = Field(default=None, ge=0)
    step_ms: float | None = Field(default=None, gt=0)
    tokens_per_step: float | None = Field(default=None, ge=1)
    itl_ms: LatencyStats | None = None
    throughput_per_gpu: float | None = Field(default=None, ge=0, description="output tokens/s per GPU")
    kv_usage: float | None = Field(default=None, ge=0, le=1)
    samples: int = Field(default=0, ge=0)
    power_w: float | None = Field(default=None, ge=0)
    joules_per_token: float | None = Field(default=None, ge=0)
    error: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DecodePoint:
        if (self.method == "none") != (self.k == 0):
            raise ValueError(f"method {self.method!r} with k={self.k}: k is 0 exactly when method is 'none'")
        if self.error is None:
            for name in ("step_ms", "tokens_per_step", "itl_ms", "throughput_per_gpu"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name} is required for a decode point without error")
        return self

    @property
    def key(self) -> tuple[int, str, int, int, int]:
        return (self.tp, self.method, self.k, self.concurrency, self.context_len)

    @property
    def ok(self) -> bool:
        return self.error is None


class PrefillPoint(_Strict):
    """Prefill of one sequence of ``input_len`` tokens under tensor parallelism ``tp``."""

    tp: int = Field(ge=1)
    input_len: int = Field(ge=1)
    ttft_ms: float | None = Field(default=None, gt=0)
    prefill_tokens_per_s_per_gpu: float | None = Field(default=None, gt=0)
    samples: int = Field(default=0, ge=0)
    error: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PrefillPoint:
        if self.error is None and (self.ttft_ms is None or self.prefill_tokens_per_s_per_gpu is None):
            raise ValueError("ttft_ms and prefill_tokens_per_s_per_gpu are required without error")
        return self

    @property
    def key(self) -> tuple[int, int]:
        return (self.tp, self.input_len)

    @property
    def ok(self) -> bool:
        return self.error is None


class AcceptanceSource(_Strict):
    """Where an acceptance number came from; a measured one names its dataset and model."""

    kind: Literal["measured", "live", "given"]
    dataset: str | None = None
    model: str | None = None
    drafter: str | None = None
    detail: str | None = None

    @model_validator(mode="after")
    def _measured_names_inputs(self) -> AcceptanceSource:
        if self.kind == "measured" and (not self.dataset or not self.model):
            raise ValueError("a measured acceptance source needs dataset and model")
        return self


class Acceptance(_Strict):
    """Acceptance of (method, k): draft coverage and per-position acceptance given a draft."""

    method: Method
    k: int = Field(ge=1)
    draft_coverage: float = Field(ge=0, le=1, description="share of decode steps that carried a draft")
    accepted_per_pos: list[float] = Field(description="share of drafts whose position i was accepted")
    source: AcceptanceSource
    samples: int = Field(default=0, ge=0, description="decode steps (or drafts) behind the numbers")

    @model_validator(mode="after")
    def _consistent(self) -> Acceptance:
        if self.method == "none":
            raise ValueError("acceptance is defined for a speculative method, not 'none'")
        if len(self.accepted_per_pos) != self.k:
            raise ValueError(f"accepted_per_pos has {len(self.accepted_per_pos)} entries, k is {self.k}")
        for i, a in enumerate(self.accepted_per_pos):
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"accepted_per_pos[{i}]={a} is outside [0, 1]")
        return self

    @property
    def key(self) -> tuple[str, int]:
        return (self.method, self.k)

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens per decode step (see planner.metrics_def)."""
        return _tokens_per_step(self.draft_coverage, self.accepted_per_pos)

    @property
    def tokens_per_draft(self) -> float:
        """Tokens per step given a draft: the optimistic number vLLM's counters suggest on their own."""
        return 1.0 + float(sum(self.accepted_per_pos))


class Profile(_Strict):
    schema_version: int = Field(ge=1, le=SCHEMA_VERSION)
    metadata: Metadata
    decode: list[DecodePoint] = Field(default_factory=list)
    prefill: list[PrefillPoint] = Field(default_factory=list)
    acceptance: list[Acceptance] = Field(default_factory=list)

    def acceptance_for(self, method: str, k: int) -> Acceptance | None:
        for a in self.acceptance:
            if a.method == method and a.k == k:
                return a
        return None

    def upsert(self, item: DecodePoint | PrefillPoint | Acceptance) -> None:
        """Add ``item``, replacing an entry with the same coordinates (a re-measured point)."""
        target: list = {DecodePoint: self.decode, PrefillPoint: self.prefill, Acceptance: self.acceptance}[
            type(item)
        ]
        for i, existing in enumerate(target):
            if existing.key == item.key:
                target[i] = item
                return
        target.append(item)

    def kv_blocks_per_replica(self, tp: int) -> int:
        """KV blocks a replica of ``tp`` GPUs holds (measured per tp when the profile has it)."""
        by_tp = self.metadata.kv_capacity_blocks_by_tp or {}
        return by_tp.get(tp, self.metadata.kv_capacity_blocks_per_gpu * tp)


def new_profile(metadata: Metadata) -> Profile:
    """An empty profile at the current schema version."""
    return Profile(schema_version=SCHEMA_VERSION, metadata=metadata)


def now_utc() -> datetime:
    return datetime.now(UTC)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<document>"


def _describe_error(err: dict) -> str:
    text = f"field '{_loc(tuple(err['loc']))}': {err['msg']}"
    if err["type"] != "missing" and not isinstance(err["input"], dict | list):
        text += f" (got {err['input']!r})"
    return text


def parse_profile(data: object, name: str = "<profile>") -> Profile:
    """Validate a decoded JSON object; errors name ``name`` and every offending field."""
    if not isinstance(data, dict):
        raise ProfileError(f"{name}: top level must be a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version is None:
        raise ProfileError(f"{name}: field 'schema_version' is missing")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProfileError(f"{name}: field 'schema_version' must be an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ProfileError(
            f"{name}: field 'schema_version' is {version}, newer than the supported {SCHEMA_VERSION}; "
            "upgrade the planner to read it"
        )
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe_error(e) for e in exc.errors()[:10])
        more = f" (+{exc.error_count() - 10} more)" if exc.error_count() > 10 else ""
        raise ProfileError(f"{name}: {problems}{more}") from None


def _describe_json_error(text: str, exc: json.JSONDecodeError) -> str:
    """Say where the JSON broke, which field it was in, and whether the file was cut short."""
    keys = _KEY_RE.findall(text[: exc.pos])
    field = f" in field '{keys[-1]}'" if keys else ""
    hint = "" if text.rstrip().endswith("}") else " (the file looks truncated: it does not end with '}')"
    return f"not valid JSON at line {exc.lineno} column {exc.colno}{field}: {exc.msg}{hint}"


_KEY_RE = re.compile(r'"([A-Za-z_][A-Za-z0-9_]*)"\s*:')


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile; any problem raises ProfileError naming the file and field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{p}: {_describe_json_error(text, exc)}") from None
    return parse_profile(data, str(p))


def dump_profile(profile: Profile) -> str:
    return profile.model_dump_json(indent=1, exclude_none=True) + "\n"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so readers see either the old or the new file, never a partial one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a profile is meant to be read by others
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> None:
    """Validate and atomically write ``profile`` as JSON."""
    Profile.model_validate(profile.model_dump())  # re-check invariants after in-place edits
    atomic_write_text(path, dump_profile(profile))


def append_point(
    path: str | os.PathLike[str],
    item: DecodePoint | PrefillPoint | Acceptance,
    metadata: Metadata | None = None,
) -> Profile:
    """Persist one finished point at once: load (or create from ``metadata``), upsert, write atomically.

    Returns the profile as written. Creating a new file requires ``metadata``.
    """
    p = Path(path)
    if p.exists():
        profile = load_profile(p)
    elif metadata is not None:
        profile = new_profile(metadata)
    else:
        raise ProfileError(f"{p}: does not exist and no metadata was given to create it")
    profile.upsert(item)
    save_profile(profile, p)
    return profile
