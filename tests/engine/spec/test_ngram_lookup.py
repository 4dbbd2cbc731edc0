"""Prompt lookup: the candidate-extension ``lookup`` and the buffered ``NgramProposer`` must draft
exactly what the plain definition (longest suffix n-gram, most recent earlier match, periodic
extension) drafts."""

from __future__ import annotations

import numpy as np
import pytest

from engine.spec.base import SpecSequence
from engine.spec.ngram import NgramProposer, lookup


def reference(tokens: list[int], k: int, n_min: int, n_max: int, *, most_recent: bool = True) -> list[int]:
    """The definition, written as plainly as possible: for n from n_max down to n_min, scan match
    start positions from the end; copy what followed the first hit, extended periodically.
    ``most_recent=False`` scans from the start instead: a wrong lookup (the earliest match), to check
    that the random cases can catch it."""
    length = len(tokens)
    if k <= 0:
        return []
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n :]
        starts = range(length - n - 1, -1, -1) if most_recent else range(length - n)
        for p in starts:
            if tokens[p : p + n] == suffix:
                out: list[int] = []
                for i in range(k):
                    j = p + n + i
                    out.append(tokens[j] if j < length else out[j - length])
                return out
    return []


def test_reference_prefers_most_recent_and_longest() -> None:
    # Two earlier matches of the 1-gram "1": the most recent (followed by 3) wins over the first (2).
    assert reference([1, 2, 1, 3, 1], 1, 1, 1) == [3]
    # A 2-gram match (followed by 9) beats a more recent 1-gram match (followed by 3).
    assert reference([5, 1, 9, 1, 3, 5, 1], 1, 1, 2) == [9]
    # Periodic extension: x y x y x -> y x y x.
    assert reference([7, 8, 7, 8, 7], 4, 1, 4) == [8, 7, 8, 7]


@pytest.mark.parametrize(
    ("tokens", "k", "n_min", "n_max", "want"),
    [
        ([], 3, 1, 4, []),
        ([5], 3, 1, 4, []),
        ([5, 5], 3, 1, 4, [5, 5, 5]),
        ([5, 6], 3, 1, 4, []),
        ([1, 2, 3, 4], 2, 1, 4, []),  # no token repeats
        ([1, 2, 1], 0, 1, 4, []),  # k = 0
        ([1, 2, 1, 3, 1], 1, 1, 1, [3]),  # most recent, not first
        ([1, 2, 1, 3, 1], 3, 1, 4, [3, 1, 3]),  # continuation runs into the draft
        ([5, 1, 9, 1, 3, 5, 1], 2, 1, 2, [9, 1]),  # longer n wins over a more recent shorter one
        ([5, 1, 9, 1, 3, 5, 1], 2, 2, 2, [9, 1]),
        ([1, 2, 3, 1], 2, 2, 4, []),  # only a 1-gram match, n_min = 2
        ([7, 8, 7, 8, 7], 4, 1, 4, [8, 7, 8, 7]),  # periodic extension
        ([4, 4, 4, 4], 5, 1, 4, [4, 4, 4, 4, 4]),
        ([1, 2, 3, 1, 2, 3, 1, 2], 5, 1, 3, [3, 1, 2, 3, 1]),
        ([1, 2, 3, 1, 2, 3, 1, 2], 5, 3, 3, [3, 1, 2, 3, 1]),
        ([9, 1, 2, 8, 1, 2], 2, 3, 4, []),  # the 3-gram 9 1 2 / 8 1 2 differs
        ([1, 2], 2, 2, 4, []),  # n_min above the longest possible n
    ],
)
def test_lookup_edge_cases(tokens: list[int], k: int, n_min: int, n_max: int, want: list[int]) -> None:
    assert reference(tokens, k, n_min, n_max) == want
    assert lookup(np.asarray(tokens, dtype=np.int64), k, n_min, n_max) == want


