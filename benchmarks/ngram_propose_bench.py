"""Host cost of prompt-lookup drafting per engine step: ``NgramProposer.propose`` vs the previous
implementation (whole-list conversion each step + one sliding-window comparison per n).

Each timed call is one decode step: every sequence first gains one token, then the batch is proposed
for, as the engine does. Contexts are random tokens, vocab 32000 (matches are rare) and a low-vocab
variant (matches everywhere, so candidate extension does real work). Prints a markdown table of the
median ms per propose call.

Usage: PYTHONPATH=. python3 benchmarks/ngram_propose_bench.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from engine.spec.base import SpecSequence, per_seq_k
from engine.spec.ngram import NgramProposer

BATCHES = (32, 128)
CONTEXTS = (512, 2048)
VOCABS = (32000, 50)
K, N_MIN, N_MAX = 4, 1, 4


def lookup_reference(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """The previous ``engine.spec.ngram.lookup``: one full sliding-window comparison per n."""
    length = int(tokens.shape[0])
    if k <= 0:
        return []
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n :]
        windows = sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            draft = tokens[start : start + k].tolist()
            period = length - start
            while len(draft) < k:
                draft.append(draft[len(draft) - period])
            return draft
    return []


class ReferenceProposer:
    """The previous stateless proposer: converts each sequence's whole token list every call."""

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max

    def propose(self, seqs: Sequence[SpecSequence], k: int | Sequence[int]) -> list[list[int]]:
        ks = per_seq_k(k, len(seqs))
        return [
            lookup_reference(np.asarray(s.token_ids, dtype=np.int64), kk, self.n_min, self.n_max)
            for s, kk in zip(seqs, ks, strict=True)
        ]


def time_propose(proposer: object, batch: int, ctx: int, vocab: int, repeats: int, seed: int) -> float:
    """Median ms of one propose call over ``repeats`` decode steps (after one untimed warm-up step)."""
    rng = np.random.default_rng(seed)
    lists = [rng.integers(0, vocab, size=ctx).tolist() for _ in range(batch)]
    seqs = [SpecSequence(f"s{i}", toks) for i, toks in enumerate(lists)]
    times: list[float] = []
    drafts: list[list[int]] = []
    for step in range(repeats + 1):
        new = rng.integers(0, vocab, size=batch).tolist()
        for toks, t in zip(lists, new, strict=True):
            toks.append(t)
        t0 = time.perf_counter()
        drafts = proposer.propose(seqs, K)  # type: ignore[attr-defined]
        if step:
            times.append((time.perf_counter() - t0) * 1e3)
    assert len(drafts) == batch
    return statistics.median(times)


def check_same_drafts(batch: int, ctx: int, vocab: int, seed: int) -> None:
    """Both implementations draft the same tokens on the benchmark's inputs."""
    rng = np.random.default_rng(seed)
    seqs = [SpecSequence(f"s{i}", rng.integers(0, vocab, size=ctx).tolist()) for i in range(batch)]
    assert NgramProposer(N_MIN, N_MAX).propose(seqs, K) == ReferenceProposer(N_MIN, N_MAX).propose(seqs, K)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    print(f"k={K}, n={N_MIN}..{N_MAX}, median over {args.repeats} steps, ms per propose call\n")
    print("| batch | context | vocab | previous ms | new ms | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for vocab in VOCABS:
        for ctx in CONTEXTS:
            for batch in BATCHES:
                seed = batch * 7 + ctx + vocab
                check_same_drafts(batch, ctx, vocab, seed)
                old = time_propose(ReferenceProposer(N_MIN, N_MAX), batch, ctx, vocab, args.repeats, seed)
                new = time_propose(NgramProposer(N_MIN, N_MAX), batch, ctx, vocab, args.repeats, seed)
                print(f"| {batch} | {ctx} | {vocab} | {old:.3f} | {new:.3f} | {old / new:.1f}x |")


if __name__ == "__main__":
    main()
