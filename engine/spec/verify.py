"""Verification of speculated tokens against the target model's logits.

Chain methods (ngram, draft model): the verify forward returns target logits for the rows
``[last_token, d_1, ..., d_m]`` of each sequence; row j scores the token after position j.

- Greedy: accept ``d_j`` while it equals the target's argmax of row j-1; the first mismatch (or the
  row after the last draft) gives the target's own token. Output equals non-speculative greedy.
- Rejection sampling (Leviathan et al., 2023): accept ``d_j`` with probability
  ``min(1, p_j(d_j) / q_j(d_j))``; on rejection sample from ``norm(max(0, p_j - q_j))`` and stop;
  after m acceptances sample a bonus token from ``p_m``. The emitted tokens are distributed exactly
  as sampling from ``p`` token by token. ``p`` is the target's distribution after temperature and
  top-p -- the same transform the plain sampler applies -- and ``q`` the distribution the drafter
  sampled from (the same transform on draft logits). A deterministic drafter (prompt lookup) has
  ``q = one_hot(d_j)``: accept with probability ``p_j(d_j)``, else sample from p_j without d_j.

Tree (Medusa): children of a node carry distinct tokens; greedy accepts the child equal to the
argmax; sampling tries the children in order, accepting child c with probability ``p'(c)`` where p'
is p renormalised over the tokens not yet rejected -- sampling without replacement, so the emitted
token is again distributed exactly as p.

Every random draw uses the request's own ``torch.Generator`` (seeded requests are reproducible
whatever else is in the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sampling import filtered_probs


@dataclass
class VerifyResult:
    """Per sequence: how many drafts were accepted, and the tokens to append
    (the accepted drafts followed by one target token; ``len == accepted + 1``)."""

    num_accepted: list[int]
    tokens: list[list[int]]


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> list[float]:
    return torch.rand(
        n, generator=generator, device=device if generator is None else generator.device
    ).tolist()


def _row_offsets(drafts: Sequence[Sequence[int]]) -> list[int]:
    offs = [0]
    for d in drafts:
        offs.append(offs[-1] + 1 + len(d))
    return offs


def verify_greedy(logits: torch.Tensor, drafts: Sequence[Sequence[int]]) -> VerifyResult:
    """Greedy verification of a flattened batch: ``logits`` has ``sum(1 + len(d))`` rows."""
    offs = _row_offsets(drafts)
    if logits.shape[0] != offs[-1]:
        raise ValueError(f"verify_greedy: {logits.shape[0]} logit rows for {offs[-1]} verify tokens")
    argmax = logits.argmax(dim=-1).tolist()
    accepted: list[int] = []
    tokens: list[list[int]] = []
    for b, draft in enumerate(drafts):
        target = argmax[offs[b] : offs[b + 1]]
        n = 0
        while n < len(draft) and draft[n] == target[n]:
            n += 1
        accepted.append(n)
        tokens.append([*draft[:n], target[n]])
    return VerifyResult(accepted, tokens)


def rejection_sample_one(
    target_probs: torch.Tensor,
    draft: Sequence[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[int, list[int]]:
    """One sequence: ``target_probs`` ``[m + 1, V]``, ``draft_probs`` ``[m, V]`` or None (one-hot
    drafts). Returns (accepted, tokens to append)."""
    m = len(draft)
    if target_probs.shape[0] != m + 1:
        raise ValueError(f"rejection_sample: {target_probs.shape[0]} target rows for {m} drafts")
    if draft_probs is not None and draft_probs.shape[0] != m:
        raise ValueError(f"rejection_sample: {draft_probs.shape[0]} draft rows for {m} drafts")
    if m:
        idx = torch.tensor(list(draft), device=target_probs.device)
        rows = torch.arange(m, device=target_probs.device)
        p_d = target_probs[rows, idx].tolist()
        q_d = draft_probs[rows, idx].tolist() if draft_probs is not None else [1.0] * m
        u = _uniform(m, generator, target_probs.device)
    for j in range(m):
        if u[j] * q_d[j] < p_d[j]:
            continue
        if draft_probs is not None:
            residual = (target_probs[j] - draft_probs[j]).clamp_min_(0.0)
        else:
            residual = target_probs[j].clone()
            residual[draft[j]] = 0.0
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: the residual is empty
            residual = target_probs[j]
        return j, [*draft[:j], _sample(residual, generator)]
    return m, [*draft, _sample(target_probs[m], generator)]


def verify_chain(
    logits: torch.Tensor,
    drafts: Sequence[Sequence[int]],
    *,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    generators: Sequence[torch.Generator | None],
    draft_probs: Sequence[torch.Tensor | None] | None = None,
) -> VerifyResult:
    """Verify a flattened batch mixing greedy (temperature 0) and sampled sequences."""
    offs = _row_offsets(drafts)
    if logits.shape[0] != offs[-1]:
        raise ValueError(f"verify_chain: {logits.shape[0]} logit rows for {offs[-1]} verify tokens")
    n = len(drafts)
    if not (len(temperatures) == len(top_ps) == len(generators) == n):
        raise ValueError("verify_chain: temperatures, top_ps and generators need one entry per sequence")
    if all(t <= 0 for t in temperatures):
        return verify_greedy(logits, drafts)
    argmax = logits.argmax(dim=-1).tolist()
    accepted: list[int] = []
    tokens: list[list[int]] = []
    for b, draft in enumerate(drafts):
        lo, hi = offs[b], offs[b + 1]
        if temperatures[b] <= 0:
            target = argmax[lo:hi]
            a = 0
            while a < len(draft) and draft[a] == target[a]:
                a += 1
            accepted.append(a)
            tokens.append([*draft[:a], target[a]])
            continue
        p = filtered_probs(logits[lo:hi], temperatures[b], top_ps[b])
        q = draft_probs[b] if draft_probs is not None else None
        a, toks = rejection_sample_one(p, draft, q, generators[b])
        accepted.append(a)
        tokens.append(toks)
    return VerifyResult(accepted, tokens)


def verify_tree(
    logits: torch.Tensor,
    node_tokens: Sequence[int],
    children: Sequence[Sequence[int]],
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    argmax: Sequence[int] | None = None,
) -> tuple[list[int], int]:
    """Walk a token tree of one sequence. Node 0 is the root (the last committed token); ``logits``
    row i scores the token after node i; ``children[i]`` lists node i's children (distinct tokens).
    ``argmax``: the rows' argmax when the caller computed it for a whole batch at once (greedy).
    Returns (accepted node indices along the path, excluding the root; the next token)."""
    path: list[int] = []
    node = 0
    if temperature <= 0:
        if argmax is None:
            argmax = logits.argmax(dim=-1).tolist()
        while True:
            want = argmax[node]
            nxt = next((c for c in children[node] if node_tokens[c] == want), None)
            if nxt is None:
                return path, want
            path.append(nxt)
            node = nxt
    while True:
        p = filtered_probs(logits[node], temperature, top_p)
        nxt = None
        for c in children[node]:
            tok = node_tokens[c]
            mass = float(p.sum())
            if mass <= 0.0:
                break
            u = _uniform(1, generator, p.device)[0]
            if u * mass < float(p[tok]):
                nxt = c
                break
            p[tok] = 0.0  # rejected: renormalise over what is left
        if nxt is None:
            if float(p.sum()) <= 0.0:
                p = filtered_probs(logits[node], temperature, top_p)
            return path, _sample(p, generator)
        path.append(nxt)
        node = nxt