def test_lookup_matches_reference_on_random_arrays() -> None:
    rng = np.random.default_rng(0)
    differs_from_first = 0  # cases where taking the first (not the most recent) match would be wrong
    for _ in range(3000):
        vocab = int(rng.integers(1, 8))
        length = int(rng.integers(0, 60))
        tokens = rng.integers(0, vocab, size=length).tolist()
        k = int(rng.integers(0, 7))
        n_min = int(rng.integers(1, 5))
        n_max = int(rng.integers(n_min, 7))
        want = reference(tokens, k, n_min, n_max)
        got = lookup(np.asarray(tokens, dtype=np.int64), k, n_min, n_max)
        assert got == want, (tokens, k, n_min, n_max)
        if k and want and want != reference(tokens, k, n_min, n_max, most_recent=False):
            differs_from_first += 1
    assert differs_from_first > 100  # the random cases do tell most-recent from first


def test_lookup_accepts_other_integer_dtypes() -> None:
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 1, 4]
    assert lookup(np.asarray(tokens, dtype=np.int32), 3, 1, 4) == reference(tokens, 3, 1, 4)


def _check(prop: NgramProposer, seq_id: str, tokens: list[int], k: int) -> None:
    got = prop.propose([SpecSequence(seq_id, tokens)], k)
    assert got == [reference(tokens, k, prop.n_min, prop.n_max)], (seq_id, tokens)


def test_proposer_grows_step_by_step() -> None:
    rng = np.random.default_rng(1)
    prop = NgramProposer(1, 4)
    a = rng.integers(0, 5, size=30).tolist()
    b = rng.integers(0, 3, size=3).tolist()
    for _ in range(300):  # past the first buffer capacity, so the buffers grow
        # Several tokens per step (accepted drafts) as well as one.
        a.extend(rng.integers(0, 5, size=int(rng.integers(1, 5))).tolist())
        b.append(int(rng.integers(0, 3)))
        got = prop.propose([SpecSequence("a", a), SpecSequence("b", b)], [3, 4])
        assert got == [reference(a, 3, 1, 4), reference(b, 4, 1, 4)]
        prop.commit("a", 1)


def test_proposer_rebuilds_after_free_and_id_reuse() -> None:
    rng = np.random.default_rng(2)
    prop = NgramProposer(1, 3)
    first = rng.integers(0, 4, size=50).tolist()
    _check(prop, "s", first, 4)
    prop.free("s")
    prop.free("never-seen")  # unknown ids are ignored
    second = rng.integers(4, 8, size=70).tolist()  # another sequence reuses the id
    for n in range(60, 71):
        _check(prop, "s", second[:n], 4)


def test_proposer_detects_replaced_tokens_without_free() -> None:
    prop = NgramProposer(1, 4)
    long = [1, 2, 3, 1, 2, 3, 1, 2, 4, 4, 1]
    _check(prop, "s", long, 3)
    # Shorter (a preempted sequence recomputed from fewer tokens).
    _check(prop, "s", [1, 2, 3, 1, 2], 3)
    # Same length or longer, last cached token differs.
    _check(prop, "s", [1, 2, 3, 9, 9], 3)
    _check(prop, "s", [5, 6, 5, 6, 5, 7, 5], 3)
    # Same last cached token, first token differs (another sequence on a reused id).
    _check(prop, "s", [6, 6, 5, 6, 5, 7, 5, 6], 3)
    # Back to a plain extension.
    _check(prop, "s", [6, 6, 5, 6, 5, 7, 5, 6, 5], 3)
    # Only the first token differs and the draft depends on it (a stale buffer would draft []).
    fresh = NgramProposer(1, 4)
    _check(fresh, "t", [1, 5, 6, 7], 3)
    _check(fresh, "t", [4, 5, 6, 7, 4], 3)
    assert fresh.propose([SpecSequence("t", [4, 5, 6, 7, 4])], 3) == [[5, 6, 7]]


def test_proposer_per_sequence_budgets_and_empty_batch() -> None:
    prop = NgramProposer(2, 3)
    assert prop.propose([], 3) == []
    toks = [1, 2, 3, 1, 2, 3, 1, 2]
    got = prop.propose([SpecSequence("x", toks), SpecSequence("y", toks)], [0, 5])
    assert got == [[], reference(toks, 5, 2, 3)]
    assert prop.draft_probs([SpecSequence("x", toks)]) == [None]
