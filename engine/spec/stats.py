"""Speculative-decoding counters, counted the way vLLM counts them, so /metrics and the profiler read
the same numbers a real vLLM exports.

Per sequence and decode step (a step where the sequence emits tokens after its prefill):
- ``num_decode_steps`` += 1;
- if the step carried >= 1 draft token: ``num_drafts`` += 1, ``num_draft_tokens`` += len(draft);
- ``num_accepted_tokens`` += accepted drafts, ``accepted_per_pos[i]`` += 1 when position i was accepted.

A step emits ``1 + accepted`` tokens, so tokens per decode step = ``1 + accepted / decode_steps`` =
``1 + draft_coverage * acceptance_given_draft`` with ``draft_coverage = drafts / decode_steps`` and
``acceptance_given_draft = accepted / drafts = sum_i accepted_per_pos[i] / drafts``. The formulas
are the project's metric definitions (``common.metrics``); this module only counts.

Padded drafts (``LLMEngine`` gives a sequence without a draft a repeat of its last token so the batch
keeps one verify width and replays its CUDA graph) are no proposals and never emit a token: the step is
recorded as it would be unpadded, and the pads are counted apart in ``num_pad_tokens``, so coverage and
acceptance (and the vLLM-named /metrics read from them) describe the proposer alone and tokens per step
is exactly ``1 + accepted / decode_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common import metrics as md


@dataclass
class SpecStats:
    num_decode_steps: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    num_pad_tokens: int = 0
    # Wall time spent proposing and verifying (seconds), for logs; the profiler times steps itself.
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    # Positions tracked in accepted_per_pos (None = as many as the longest draft). A Medusa tree
    # verifies ~64 nodes but accepts at most its depth: positions are depths there.
    max_positions: int | None = None

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One sequence's decode step: it carried ``num_draft_tokens`` drafts (0 = no draft) and the
        first ``num_accepted`` of them were accepted."""
        if num_draft_tokens < 0 or not 0 <= num_accepted <= max(num_draft_tokens, 0):
            raise ValueError(
                f"SpecStats.record: need 0 <= num_accepted ({num_accepted}) <= num_draft_tokens "
                f"({num_draft_tokens})"
            )
        self.num_decode_steps += 1
        if num_draft_tokens == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        width = num_draft_tokens if self.max_positions is None else min(num_draft_tokens, self.max_positions)
        if num_accepted > width:
            raise ValueError(f"SpecStats.record: {num_accepted} accepted exceeds max_positions={width}")
        if len(self.accepted_per_pos) < width:
            self.accepted_per_pos.extend([0] * (width - len(self.accepted_per_pos)))
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    def record_padded(self, num_draft_tokens: int, num_accepted: int, num_pad_tokens: int) -> None:
        """One sequence's decode step verified ``num_draft_tokens`` proposed tokens (0: none), of which
        ``num_accepted`` were kept, then carried ``num_pad_tokens`` pads (see ``LLMEngine._pad_drafts``)."""
        self.record(num_draft_tokens, num_accepted)
        self.num_pad_tokens += num_pad_tokens

    def merge(self, other: SpecStats) -> None:
        self.num_decode_steps += other.num_decode_steps
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self.num_pad_tokens += other.num_pad_tokens
        n = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        a = self.accepted_per_pos + [0] * (n - len(self.accepted_per_pos))
        b = other.accepted_per_pos + [0] * (n - len(other.accepted_per_pos))
        self.accepted_per_pos = [x + y for x, y in zip(a, b, strict=True)]
        self.draft_time_s += other.draft_time_s
        self.verify_time_s += other.verify_time_s

    @property
    def tokens_per_step(self) -> float:
        """Output tokens per decode step from the proposer's drafts (1.0 before any step)."""
        return md.tokens_per_step(self.draft_coverage, self.acceptance_rate_per_pos)

    @property
    def draft_coverage(self) -> float:
        """Share of decode steps that carried a draft."""
        return md.draft_coverage(self.num_drafts, self.num_decode_steps)

    @property
    def acceptance_given_draft(self) -> float:
        """Mean accepted draft tokens per draft: ``sum_i accepted_per_pos[i] / drafts``."""
        return sum(self.acceptance_rate_per_pos)

    @property
    def acceptance_rate_per_pos(self) -> list[float]:
        """Probability that draft position i is accepted, given a draft."""
        return md.acceptance_given_draft(self.accepted_per_pos, self.num_drafts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_decode_steps": self.num_decode_steps,
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "accepted_per_pos": list(self.accepted_per_pos),
            "num_pad_tokens": self.num_pad_tokens,
            "tokens_per_step": self.tokens_per_step,
            "draft_coverage": self.draft_coverage,
            "acceptance_given_draft": self.acceptance_given_draft,
            "acceptance_rate_per_pos": self.acceptance_rate_per_pos,
        }
