"""Prompt-lookup (n-gram) proposer: no model, drafts are copied from earlier in the sequence.

For n from ``prompt_lookup_max`` down to ``prompt_lookup_min``, find the most recent earlier
occurrence of the sequence's last n tokens and propose the (up to k) tokens that followed it. Cheap:
one vectorised numpy comparison per n over the sequence (sliding windows), no Python loop over
positions.

When the most recent match ends close to the end of the sequence (a repeating pattern), the
continuation runs into the tokens being drafted; it is extended periodically, i.e. the draft is what
copying would produce if the pattern goes on (``x y x y x`` -> ``y x y x``), instead of stopping after
one or two tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from engine.spec.base import SpecSequence, per_seq_k


def lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Draft for one token array: the continuation of the most recent match of the longest suffix
    n-gram (n_max..n_min) that occurred earlier; ``[]`` when none matches."""
    length = int(tokens.shape[0])
    if k <= 0:
        return []
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n :]
        # Windows starting at 0..length-n-1 (all but the suffix itself); each has a next token.
        windows = sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            draft = tokens[start : start + k].tolist()
            period = length - start  # the copy source lags the draft by this many tokens
            while len(draft) < k:
                draft.append(draft[len(draft) - period])
            return draft
    return []


class NgramProposer:
    """Stateless prompt-lookup drafter (implements engine.spec.base.Proposer)."""

    def __init__(self, prompt_lookup_min: int = 1, prompt_lookup_max: int = 4) -> None:
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({prompt_lookup_min}) must be in "
                f"1..prompt_lookup_max ({prompt_lookup_max})"
            )
        self.n_min, self.n_max = prompt_lookup_min, prompt_lookup_max

    def propose(self, seqs: Sequence[SpecSequence], k: int | Sequence[int]) -> list[list[int]]:
        ks = per_seq_k(k, len(seqs))
        return [
            lookup(np.asarray(s.token_ids, dtype=np.int64), kk, self.n_min, self.n_max)
            for s, kk in zip(seqs, ks, strict=True)
        ]

    def draft_probs(self, seqs: Sequence[SpecSequence]) -> list[torch.Tensor | None]:
        return [None] * len(seqs)

    def commit(self, seq_id: str, num_accepted: int) -> None:
        return None

    def free(self, seq_id: str) -> None:
        return None
