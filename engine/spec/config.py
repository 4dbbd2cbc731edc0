"""Speculative-decoding configuration: which method, how many draft tokens, and method options.

One validated object travels from the CLI / profiler into the engine, so a bad value fails at once
with the field and the value named, not deep inside a step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from common.methods import SPEC_METHODS, WEIGHT_CHOICES
from engine.errors import ConfigError

VLLM_PROMPT_LOOKUP_DEFAULT = 5  # vllm/config/speculative.py: the window when neither bound is given


def _resolve_lookup(lookup_min: int | None, lookup_max: int | None) -> tuple[int, int]:
    """vLLM's rule for omitted bounds: neither -> 5..5; only one -> the other equals it.

    The planner applies the same rule (planner.profile.prompt_lookup_window); a test holds them equal."""
    if lookup_min is None and lookup_max is None:
        return VLLM_PROMPT_LOOKUP_DEFAULT, VLLM_PROMPT_LOOKUP_DEFAULT
    lo = lookup_max if lookup_min is None else lookup_min
    hi = lookup_min if lookup_max is None else lookup_max
    return int(lo), int(hi)  # type: ignore[arg-type]


Tree = tuple[tuple[int, ...], ...]


def normalize_tree(paths: Sequence[Sequence[int]], *, field_name: str = "tree") -> Tree:
    """Validate a Medusa tree given as a list of paths (each path a list of top-k ranks, one per head)
    and return it sorted breadth-first (by depth, then lexicographically), the node order used for
    the verify chunk. Every prefix of a path must itself be a path (a node's parent exists)."""
    if isinstance(paths, str | bytes) or not isinstance(paths, Sequence):
        raise ConfigError(f"{field_name} must be a list of paths (lists of ints), got {paths!r}")
    out: set[tuple[int, ...]] = set()
    for p in paths:
        if isinstance(p, str | bytes) or not isinstance(p, Sequence) or len(p) == 0:
            raise ConfigError(f"{field_name}: each path must be a non-empty list of ints, got {p!r}")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in p):
            raise ConfigError(f"{field_name}: path {list(p)!r} must hold ints >= 0 (top-k ranks)")
        out.add(tuple(p))
    if not out:
        raise ConfigError(f"{field_name} must hold at least one path, got {paths!r}")
    for p in out:
        if len(p) > 1 and p[:-1] not in out:
            raise ConfigError(f"{field_name}: path {list(p)!r} has no parent path {list(p[:-1])!r}")
    return tuple(sorted(out, key=lambda p: (len(p), p)))


