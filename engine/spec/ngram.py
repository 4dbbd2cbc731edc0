"""Prompt-lookup (n-gram) proposer: no model, drafts are copied from earlier in the sequence.

For n from ``prompt_lookup_max`` down to ``prompt_lookup_min``, find the most recent earlier
occurrence of the sequence's last n tokens and propose the (up to k) tokens that followed it.

When the most recent match ends close to the end of the sequence (a repeating pattern), the
continuation runs into the tokens being drafted; it is extended periodically, i.e. the draft is what
copying would produce if the pattern goes on (``x y x y x`` -> ``y x y x``), instead of stopping after
one or two tokens.

Cost (it runs on the host for every decoding sequence every step): one vectorised comparison of the
context against its last token finds the candidate match ends, and only those candidates are extended
backwards, so a step costs O(L) once plus O(candidates * n_max) rather than n_max full window
comparisons. The proposer keeps each sequence's tokens in a numpy buffer and appends only the tokens
added since the previous step, instead of converting the whole Python token list every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.spec.base import SpecSequence, per_seq_k

_MIN_CAPACITY = 256


def lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Draft for one token array: the continuation of the most recent match of the longest suffix
    n-gram (n_max..n_min) that occurred earlier; ``[]`` when none matches.

    A match of length n ending at position q (q <= L-2, so it has a next token) is followed by
    ``tokens[q + 1:]`` whatever n is, so the draft only depends on which end q wins: the most recent
    one among those with the longest match (capped at n_max)."""
    length = int(tokens.shape[0])
    if k <= 0:
        return []
    n_top = min(n_max, length - 1)
    if n_top < n_min:
        return []
    best_n, best_q = 0, length - 2  # n = 0 (n_min 0) matches anywhere; the most recent is followed by L-1
    if n_top >= 1:
        # Ends of every length-1 match, ascending; each later n keeps those whose match extends back.
        cands = np.flatnonzero(tokens[: length - 1] == tokens[length - 1])
        n = 1
        while cands.size:
            best_n, best_q = n, int(cands[-1])
            if n == n_top:
                break
            # Extend to n + 1: the token n places before the end must equal tokens[L-1-n].
            if cands[0] < n:  # ends too close to the start to hold n + 1 tokens (cands is sorted)
                cands = cands[np.searchsorted(cands, n) :]
            cands = cands[tokens[cands - n] == tokens[length - 1 - n]]
            n += 1
    if best_n < n_min:
        return []
    start = best_q + 1
    draft = tokens[start : start + k].tolist()
    period = length - start  # the copy source lags the draft by this many tokens
    while len(draft) < k:
        draft.append(draft[len(draft) - period])
    return draft


class _TokenBuffer:
    """A sequence's tokens as a growable int64 array, so a step converts only the new tokens."""

    __slots__ = ("data", "size")

    def __init__(self) -> None:
        self.data = np.empty(0, dtype=np.int64)
        self.size = 0

    def sync(self, token_ids: Sequence[int]) -> np.ndarray:
        """Bring the buffer up to ``token_ids`` and return a view of it.

        Appends only the tail when ``token_ids`` extends the cached tokens; rebuilds when it does not
        (it shrank, e.g. a preempted sequence recomputed, or an id reused by another sequence),
        detected by the length and the first and last cached tokens (O(1), not a full compare)."""
        n = len(token_ids)
        size = self.size
        if size and (n < size or token_ids[size - 1] != self.data[size - 1] or token_ids[0] != self.data[0]):
            size = 0
        if n > self.data.shape[0]:
            grown = np.empty(max(n * 2, _MIN_CAPACITY), dtype=np.int64)
            grown[:size] = self.data[:size]
            self.data = grown
        if n > size:
            self.data[size:n] = token_ids[size:n]
        self.size = n
        return self.data[:n]


class NgramProposer:
    """Prompt-lookup drafter (implements engine.spec.base.Proposer).

    Its only state is a token buffer per sequence (a cache, dropped by ``free``); the drafts depend
    on ``token_ids`` alone, exactly as if each call converted the whole list."""

    def __init__(self, prompt_lookup_min: int = 1, prompt_lookup_max: int = 4) -> None:
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({prompt_lookup_min}) must be in "
                f"1..prompt_lookup_max ({prompt_lookup_max})"
            )
        self.n_min, self.n_max = prompt_lookup_min, prompt_lookup_max
        self._buffers: dict[str, _TokenBuffer] = {}

    def propose(self, seqs: Sequence[SpecSequence], k: int | Sequence[int]) -> list[list[int]]:
        ks = per_seq_k(k, len(seqs))
        out: list[list[int]] = []
        for s, kk in zip(seqs, ks, strict=True):
            buf = self._buffers.get(s.seq_id)
            if buf is None:
                buf = self._buffers[s.seq_id] = _TokenBuffer()
            out.append(lookup(buf.sync(s.token_ids), kk, self.n_min, self.n_max))
        return out

    def draft_probs(self, seqs: Sequence[SpecSequence]) -> list[torch.Tensor | None]:
        return [None] * len(seqs)

    def commit(self, seq_id: str, num_accepted: int) -> None:
        return None

    def free(self, seq_id: str) -> None:
        self._buffers.pop(seq_id, None)
