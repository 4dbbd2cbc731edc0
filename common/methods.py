"""Names every package agrees on: speculative methods and weight kinds.

A profile, a sweep grid, the engine's flags and the planner's answers all speak these words; each list
is written here once and the others import it.
"""

from __future__ import annotations

from typing import Literal, get_args

# A method the embedded engine runs ("none" = no speculation).
EngineMethod = Literal["none", "ngram", "draft", "medusa"]
# A method a profile may hold: the engine's, plus those only a profiled vLLM server runs.
Method = Literal[EngineMethod, "eagle", "eagle3", "mtp"]

METHODS: tuple[str, ...] = get_args(EngineMethod)
SPEC_METHODS: tuple[str, ...] = METHODS[1:]  # the engine's speculative methods
PROFILE_METHODS: tuple[str, ...] = get_args(Method)

# Methods whose drafter is a separate checkpoint (a draft model, Medusa heads, an EAGLE head); prompt lookup
# and MTP draft from the target itself.
DRAFTER_METHODS: tuple[str, ...] = ("draft", "medusa", "eagle", "eagle3")

# vLLM's SpeculativeConfig.method where it differs from ours (vLLM 0.32 calls a draft model "draft_model").
_VLLM_METHOD = {"draft": "draft_model"}


def vllm_method(method: str) -> str:
    """vLLM's name for speculative ``method``."""
    return _VLLM_METHOD.get(method, method)


# Weights a run used: a checkpoint's, or seeded random ones at the model's shape (true step times,
# meaningless text and no acceptance).
Weights = Literal["real", "random"]
WEIGHT_KINDS: tuple[str, ...] = get_args(Weights)
WEIGHT_CHOICES: tuple[str, ...] = ("auto", *WEIGHT_KINDS)  # what a user may ask for: auto = real if any