@dataclass
class SpecConfig:
    """What to speculate with.

    method: ``ngram`` (prompt lookup), ``draft`` (a small model with its own KV pool) or ``medusa``
    (extra heads verified as a token tree). ``k`` is num_speculative_tokens for chain methods; for
    Medusa it is the number of heads used (tree depth), and the tree decides the verify width.
    ``draft_model``: preset / path of the drafter (default: the target itself, truncated to
    ``draft_layers`` layers -- a real self-speculative drafter on CPU). ``draft_weights``:
    ``auto|real|random`` for the drafter. ``medusa_heads``: a safetensors / .pt file with Medusa-1
    heads (``medusa_head.{i}...``), or None for seeded random heads (timing only).
    ``tree``: Medusa tree as a list of paths; None = the default ~64-node tree.
    ``controlled``: validation only: ``alpha=0.7,coverage=0.8`` (or a ControlledAcceptance) wraps the
    chain proposer so its drafts are the target's recorded greedy continuation, corrupted to that
    acceptance (engine/spec/controlled.py).
    ``prompt_lookup_min``/``max``: the n-gram window, with vLLM's defaults (see ``_resolve_lookup``),
    so acceptance measured here transfers to a vLLM server given the same settings.
    """

    method: str
    k: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    draft_model: str | None = None
    draft_layers: int | None = None
    draft_weights: str = "auto"
    medusa_heads: str | None = None
    tree: Any = None
    seed: int = 0
    schedule: Any = None  # [[first, last, k], ...]: k by running batch size (chain methods)
    controlled: Any = None  # validation drafter at a known acceptance (engine/spec/controlled.py)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ConfigError(f"spec method must be one of {SPEC_METHODS}, got {self.method!r}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ConfigError(f"spec k (num_speculative_tokens) must be an int >= 1, got {self.k!r}")
        self._check_lookup()
        self._check_drafter()
        self._check_tree()
        self._check_schedule()
        self._check_controlled()

    def _check_lookup(self) -> None:
        """The prompt-lookup (ngram) window; vLLM's rule fills omitted bounds (``_resolve_lookup``)."""
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"spec {name} must be an int >= 1, got {v!r}")
        self.prompt_lookup_min, self.prompt_lookup_max = _resolve_lookup(
            self.prompt_lookup_min, self.prompt_lookup_max
        )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(
                f"spec prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                f"({self.prompt_lookup_max})"
            )

    def _check_drafter(self) -> None:
        """The draft method's drafter: another model, or the target truncated to its first layers."""
        if self.draft_layers is not None and (
            not isinstance(self.draft_layers, int)
            or isinstance(self.draft_layers, bool)
            or self.draft_layers < 1
        ):
            raise ConfigError(f"spec draft_layers must be an int >= 1 or None, got {self.draft_layers!r}")
        if self.draft_weights not in WEIGHT_CHOICES:
            raise ConfigError(f"spec draft_weights must be auto|real|random, got {self.draft_weights!r}")
        if self.method != "draft" and (self.draft_model is not None or self.draft_layers is not None):
            raise ConfigError(
                f"spec draft_model/draft_layers apply to method 'draft' only, got method {self.method!r}"
            )
        if self.method == "draft" and self.draft_model is None and self.draft_layers is None:
            raise ConfigError(
                "spec method 'draft' needs draft_model (a preset or path) or draft_layers (the target "
                "truncated to its first N layers), got neither"
            )

    def _check_tree(self) -> None:
        """Medusa's heads and tree, normalized breadth-first; the tree is at most k heads deep."""
        if self.method != "medusa" and (self.medusa_heads is not None or self.tree is not None):
            raise ConfigError(f"spec medusa_heads/tree apply to method 'medusa' only, got {self.method!r}")
        if self.method == "medusa" and self.tree is not None:
            self.tree = normalize_tree(self.tree)
            depth = max(len(p) for p in self.tree)
            if depth > self.k:
                raise ConfigError(f"spec tree depth {depth} exceeds k={self.k} (number of Medusa heads)")

    def _check_controlled(self) -> None:
        """``controlled`` (validation only): parsed against k; chain methods only."""
        if self.controlled is None:
            return
        from engine.spec.controlled import ControlledAcceptance

        if self.method == "medusa":
            raise ConfigError("spec controlled applies to chain methods (ngram, draft), got 'medusa'")
        if not isinstance(self.controlled, ControlledAcceptance):
            self.controlled = ControlledAcceptance.parse(self.controlled, self.k)
        elif len(self.controlled.accepted_per_pos) != self.k:
            raise ConfigError(
                f"spec controlled acceptance: {len(self.controlled.accepted_per_pos)} positions for "
                f"k={self.k}"
            )

    def _check_schedule(self) -> None:
        """``schedule``: ``[[first, last, k], ...]`` like vLLM's num_speculative_tokens_per_batch_size:
        a step whose running batch holds first..last sequences drafts k tokens (0: none) per sequence;
        other batch sizes draft ``self.k``. Ranges must not overlap and k must be <= ``self.k`` (the KV
        lookahead and the drafter are sized by it)."""
        if self.schedule is None:
            return
        if self.method == "medusa":
            raise ConfigError("spec schedule applies to chain methods (ngram, draft), got method 'medusa'")
        rows = self.schedule
        if isinstance(rows, str | bytes) or not isinstance(rows, Sequence) or not rows:
            raise ConfigError(f"spec schedule must be a non-empty list of [first, last, k], got {rows!r}")
        out: list[tuple[int, int, int]] = []
        for r in rows:
            ok = not isinstance(r, str | bytes) and isinstance(r, Sequence) and len(r) == 3
            if not ok or not all(isinstance(v, int) and not isinstance(v, bool) for v in r):
                raise ConfigError(f"spec schedule: each entry must be [first, last, k] of ints, got {r!r}")
            first, last, k = r
            if not 1 <= first <= last or not 0 <= k <= self.k:
                raise ConfigError(
                    f"spec schedule: entry {list(r)!r} needs 1 <= first <= last and 0 <= k <= {self.k} (k)"
                )
            out.append((first, last, k))
        out.sort()
        for a, b in zip(out, out[1:], strict=False):
            if b[0] <= a[1]:
                raise ConfigError(f"spec schedule: batch sizes {list(a)!r} and {list(b)!r} overlap")
        self.schedule = tuple(out)

    def k_for_batch(self, batch_size: int) -> int:
        """Draft tokens per sequence for a step with ``batch_size`` running sequences."""
        for first, last, k in self.schedule or ():
            if first <= batch_size <= last:
                return k
        return self.k

    @property
    def verify_widths(self) -> list[int]:
        """Query tokens per sequence of a step where every sequence verifies its full draft."""
        ks = {self.k} | {k for _, _, k in self.schedule or ()}
        return sorted(1 + (self.num_lookahead_tokens if k == self.k else k) for k in ks if k > 0)

    def drafter_settings(self) -> dict[str, str | int | float]:
        """What shapes the drafts, as a profile's ``Acceptance.drafter_settings`` records it."""
        if self.method == "ngram":
            return {"prompt_lookup_min": self.prompt_lookup_min, "prompt_lookup_max": self.prompt_lookup_max}
        if self.method == "draft":
            out: dict[str, str | int | float] = {"draft_model": self.draft_model or "target"}
            if self.draft_layers is not None:
                out["draft_layers"] = self.draft_layers
            return out
        tree = "default" if self.tree is None else json.dumps([list(p) for p in self.tree])
        return {"medusa_heads": self.medusa_heads or "random", "tree": tree}

    @property
    def is_tree(self) -> bool:
        return self.method == "medusa"

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots a decode step needs beyond its one real token (kvbm lookahead)."""
        if self.method == "medusa":
            from engine.spec.medusa import resolve_tree

            return len(resolve_tree(self.tree, self.k))  # tree nodes; the root is the real token
        return self.k

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpecConfig:
        known = {
            "method",
            "k",
            "prompt_lookup_min",
            "prompt_lookup_max",
            "draft_model",
            "draft_layers",
            "draft_weights",
            "medusa_heads",
            "tree",
            "seed",
            "schedule",
            "controlled",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"spec config: unknown field(s) {unknown}")
        if "method" not in data or "k" not in data:
            raise ConfigError(f"spec config: fields 'method' and 'k' are required, got {sorted(data)}")
        return cls(**data)
