"""The profile document: the contract between the profiler (writer) and the planner (reader).

A profile is one JSON file holding the measured decode, prefill and acceptance surfaces of one model on
one hardware/engine combination, with enough metadata to reproduce it. It is versioned by
``schema_version``; a reader refuses a newer version instead of guessing. Writes are atomic (temp file in
the same directory + ``os.replace``) so a sweep killed mid-write never leaves a truncated profile, and
``append_point`` lets the profiler persist every finished point at once (``--resume`` relies on it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.methods import Method, Weights
from common.metrics import LatencyStats
from common.metrics import tokens_per_step as _tokens_per_step

SCHEMA_VERSION = 1

Backend = Literal["engine", "http", "vllm", "hf"]

# What a profile may declare. The planner evaluates every integer concurrency of a measured range and
# the API serves posted profiles, so an absurd declared range is memory and time on the server: the
# bounds sit far above any real deployment and far below what would hurt.
MAX_TP = 1024
MAX_K = 64
MAX_CONCURRENCY = 65_536
MAX_CONTEXT = 10_000_000
MAX_KV_BLOCKS = 1_000_000_000
MAX_BLOCK_SIZE = 65_536
MAX_INT = 2**53 - 1  # the largest integer every JSON reader keeps exact
MIN_MS, MAX_MS = 1e-6, 1e7  # 1 ns .. ~2.8 h: a step or TTFT outside is a unit or measurement error
MAX_RATE = 1e12  # tokens/s, watts, joules: far above any hardware
MAX_NAME = 200  # model/hardware/engine names end up in file names, commands and page titles
_NAME = r"^[^\x00-\x1f\x7f]+$"  # no control characters (they break logs, headers and file paths)
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=_NAME)]


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the offending field."""


class _Strict(BaseModel):
    # NaN and Infinity are not JSON: accepted, they would be written as null and lost on the next load
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelShape(_Strict):
    """Transformer shape: what step time depends on."""

    layers: int = Field(gt=0, le=MAX_INT)
    hidden: int = Field(gt=0, le=MAX_INT)
    heads: int = Field(gt=0, le=MAX_INT)
    kv_heads: int = Field(gt=0, le=MAX_INT)
    head_dim: int = Field(gt=0, le=MAX_INT)
    vocab: int = Field(gt=0, le=MAX_INT)
    params: int = Field(gt=0, le=MAX_INT, description="total parameter count")


class ModelInfo(_Strict):
    name: Name
    shape: ModelShape


class Hardware(_Strict):
    """Per-replica hardware: ``gpu_name`` is ``"cpu"`` for CPU runs (then memory is host memory)."""

    gpu_name: Name
    gpu_count: int = Field(ge=1, le=MAX_INT)
    gpu_memory_gib: float | None = Field(default=None, gt=0, le=MAX_RATE)


class EngineInfo(_Strict):
    name: Name
    version: Name


class Metadata(_Strict):
    model: ModelInfo
    hardware: Hardware
    engine: EngineInfo
    backend: Backend
    dtype: Name
    block_size: int = Field(gt=0, le=MAX_BLOCK_SIZE)
    kv_capacity_blocks_per_gpu: int = Field(
        ge=0,
        le=MAX_KV_BLOCKS,
        description="KV blocks (all layers and KV heads) one GPU's memory holds next to the weights; "
        "a replica of tp GPUs holds tp times that unless kv_capacity_blocks_by_tp says otherwise",
    )
    kv_capacity_blocks_by_tp: (
        dict[Annotated[int, Field(ge=1, le=MAX_TP)], Annotated[int, Field(ge=0, le=MAX_KV_BLOCKS)]] | None
    ) = Field(
        default=None, description="measured KV blocks per replica for a given tp (overrides tp x per-GPU)"
    )
    weights: Literal[Weights, "none"] = Field(
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
    served_model: str | None = Field(
        default=None,
        description="the model path or id the profiled server was started with (http/vllm backends); "
        "the emitted serve command names it",
    )


class DecodePoint(_Strict):
    """One measured decode point: ``concurrency`` sequences at ``context_len`` under (tp, method, k).

    A failed point keeps its coordinates and ``error`` (e.g. the KV pool could not hold it) so a resumed
    sweep skips it and the planner knows the region is infeasible rather than unmeasured.
    """

    tp: int = Field(ge=1, le=MAX_TP)
    method: Method
    k: int = Field(ge=0, le=MAX_K, description="num_speculative_tokens; 0 without speculation")
    concurrency: int = Field(ge=1, le=MAX_CONCURRENCY)
    context_len: int = Field(ge=0, le=MAX_CONTEXT)
    draft_ms: float | None = Field(default=None, ge=0, le=MAX_MS)
    verify_ms: float | None = Field(default=None, ge=0, le=MAX_MS)
    step_ms: float | None = Field(default=None, ge=MIN_MS, le=MAX_MS)
    tokens_per_step: float | None = Field(default=None, ge=1, le=1 + MAX_K)
    itl_ms: LatencyStats | None = None
    throughput_per_gpu: float | None = Field(
        default=None, ge=0, le=MAX_RATE, description="output tokens/s per GPU"
    )
    kv_usage: float | None = Field(default=None, ge=0, le=1)
    samples: int = Field(default=0, ge=0, le=MAX_INT)
    power_w: float | None = Field(default=None, ge=0, le=MAX_RATE)
    joules_per_token: float | None = Field(default=None, ge=0, le=MAX_RATE)
    error: str | None = None
    phases_ms: dict[str, float] | None = Field(
        default=None, description="median ms per phase of the whole engine step (schedule, propose, ...)"
    )
    repeats: int = Field(default=0, ge=0, description="timing repeats behind the median step time")
    step_ms_spread: float | None = Field(
        default=None, ge=0, description="(p90 - p10) / median of the repeat medians"
    )
    stable: bool | None = Field(default=None, description="False: the timing was noisy")
    draft_coverage: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="share of sequences that verified k drafts (None: method none, or every sequence)",
    )

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
    def coverage(self) -> float:
        """The draft coverage measured at: 0 without speculation; a speculative point without one had
        every sequence verify k drafts (1)."""
        if self.method == "none":
            return 0.0
        return 1.0 if self.draft_coverage is None else self.draft_coverage

    @property
    def key(self) -> tuple[int, str, int, int, int, float]:
        return (self.tp, self.method, self.k, self.concurrency, self.context_len, self.coverage)

    @property
    def ok(self) -> bool:
        return self.error is None


