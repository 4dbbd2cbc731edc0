"""What the engine hands a proposer, and what every chain proposer offers (the engine-spec contract).

A step with speculation: for each running decode sequence the engine asks the proposer for <= k
draft tokens, reserves ``1 + len(draft)`` KV slots in kvbm, runs ONE target forward over
``[last_token, *draft]`` for all sequences, verifies (engine.spec.verify), commits ``1 + accepted``
tokens in kvbm, and calls ``proposer.commit(seq_id, accepted)`` so a drafter with state (the draft
model's own KV) keeps exactly the accepted prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class SpecSequence:
    """A running sequence as a proposer sees it.

    ``token_ids`` is prompt + output so far; its last token was sampled but has no target KV yet
    (it is the first query token of the verify chunk). ``temperature``/``top_p``/``generator`` are
    the request's sampling parameters: a draft model samples its drafts with the same ones so that
    rejection sampling preserves the target distribution.
    """

    seq_id: str
    token_ids: Sequence[int]
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@runtime_checkable
class Proposer(Protocol):
    """A chain drafter (ngram, draft model)."""

    def propose(self, seqs: Sequence[SpecSequence], k: int | Sequence[int]) -> list[list[int]]:
        """Up to ``k`` (or ``k[i]`` for sequence i) draft tokens per sequence; ``[]`` = no draft."""
        ...

    def draft_probs(self, seqs: Sequence[SpecSequence]) -> list[torch.Tensor | None]:
        """Per sequence, the ``[len(draft), V]`` distributions the last proposal was sampled from
        (None: the draft is deterministic, e.g. prompt lookup or greedy)."""
        ...

    def commit(self, seq_id: str, num_accepted: int) -> None:
        """Verification accepted the first ``num_accepted`` tokens of the last proposal."""
        ...

    def free(self, seq_id: str) -> None:
        """Forget the sequence (finished, aborted or preempted); releases drafter state."""
        ...


def per_seq_k(k: int | Sequence[int], n: int) -> list[int]:
    """Expand an int or a per-sequence list of draft budgets; negatives are a caller bug."""
    ks = [int(k)] * n if isinstance(k, int) else [int(x) for x in k]
    if len(ks) != n:
        raise ValueError(f"propose: got {len(ks)} draft budgets for {n} sequences")
    if any(x < 0 for x in ks):
        raise ValueError(f"propose: draft budgets must be >= 0, got {ks}")
    return ks
