"""Speculative decoding for the embedded engine: prompt lookup (ngram), draft model, Medusa trees.

Public API (the engine, profiler and server import from here):
- ``SpecConfig`` (config.py): method, k and method options, validated.
- ``SpecStats`` (stats.py): vLLM-style counters and the derived tokens per step.
- ``SpecSequence``, ``Proposer`` (base.py): the chain-proposer contract; ``build_proposer``.
- ``verify_greedy``, ``verify_chain``, ``verify_tree``, ``filtered_probs`` (verify.py).
- ``NgramProposer`` (ngram.py), ``DraftModelProposer`` (draft.py), ``MedusaHeads``/``MedusaTree``
  (medusa.py), ``MedusaDecoder`` (medusa_decoder.py: a Proposer whose drafts are tree nodes, plus
  ``apply_tree``/``accept``/``observe`` for the engine's verify step).

The speculative step itself (propose, verify, commit, proposer update) is ``LLMEngine.step``, the
one step pipeline that serving and the step profiler both run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.spec.base import Proposer, SpecSequence
from engine.spec.config import SpecConfig
from engine.spec.ngram import NgramProposer
from engine.spec.stats import SpecStats
from engine.spec.verify import (
    VerifyResult,
    filtered_probs,
    verify_chain,
    verify_greedy,
    verify_tree,
)

__all__ = [
    "NgramProposer",
    "Proposer",
    "SpecConfig",
    "SpecSequence",
    "SpecStats",
    "VerifyResult",
    "build_proposer",
    "filtered_probs",
    "verify_chain",
    "verify_greedy",
    "verify_tree",
]


def build_proposer(config: SpecConfig, *, target: Any = None, **kwargs: Any) -> Proposer:
    """The chain proposer for ``config`` (ngram or draft). ``target``: the engine's target
    ``ModelRunner`` (the draft method reads its source, dtype, device and block size from it).
    With ``config.controlled`` the real proposer is wrapped by the controlled-acceptance drafter."""
    if config.controlled is not None:
        from engine.spec.controlled import ControlledProposer

        inner = build_proposer(dataclasses.replace(config, controlled=None), target=target, **kwargs)
        vocab = getattr(getattr(target, "config", None), "vocab_size", None)
        if vocab is None:
            raise ValueError("build_proposer: the controlled drafter needs the target runner (vocabulary)")
        return ControlledProposer(
            inner, config.controlled, vocab_size=int(vocab), bounded_by_inner=config.method == "draft",
            seed=config.seed,
        )  # fmt: skip
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "draft":
        from engine.spec.draft import DraftModelProposer

        if target is None:
            raise ValueError("build_proposer: method 'draft' needs the target runner (target=...)")
        return DraftModelProposer.from_target(config, target, **kwargs)
    raise ValueError(
        f"build_proposer: method {config.method!r} is not a chain method (use engine.spec.medusa)"
    )