class PrefillPoint(_Strict):
    """Prefill of one sequence of ``input_len`` tokens under tensor parallelism ``tp``."""

    tp: int = Field(ge=1, le=MAX_TP)
    input_len: int = Field(ge=1, le=MAX_CONTEXT)
    ttft_ms: float | None = Field(default=None, ge=MIN_MS, le=MAX_MS)
    prefill_tokens_per_s_per_gpu: float | None = Field(default=None, gt=0, le=MAX_RATE)
    samples: int = Field(default=0, ge=0, le=MAX_INT)
    ttft_ms_spread: float | None = Field(
        default=None, ge=0, description="(p90 - p10) / median of the samples"
    )
    stable: bool | None = Field(default=None, description="False: the timing was noisy")
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

    kind: Literal["measured", "live", "given", "prior"]
    dataset: str | None = None
    model: str | None = None
    drafter: str | None = None
    detail: str | None = None
    citation: str | None = Field(default=None, description="published source of a 'prior' acceptance")

    @model_validator(mode="after")
    def _measured_names_inputs(self) -> AcceptanceSource:
        if self.kind == "measured" and (not self.dataset or not self.model):
            raise ValueError("a measured acceptance source needs dataset and model")
        if self.kind == "prior" and not self.citation:
            raise ValueError("a prior acceptance source needs its citation")
        return self


DrafterSettings = dict[str, str | int | float]

# vLLM's ngram defaults (vllm/config/speculative.py): neither bound given -> 5..5; one given -> both equal.
VLLM_PROMPT_LOOKUP_DEFAULT = 5


def prompt_lookup_window(lookup_min: int | None, lookup_max: int | None) -> tuple[int, int]:
    """The (min, max) n-gram window vLLM runs for the given ``prompt_lookup_min``/``max`` (either None).

    A measured ngram acceptance transfers between engines only under the same window, so every place that
    records or emits one resolves the omitted bounds by this rule."""
    if lookup_min is None and lookup_max is None:
        return VLLM_PROMPT_LOOKUP_DEFAULT, VLLM_PROMPT_LOOKUP_DEFAULT
    lo = lookup_max if lookup_min is None else lookup_min
    hi = lookup_min if lookup_max is None else lookup_max
    assert lo is not None and hi is not None
    if lo > hi:
        raise ValueError(f"prompt_lookup_min={lo} must be <= prompt_lookup_max={hi}")
    return lo, hi


def ngram_settings(lookup_min: int | None, lookup_max: int | None) -> DrafterSettings:
    """``drafter_settings`` of an ngram (prompt lookup) drafter, with vLLM's defaults resolved."""
    lo, hi = prompt_lookup_window(lookup_min, lookup_max)
    return {"prompt_lookup_min": lo, "prompt_lookup_max": hi}


