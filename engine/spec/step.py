"""One speculative decode step split into its two phases, over a target ``ModelRunner`` and its kvbm
manager: ``draft`` (the proposer's work) and ``verify`` (reserve lookahead slots, one target forward
over every sequence's chunk, verification, kvbm commit). The step profiler times the phases
separately with this class; the engine's step loop does the same work around its scheduler.

``pad_drafts=True`` (profiling): every sequence verifies exactly k draft tokens (a short prompt-lookup
draft is padded by repeating its last token), so the verify cost at k is measured even on token ids
that have no n-gram matches. Acceptance numbers from such a run mean nothing; timing does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

import kvbm
from engine.errors import CapacityError
from engine.spec.base import Proposer, SpecSequence
from engine.spec.medusa_decoder import MedusaDecoder
from engine.spec.stats import SpecStats
from engine.spec.verify import verify_chain

if TYPE_CHECKING:
    from engine.runner import ModelRunner
    from engine.spec.config import SpecConfig


@dataclass
class StepOutput:
    seq_id: str
    num_draft_tokens: int
    num_accepted: int
    tokens: list[int]  # tokens to append: accepted drafts + one target token


class SpecStepRunner:
    def __init__(
        self,
        config: SpecConfig,
        runner: ModelRunner,
        kv: kvbm.KVCacheManager,
        *,
        proposer: Proposer | None = None,
        medusa: MedusaDecoder | None = None,
        stats: SpecStats | None = None,
        pad_drafts: bool = False,
    ) -> None:
        self.config, self.runner, self.kv = config, runner, kv
        self.stats = stats if stats is not None else SpecStats()
        self.pad_drafts = pad_drafts
        self.medusa: MedusaDecoder | None = None
        self.proposer: Proposer | None = None
        if config.method == "medusa":
            self.medusa = medusa or MedusaDecoder(config, runner)
            self.stats.max_positions = self.medusa.tree.num_heads
        else:
            from engine.spec import build_proposer

            self.proposer = proposer or build_proposer(config, target=runner)
        if pad_drafts and hasattr(runner, "enable_verify_graphs"):
            # padded drafts give every sequence the same width, the shape a CUDA graph replays (a
            # TPExecutor forwards this to every rank, so all ranks capture the same graphs in step)
            if self.medusa is not None:
                runner.enable_verify_graphs(1 + self.medusa.tree.num_nodes, tree=True)
            else:
                runner.enable_verify_graphs(1 + config.k)

    # -- prefill (tests, benchmarks) -------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq_id: str, prompt: Sequence[int]) -> torch.Tensor:
        """Register ``seq_id`` and compute KV for all of ``prompt``; returns the float32 logits
        ``[V]`` of its last token (the caller samples the first output token from them)."""
        from engine.runner import SeqBatchEntry

        if self.kv.allocate(seq_id, len(prompt), token_ids=list(prompt)) is None:
            raise CapacityError(f"prefill of {seq_id!r}: no room for {len(prompt)} tokens")
        done = self.kv.num_computed_tokens(seq_id)
        ids, pos, meta = self.runner.prepare(
            [SeqBatchEntry(list(prompt[done:]), self.kv.block_table(seq_id), done)]
        )
        hidden, logits = self.runner.execute(ids, pos, meta, self.runner.logits_indices(meta))
        self.kv.commit(seq_id, len(prompt) - done)
        if self.medusa is not None:
            self.medusa.observe([seq_id], hidden[-1:])
        return logits[0]

    def fill_context(self, contexts: dict[str, Sequence[int]], *, seed: int = 0) -> list[SpecSequence]:
        """Profiling setup without a prefill: register each sequence in kvbm and mark all but its
        last token computed (the cache holds whatever it holds; timing depends on shapes only).
        Medusa head state is seeded from random hidden states so every step verifies a full tree.
        The drafter model, if any, catches up on the context during the first (warm-up) draft."""
        for sid, toks in contexts.items():
            n = len(toks) - 1
            if n < 1:
                raise ValueError(f"fill_context: sequence {sid!r} needs >= 2 tokens, got {len(toks)}")
            if self.kv.allocate(sid, n, token_ids=list(toks[:n])) is None:
                raise CapacityError(f"fill_context: no KV room for {sid!r} ({n} tokens)")
            self.kv.commit(sid, n - self.kv.num_computed_tokens(sid))
        if self.medusa is not None and contexts:
            gen = torch.Generator().manual_seed(seed)
            hidden = torch.randn(len(contexts), self.runner.config.hidden_size, generator=gen)
            self.medusa.observe(list(contexts), hidden.to(self.runner.device))
        return [SpecSequence(sid, list(toks)) for sid, toks in contexts.items()]

    # -- draft phase -----------------------------------------------------------------------------------
    def draft(self, seqs: Sequence[SpecSequence]) -> list[list[int]]:
        if self.medusa is not None:
            return self.medusa.propose(seqs)
        assert self.proposer is not None
        drafts = self.proposer.propose(seqs, self.config.k)
        if self.pad_drafts:
            k = self.config.k
            drafts = [
                d + [(d[-1] if d else int(s.token_ids[-1]))] * (k - len(d))
                for d, s in zip(drafts, seqs, strict=True)
            ]
        return drafts

    # -- verify phase ----------------------------------------------------------------------------------
    def _reserve(self, seqs: Sequence[SpecSequence], widths: Sequence[int]) -> None:
        for s, w in zip(seqs, widths, strict=True):
            if self.kv.allocate(s.seq_id, 1, w - 1) is None:
                raise CapacityError(f"verify: no KV room for {s.seq_id!r} ({w} tokens)")

    @torch.inference_mode()
    def verify(self, seqs: Sequence[SpecSequence], drafts: Sequence[list[int]]) -> list[StepOutput]:
        if self.medusa is not None:
            return self._verify_tree(seqs, drafts)
        from engine.runner import SeqBatchEntry

        self._reserve(seqs, [1 + len(d) for d in drafts])
        computed = [self.kv.num_computed_tokens(s.seq_id) for s in seqs]
        entries = [
            SeqBatchEntry([int(s.token_ids[-1]), *d], self.kv.block_table(s.seq_id), n)
            for s, d, n in zip(seqs, drafts, computed, strict=True)
        ]
        ids, pos, meta = self.runner.prepare(entries)
        _, logits = self.runner.execute(ids, pos, meta, None)
        assert self.proposer is not None
        res = verify_chain(
            logits,
            drafts,
            temperatures=[s.temperature for s in seqs],
            top_ps=[s.top_p for s in seqs],
            generators=[s.generator for s in seqs],
            draft_probs=self.proposer.draft_probs(seqs),
        )
        out: list[StepOutput] = []
        for s, d, a, toks in zip(seqs, drafts, res.num_accepted, res.tokens, strict=True):
            self.kv.commit(s.seq_id, 1 + a, token_ids=[int(s.token_ids[-1]), *d[:a]])
            self.proposer.commit(s.seq_id, a)
            self.stats.record(len(d), a)
            out.append(StepOutput(s.seq_id, len(d), a, toks))
        return out

    def _verify_tree(self, seqs: Sequence[SpecSequence], drafts: Sequence[list[int]]) -> list[StepOutput]:
        from engine.runner import SeqBatchEntry

        medusa = self.medusa
        assert medusa is not None
        self._reserve(seqs, [1 + len(d) for d in drafts])
        computed = [self.kv.num_computed_tokens(s.seq_id) for s in seqs]
        tables = [self.kv.block_table(s.seq_id) for s in seqs]
        entries = [
            SeqBatchEntry([int(s.token_ids[-1]), *d], t, n)
            for s, d, t, n in zip(seqs, drafts, tables, computed, strict=True)
        ]
        ids, pos, meta = self.runner.prepare(entries)
        medusa.apply_tree(meta, pos, [len(d) for d in drafts])
        hidden, logits = self.runner.execute(ids, pos, meta, None)
        starts = [0]
        for d in drafts:
            starts.append(starts[-1] + 1 + len(d))
        accepted = medusa.accept_batch(seqs, drafts, logits, starts[:-1], tables, computed)
        out: list[StepOutput] = []
        rows: list[int] = []
        for s, d, r0, (path, toks) in zip(seqs, drafts, starts[:-1], accepted, strict=True):
            self.kv.commit(s.seq_id, len(toks), token_ids=[int(s.token_ids[-1]), *toks[:-1]])
            self.stats.record(len(d), len(path))
            out.append(StepOutput(s.seq_id, len(d), len(path), toks))
            rows.append(r0 + (path[-1] if path else 0))
        medusa.observe([s.seq_id for s in seqs], hidden[torch.tensor(rows, device=hidden.device)])
        return out

    def step(self, seqs: Sequence[SpecSequence]) -> list[StepOutput]:
        return self.verify(seqs, self.draft(seqs))

    def free(self, seq_id: str) -> None:
        if self.kv.has_sequence(seq_id):
            self.kv.free(seq_id)
        if self.proposer is not None:
            self.proposer.free(seq_id)
        if self.medusa is not None:
            self.medusa.free(seq_id)
