"""Running sequences without a prefill, for the step profiler and the start-up warm-up.

Both need the engine to step a batch of ``c`` decoding sequences at a chosen context, every one of them
verifying a full draft where asked, without the prompts, prefills and acceptance of real traffic:
``add_random_running`` enters them as running requests whose KV is already there (what the cache holds
does not change a step's time), and ``PaddedDrafts`` pads prompt lookup's drafts, which find nothing
on random tokens, to the step's k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from engine.sampling import SamplingParams
from engine.spec.base import SpecSequence

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from engine.spec import SpecConfig


class PaddedDrafts:
    """The engine's proposer, its drafts padded to each sequence's budget (timing only: random token
    contexts give prompt lookup no matches, and the cost to measure is verifying k drafts)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def propose(self, seqs: Sequence[SpecSequence], k: int | Sequence[int]) -> list[list[int]]:
        ks = [k] * len(seqs) if isinstance(k, int) else list(k)
        drafts = self.inner.propose(seqs, k)
        return [
            d + [(d[-1] if d else int(s.token_ids[-1]))] * (kk - len(d)) if kk > 0 else d
            for d, s, kk in zip(drafts, seqs, ks, strict=True)
        ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def random_token_proposer(proposer: Any, spec: SpecConfig | None) -> Any:
    """The proposer to step random-token sequences with: prompt lookup's drafts padded to k (it finds
    nothing on random tokens); a draft model drafts k itself (and its KV bookkeeping must not see
    padding), and a Medusa tree is full once its heads have state."""
    return PaddedDrafts(proposer) if spec is not None and spec.method == "ngram" else proposer


def add_random_running(
    engine: LLMEngine,
    ids: Sequence[str],
    length: int,
    generator: torch.Generator,
    *,
    num_drafting: int,
) -> None:
    """Enter ``ids`` as running requests of ``length`` random tokens (``LLMEngine.add_running_decode``);
    the first ``num_drafting`` speculate, the others carry no draft. A Medusa proposer gets head state
    from random hidden states, so every drafting step verifies a full tree."""
    vocab = engine.config.vocab_size
    for i, rid in enumerate(ids):
        params = SamplingParams(max_tokens=engine.max_model_len, ignore_eos=True, speculate=i < num_drafting)
        toks = torch.randint(0, vocab, (length,), generator=generator).tolist()
        engine.add_running_decode(rid, toks, params)
    if engine.spec is not None and engine.spec.is_tree:
        hidden = torch.randn(len(ids), engine.config.hidden_size, generator=generator)
        engine.proposer.observe(list(ids), hidden.to(engine.runner.device))