class Acceptance(_Strict):
    """Acceptance of (method, k): draft coverage and per-position acceptance given a draft.

    ``workload`` names the Spec-Bench category the prompts came from (None: the whole mix);
    ``drafter_settings`` records what shapes the drafts (ngram: prompt_lookup_min/max; draft: the
    drafter model; medusa: heads and tree), so a plan uses only acceptance measured under the settings
    it emits. Entries differing in either are kept side by side."""

    method: Method
    k: int = Field(ge=1, le=MAX_K)
    draft_coverage: float = Field(ge=0, le=1, description="share of decode steps that carried a draft")
    accepted_per_pos: list[float] = Field(description="share of drafts whose position i was accepted")
    source: AcceptanceSource
    samples: int = Field(
        default=0, ge=0, le=MAX_INT, description="decode steps (or drafts) behind the numbers"
    )
    workload: str | None = Field(default=None, description="Spec-Bench category; None = the whole mix")
    drafter_settings: DrafterSettings | None = Field(
        default=None, description="prompt_lookup_min/max, drafter model, tree ...; None = not recorded"
    )

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
    def key(self) -> tuple[str, int, str | None, tuple[tuple[str, str], ...]]:
        """(method, k, workload, settings): one entry per drafter configuration and category."""
        settings = tuple(sorted((n, str(v)) for n, v in (self.drafter_settings or {}).items()))
        return (self.method, self.k, self.workload, settings)

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens per decode step (see common.metrics)."""
        return _tokens_per_step(self.draft_coverage, self.accepted_per_pos)

    @property
    def tokens_per_draft(self) -> float:
        """Tokens per step given a draft: the optimistic number vLLM's counters suggest on their own."""
        return 1.0 + float(sum(self.accepted_per_pos))


class Profile(_Strict):
    schema_version: int = Field(ge=1, le=SCHEMA_VERSION, strict=True)
    metadata: Metadata
    decode: list[DecodePoint] = Field(default_factory=list)
    prefill: list[PrefillPoint] = Field(default_factory=list)
    acceptance: list[Acceptance] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_measurement_per_point(self) -> Profile:
        """Two points at the same coordinates cannot be interpolated (upsert never writes them)."""
        for name, items in (("decode", self.decode), ("prefill", self.prefill)):
            first: dict[tuple, int] = {}
            for i, item in enumerate(items):
                j = first.setdefault(item.key, i)
                if j != i:
                    raise ValueError(f"{name}[{i}] repeats the coordinates {item.key} of {name}[{j}]")
        return self

    def acceptance_for(self, method: str, k: int, workload: str | None = None) -> Acceptance | None:
        """The entry for (method, k) and ``workload`` (None: the whole mix), the first one recorded."""
        for a in self.acceptance:
            if a.method == method and a.k == k and a.workload == workload:
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


class ProfileMismatchError(ProfileError):
    """Points measured for one model/engine/hardware would land in a profile made for another."""


class ProfileWriteError(OSError):
    """The profile could not be written (disk full, permissions); the file on disk is unchanged."""


# What makes two sets of points comparable: the same model, engine, hardware, dtype and weights.
_IDENTITY = {
    "model": lambda m: m.model.name,
    "model shape": lambda m: m.model.shape.model_dump(),
    "backend": lambda m: m.backend,
    "engine": lambda m: m.engine.name,
    "hardware": lambda m: m.hardware.gpu_name,
    "dtype": lambda m: m.dtype,
    "weights": lambda m: m.weights,
}


def check_same_identity(existing: Metadata, new: Metadata, path: str | os.PathLike[str]) -> None:
    """Refuse to mix points of different models/engines/hardware in one profile, naming both sides."""
    diffs = [
        f"{name} {get(existing)!r} (in the file) vs {get(new)!r} (this run)"
        for name, get in _IDENTITY.items()
        if get(existing) != get(new)
    ]
    if diffs:
        raise ProfileMismatchError(
            f"{path}: was measured for another setup: {'; '.join(diffs)}. "
            "Write to a new --out file, or delete this one to start over."
        )


@contextlib.contextmanager
def profile_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive advisory lock for a read-modify-write of ``path`` (held on a sidecar ``.lock`` file,
    because the profile itself is replaced atomically and a lock on its old inode would protect nothing).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p.parent / f".{p.name}.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def append_point(
    path: str | os.PathLike[str],
    item: DecodePoint | PrefillPoint | Acceptance,
    metadata: Metadata | None = None,
) -> Profile:
    """Persist one finished point at once: load (or create from ``metadata``), upsert, write atomically.

    The read-modify-write holds ``profile_lock``, so concurrent writers (two sweeps resuming into one
    profile) lose nothing. With ``metadata``, an existing file must describe the same setup
    (``check_same_identity``). Returns the profile as written. Creating a new file requires ``metadata``.
    """
    p = Path(path)
    with profile_lock(p):
        if p.exists():
            profile = load_profile(p)
            if metadata is not None:
                check_same_identity(profile.metadata, metadata, p)
        elif metadata is not None:
            profile = new_profile(metadata)
        else:
            raise ProfileError(f"{p}: does not exist and no metadata was given to create it")
        profile.upsert(item)
        try:
            save_profile(profile, p)
        except OSError as exc:
            raise ProfileWriteError(
                exc.errno, f"cannot write {p}: {exc.strerror or exc}; the file on disk is unchanged"
            ) from exc
    return profile
