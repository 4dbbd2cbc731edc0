"""A Medusa proposer that knows the greedy continuation, for tests that need deep accepted paths."""

from __future__ import annotations

from collections.abc import Callable


def oracle_propose(med, truth: dict[str, list[int]], prompt_len: dict[str, int], vocab: int) -> Callable:
    """A Medusa ``propose`` that knows the greedy continuation: the nodes on the all-rank-1 path
    (1,), (1, 1), ... carry the true next tokens, every other node a wrong one. Acceptance is then
    high and the accepted nodes sit at tree indices != depth, so their KV must be moved."""
    paths = med.tree.paths

    def propose(seqs, k=None):
        ks = [med.tree.num_heads] * len(seqs) if k is None else ([k] * len(seqs) if isinstance(k, int) else k)
        out = []
        for s, kk in zip(seqs, ks, strict=True):
            if not med.has_state(s.seq_id) or kk < med.tree.num_heads:
                out.append([])
                continue
            done = len(s.token_ids) - prompt_len[s.seq_id]  # outputs so far (root included)
            fut = truth[s.seq_id][done:]
            nodes = []
            for p in paths:
                d = len(p)
                good = d <= len(fut) and all(r == 1 for r in p)
                nodes.append(fut[d - 1] if good else (fut[d - 1] + 1) % vocab if d <= len(fut) else 0)
            out.append(nodes)
        return out

    return propose
