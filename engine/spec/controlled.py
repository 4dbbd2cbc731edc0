"""Controlled-acceptance drafter: speculation at a KNOWN acceptance, for validating predictions.

Random-weight models accept almost no drafts, so a speculative configuration of a 7B model cannot be
checked end to end at a realistic acceptance. This proposer wraps the real proposer of the method
(prompt lookup, draft model): the real one runs on every step, so the drafting COST is real; then its
tokens are replaced by the target's own greedy continuation, corrupted so that

- a sequence carries a draft on a step with probability ``coverage``;
- draft position i is accepted with probability ``accepted_per_pos[i]`` (default ``alpha ** (i + 1)``,
  the rule the planner uses for a given alpha): position i holds the true token with the conditional
  probability ``a[i] / a[i - 1]``, and chain verification stops at the first wrong token.

Where the greedy continuation comes from: every sequence the engine runs passes through ``propose``
each step with its tokens so far; when it finishes, ``free`` stores them. A later request with the same
prompt (greedy, so the same continuation) then gets true tokens to corrupt. A validation run therefore
sends its prompt set once to record (that pass accepts nothing: its drafts are wrong tokens of the same
length, so its cost is the same) and measures a second pass. Sampled requests (temperature > 0) keep
the real proposer's drafts. Where the recorded continuation runs out (the last step or two of a request,
which no propose call saw) or differs from the sequence, the draft is wrong tokens, so the acceptance
measured on the server's counters can fall slightly short of the target: predictions use the measured one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import ConfigError
from engine.spec.base import Proposer, SpecSequence, per_seq_k

KEY_TOKENS = 8  # records are indexed by their first tokens; shorter prompts are never matched


@dataclass(frozen=True)
class ControlledAcceptance:
    """Target draft coverage and per-position acceptance (given a draft) of the controlled drafter."""

    accepted_per_pos: tuple[float, ...]
    coverage: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.coverage <= 1.0:
            raise ConfigError(f"spec controlled coverage must be in [0, 1], got {self.coverage!r}")
        prev = 1.0
        for i, a in enumerate(self.accepted_per_pos):
            if not 0.0 <= a <= prev:
                raise ConfigError(
                    f"spec controlled acceptance: position {i} is {a!r}; each must be in [0, 1] and "
                    f"<= the one before (a chain cannot accept position i without i - 1), got "
                    f"{list(self.accepted_per_pos)}"
                )
            prev = a

    @classmethod
    def parse(cls, text: str, k: int) -> ControlledAcceptance:
        """``alpha=0.7,coverage=0.8`` or ``acceptance=0.9:0.7:0.5,coverage=1`` (one value per position)."""
        fields: dict[str, str] = {}
        for part in str(text).split(","):
            if not part.strip():
                continue
            name, sep, value = part.partition("=")
            if not sep or name.strip() not in ("alpha", "acceptance", "coverage"):
                raise ConfigError(
                    f"spec controlled: expected alpha=A or acceptance=A0:A1:..., and coverage=C, got {part!r}"
                )
            fields[name.strip()] = value.strip()
        if ("alpha" in fields) == ("acceptance" in fields):
            raise ConfigError(f"spec controlled: give exactly one of alpha= or acceptance=, got {text!r}")
        try:
            coverage = float(fields.get("coverage", "1"))
            if "alpha" in fields:
                alpha = float(fields["alpha"])
                if not 0.0 <= alpha <= 1.0:
                    raise ConfigError(f"spec controlled alpha must be in [0, 1], got {alpha!r}")
                per_pos = [alpha ** (i + 1) for i in range(k)]
            else:
                per_pos = [float(x) for x in fields["acceptance"].split(":")]
        except ValueError as exc:
            raise ConfigError(f"spec controlled: not a number in {text!r}: {exc}") from None
        if len(per_pos) != k:
            raise ConfigError(f"spec controlled acceptance: {len(per_pos)} positions for k={k} in {text!r}")
        return cls(tuple(per_pos), coverage)

    def conditional(self) -> list[float]:
        """P(position i holds the true token), so that P(positions 0..i all true) = accepted_per_pos[i]."""
        out, prev = [], 1.0
        for a in self.accepted_per_pos:
            out.append(a / prev if prev > 0 else 0.0)
            prev = a
        return out


class ControlledProposer:
    """Wraps a chain proposer (implements engine.spec.base.Proposer); see the module docstring.

    ``bounded_by_inner``: drafts never exceed what the wrapped proposer drafted (a draft model keeps KV
    for its own drafts and commits at most that many); prompt lookup drafts every covered sequence.
    """

    def __init__(
        self,
        inner: Proposer,
        target: ControlledAcceptance,
        *,
        vocab_size: int,
        bounded_by_inner: bool,
        seed: int = 0,
        max_records: int = 4096,
    ) -> None:
        if vocab_size < 2:
            raise ValueError(f"controlled drafter: vocab_size must be >= 2, got {vocab_size}")
        self.inner = inner
        self.target = target
        self.vocab_size = vocab_size
        self.bounded_by_inner = bounded_by_inner
        self._q = target.conditional()
        self._rng = np.random.default_rng(seed)
        self._live: dict[str, Sequence[int]] = {}  # latest tokens seen per running sequence
        self._match: dict[str, tuple[np.ndarray, int]] = {}  # record a sequence follows, tokens checked
        self._inner_len: dict[str, int] = {}
        self._index: dict[tuple[int, ...], list[np.ndarray]] = {}
        self._order: deque[tuple[tuple[int, ...], np.ndarray]] = deque()
        self._max_records = max_records

    # -- recorded greedy continuations --------------------------------------------------------------
    def _record(self, tokens: Sequence[int]) -> None:
        if len(tokens) <= KEY_TOKENS:
            return
        rec = np.asarray(tokens, dtype=np.int64)
        key = tuple(int(t) for t in rec[:KEY_TOKENS])
        self._index.setdefault(key, []).append(rec)
        self._order.append((key, rec))
        while len(self._order) > self._max_records:
            old_key, old = self._order.popleft()
            bucket = self._index[old_key]
            bucket.remove(next(r for r in bucket if r is old))
            if not bucket:
                del self._index[old_key]

    def _find(self, ids: np.ndarray) -> np.ndarray | None:
        """The longest record that starts with ``ids`` and goes beyond it."""
        n = ids.shape[0]
        if n < KEY_TOKENS:
            return None
        best = None
        for rec in self._index.get(tuple(int(t) for t in ids[:KEY_TOKENS]), ()):
            if (
                rec.shape[0] > n
                and np.array_equal(rec[:n], ids)
                and (best is None or rec.shape[0] > best.shape[0])
            ):
                best = rec
        return best

    def truth(self, seq: SpecSequence, n: int) -> list[int]:
        """Up to ``n`` tokens of the recorded greedy continuation of ``seq`` ([] when none is known)."""
        length = len(seq.token_ids)
        hit = self._match.get(seq.seq_id)
        if hit is not None:
            rec, checked = hit
            new = np.asarray(seq.token_ids[checked:], dtype=np.int64)
            if rec.shape[0] <= length or not np.array_equal(rec[checked:length], new):
                hit = None
        if hit is None:
            rec = self._find(np.asarray(seq.token_ids, dtype=np.int64))
            if rec is None:
                self._match.pop(seq.seq_id, None)
                return []
        self._match[seq.seq_id] = (rec, length)
        return rec[length : length + n].tolist()

    def _wrong(self, token: int | None) -> int:
        """A token that is not ``token`` (any token when the truth is unknown)."""
        if token is None:
            return int(self._rng.integers(0, self.vocab_size))
        return int((token + 1 + self._rng.integers(0, self.vocab_size - 1)) % self.vocab_size)

    # -- Proposer -----------------------------------------------------------------------------------
    def propose(self, seqs: Sequence[SpecSequence], k: int | Sequence[int]) -> list[list[int]]:
        ks = per_seq_k(k, len(seqs))
        inner = self.inner.propose(seqs, ks)  # the real drafting cost
        out: list[list[int]] = []
        for s, kk, drafted in zip(seqs, ks, inner, strict=True):
            self._live[s.seq_id] = s.token_ids
            self._inner_len[s.seq_id] = len(drafted)
            if not s.greedy:
                out.append(list(drafted))
                continue
            n = min(kk, len(drafted)) if self.bounded_by_inner else kk
            if n <= 0 or self._rng.random() >= self.target.coverage:
                out.append([])
                continue
            true = self.truth(s, n)
            draft: list[int] = []
            correct = True
            for i in range(n):
                t = true[i] if i < len(true) else None
                correct = correct and t is not None and self._rng.random() < self._q[i]
                draft.append(t if correct else self._wrong(t))  # type: ignore[arg-type]
            out.append(draft)
        return out

    def draft_probs(self, seqs: Sequence[SpecSequence]) -> list[Any]:
        inner = self.inner.draft_probs(seqs)
        return [p if not s.greedy else None for s, p in zip(seqs, inner, strict=True)]

    def commit(self, seq_id: str, num_accepted: int) -> None:
        self.inner.commit(seq_id, min(num_accepted, self._inner_len.get(seq_id, num_accepted)))

    def free(self, seq_id: str) -> None:
        self.inner.free(seq_id)
        self._inner_len.pop(seq_id, None)
        self._match.pop(seq_id, None)
        tokens = self._live.pop(seq_id, None)
        if tokens is not None:
            self._record(list(tokens))
