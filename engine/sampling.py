"""Sampling parameters and the sampler: greedy, or temperature + top-p with a per-request
``torch.Generator`` so a seeded request draws the same tokens whatever else shares its batch.

``filtered_probs`` is the probability transform; speculative rejection sampling (``engine.spec.verify``)
imports it from here, so sampling with and without speculation targets the same distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.errors import RequestError


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    speculate: bool = True  # False: this request never gets drafts, even in a speculating engine
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> SamplingParams:
        """Raise RequestError naming the field and the value; normalises stop/stop_token_ids."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise RequestError(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise RequestError(f"seed must be an int or None, got {self.seed!r}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop = tuple(stop)
        ids = self.stop_token_ids
        if not isinstance(ids, Sequence) or not all(_is_int(i) and i >= 0 for i in ids):
            raise RequestError(f"stop_token_ids must be a list of ints >= 0, got {self.stop_token_ids!r}")
        self.stop_token_ids = tuple(ids)
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if not isinstance(self.speculate, bool):
            raise RequestError(f"speculate must be a bool, got {self.speculate!r}")
        return self


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed % (2**63))
    return gen


def filtered_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution of ``logits`` ``[..., V]``: softmax at ``temperature`` restricted to the
    smallest top-p nucleus (the token that crosses ``top_p`` is kept), renormalised. float32."""
    if temperature <= 0:
        raise ValueError(f"filtered_probs: temperature must be > 0, got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of ``logits`` [N, V] (float32). Greedy rows take the argmax in one call;
    sampled rows draw from their own generator."""
    out = logits.argmax(dim=-1).tolist()
    sampled = [i for i, t in enumerate(temperatures) if t > 0]
    if sampled:
        for i in sampled:
            probs = filtered_probs(logits[i], temperatures[i], top_ps[i])
            out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out
