"""Draft-model proposer: a small decoder with the target's vocabulary drafts k tokens autoregressively.

The drafter runs through the engine's own ``ModelRunner`` (same paged attention, CUDA graphs for its
pure-decode steps on GPU) with its OWN ``kvbm.KVCacheManager`` pool, so its KV follows the same
commit rules as the target's:

- propose: the drafter catches up on the tokens it has no KV for (the whole prompt the first time;
  afterwards the bonus token, plus the last draft when every draft was accepted) in one flattened
  forward, samples draft 1 from the last row, then feeds drafts 1..k-1 one step at a time (batched
  over sequences). kvbm grants ``catch_up + (k - 1)`` slots; nothing is committed yet.
- commit(seq, a): kvbm commits the catch-up tokens plus the accepted drafts that were fed
  (``min(a, k - 1)``); the slots of rejected drafts are past the committed length and go back to
  the pool at once, so rejection is a rollback with nothing to copy.

Drafters: ``draft_model`` (a preset such as ``llama-68m`` with seeded random weights for timing, or
a local HF dir / GGUF), and/or ``draft_layers`` = N: the model truncated to its first N layers (with
no ``draft_model``, the target's own weights: a real self-speculative drafter on CPU).
For temperature > 0 drafts are sampled from the drafter's distribution after the request's
temperature and top-p (``filtered_probs``), with the request's generator, and those distributions are
kept for rejection sampling.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

import kvbm
from engine.errors import ConfigError
from engine.presets import ModelSource, resolve_model
from engine.spec.base import SpecSequence, per_seq_k
from engine.spec.verify import filtered_probs

if TYPE_CHECKING:
    from engine.runner import ModelRunner
    from engine.spec.config import SpecConfig

_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


@dataclass
class _Pending:
    """A proposal waiting for verification: what the drafter computed but has not committed."""

    catch_up: list[int]  # tokens fed in the catch-up chunk (no KV before this step)
    drafts: list[int]
    probs: torch.Tensor | None  # [len(drafts), V] when sampled


def _truncated(source: ModelSource, num_layers: int) -> ModelSource:
    cfg = source.config
    if num_layers > cfg.num_layers:
        raise ConfigError(f"spec draft_layers={num_layers} exceeds the model's num_layers={cfg.num_layers}")
    if num_layers == cfg.num_layers:
        return source
    new_cfg = cfg.replace(name=f"{cfg.name}-first{num_layers}", num_layers=num_layers)
    return dataclasses.replace(source, config=new_cfg)


def _first_layers(
    weights: Iterator[tuple[str, torch.Tensor]], num_layers: int
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        m = _LAYER_RE.match(name)
        if m is None or int(m.group(1)) < num_layers:
            yield name, tensor


# In steady decoding a catch-up is 1 token (the bonus) or 2 (the bonus and the last draft, when every
# draft was accepted), so a batch usually mixes widths 1 and 2 and its forward would run eagerly:
# measured on one H200 (vicuna-7b with llama-68m, concurrency 2), such a step took 13 ms against 7.9 ms
# for a step whose drafter forwards all replayed CUDA graphs. Re-feeding the sequences with a 1-token
# catch-up their previous token too makes every catch-up 2 wide, a shape with a CUDA graph.
UNIFORM_CATCH_UP_WIDTH = 2


class DraftModelProposer:
    """Chain proposer backed by a small model (implements engine.spec.base.Proposer)."""

    def __init__(self, runner: ModelRunner, kv: kvbm.KVCacheManager, *, target_vocab_size: int) -> None:
        if runner.config.vocab_size != target_vocab_size:
            raise ConfigError(
                f"draft model {runner.config.name!r}: vocab_size {runner.config.vocab_size} differs from "
                f"the target's {target_vocab_size}"
            )
        if kv.block_size != runner.block_size or kv.num_blocks > runner.num_blocks:
            raise ConfigError("draft KV manager does not match the draft runner's pool")
        self.runner = runner
        self.kv = kv
        self._pending: dict[str, _Pending] = {}
        runner.enable_verify_graphs(UNIFORM_CATCH_UP_WIDTH)
        # re-feed short catch-ups to one width (_uniform_entries) where that width replays a CUDA graph
        self.uniform_catch_up = runner.has_verify_graphs(UNIFORM_CATCH_UP_WIDTH)

    @classmethod
    def from_target(
        cls,
        config: SpecConfig,
        target: ModelRunner,
        *,
        num_blocks: int | None = None,
        enable_prefix_caching: bool = True,
    ) -> DraftModelProposer:
        """Build the drafter on the target's device, dtype and block size; its pool holds as many
        tokens as the target's unless ``num_blocks`` says otherwise."""
        from engine.runner import ModelRunner
        from engine.weights import iter_weights

        if config.draft_model is None and config.draft_layers is None:
            raise ConfigError("spec method 'draft' needs draft_model or draft_layers, got neither")
        self_spec = config.draft_model is None
        base = target.source if self_spec else resolve_model(config.draft_model, weights=config.draft_weights)
        layers = config.draft_layers or base.config.num_layers
        if base.config.vocab_size != target.config.vocab_size:
            raise ConfigError(
                f"draft model {base.config.name!r}: vocab_size {base.config.vocab_size} differs from "
                f"the target's {target.config.vocab_size}"
            )
        source = _truncated(base, layers)
        blocks = num_blocks or target.num_blocks
        truncated = source is not base
        # Truncated or copied drafters are built with throwaway random weights, then filled.
        build_src = (
            dataclasses.replace(source, weights="random", path=None) if (truncated or self_spec) else source
        )
        runner = ModelRunner(
            build_src,
            dtype=target.dtype,
            device=target.device,
            num_blocks=blocks,
            block_size=target.block_size,
            max_num_seqs=target.max_num_seqs,
            max_model_len=min(target.max_model_len, source.config.max_position_embeddings),
            cuda_graphs=target.decode_graphs is not None,
            seed=config.seed,
        )
        if self_spec and target.tp_size == 1:
            src_state = target.model.state_dict()
            own = runner.model.state_dict()
            with torch.no_grad():
                for key, tensor in own.items():
                    tensor.copy_(src_state[key])
        elif self_spec or (truncated and base.weights != "random"):
            # a tensor-parallel target holds only its shard, so a self-drafter reads the checkpoint
            runner.model.load_weights(
                _first_layers(
                    iter_weights(base, seed=config.seed, dtype=target.dtype, device=target.device), layers
                )
            )
        kv = kvbm.KVCacheManager(blocks, target.block_size, enable_prefix_caching=enable_prefix_caching)
        return cls(runner, kv, target_vocab_size=target.config.vocab_size)

    # -- proposing ---------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, seqs: Sequence[SpecSequence]) -> tuple[list[int], list]:
        """One token per row (greedy rows by argmax); the sampling distribution of sampled rows."""
        tokens = logits.argmax(dim=-1).tolist()
        probs: list[torch.Tensor | None] = [None] * len(seqs)
        for i, s in enumerate(seqs):
            if not s.greedy:
                q = filtered_probs(logits[i], s.temperature, s.top_p)
                tokens[i] = int(torch.multinomial(q, 1, generator=s.generator).item())
                probs[i] = q
        return tokens, probs

    def propose(self, seqs: Sequence[SpecSequence], k: int | Sequence[int]) -> list[list[int]]:
        ks = per_seq_k(k, len(seqs))
        out: list[list[int]] = [[] for _ in seqs]
        active: list[int] = []
        starts: list[int] = []
        for i, (s, kk) in enumerate(zip(seqs, ks, strict=True)):
            self._pending.pop(s.seq_id, None)  # an unverified older proposal is void
            # drafts must fit the drafter's positions
            kk = min(kk, self.runner.max_model_len - len(s.token_ids))
            start = self._reserve(s, kk)
            if start is None:
                continue
            ks[i] = kk
            active.append(i)
            starts.append(start)
        if not active:
            return out
        act_seqs = [seqs[i] for i in active]
        catch_ups = [list(s.token_ids[start:]) for s, start in zip(act_seqs, starts, strict=True)]
        drafts, dprobs = self._draft(act_seqs, [ks[i] for i in active], catch_ups, starts)
        for j, i in enumerate(active):
            out[i] = drafts[j]
            q = torch.stack(dprobs[j]) if dprobs[j] else None
            self._pending[seqs[i].seq_id] = _Pending(catch_ups[j], drafts[j], q)
        return out

    def _reserve(self, s: SpecSequence, k: int) -> int | None:
        """Drafter KV for the tokens it has not seen plus ``k - 1`` lookahead slots; the tokens it has
        already computed (where the catch-up starts), or None when the sequence drafts nothing this step
        (no room for a draft, or the drafter's pool is full)."""
        n = len(s.token_ids)
        if k <= 0 or n == 0:
            return None
        if not self.kv.has_sequence(s.seq_id):
            if self.kv.allocate(s.seq_id, n, k - 1, token_ids=list(s.token_ids)) is None:
                return None
            return self.kv.num_computed_tokens(s.seq_id)
        done = self.kv.num_computed_tokens(s.seq_id)
        if done >= n:
            raise RuntimeError(
                f"draft proposer: sequence {s.seq_id!r} has {done} drafter tokens but only {n} ids"
            )
        if self.kv.allocate(s.seq_id, n - done, k - 1) is None:
            return None
        return done

    def _draft(
        self, seqs: list[SpecSequence], ks: list[int], catch_ups: list[list[int]], starts: list[int]
    ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
        """``ks[j]`` drafts for each sequence, with the distributions of sampled rows: one catch-up
        forward gives draft 1, then one pure-decode step per further draft over the sequences still
        drafting (the shapes CUDA graphs replay)."""
        from engine.runner import SeqBatchEntry

        runner = self.runner
        tables = [self.kv.block_table(s.seq_id) for s in seqs]
        entries = self._uniform_entries(
            [SeqBatchEntry(catch_ups[j], tables[j], starts[j]) for j in range(len(seqs))], seqs
        )
        ids, pos, meta = runner.prepare(entries)
        _, logits = runner.execute(ids, pos, meta, runner.logits_indices(meta))
        tokens, probs = self._sample(logits, seqs)
        drafts = [[t] for t in tokens]
        dprobs: list[list[torch.Tensor]] = [[p] if p is not None else [] for p in probs]
        lens = [starts[j] + len(catch_ups[j]) for j in range(len(seqs))]
        step = 1
        while live := [j for j in range(len(seqs)) if ks[j] > step]:
            entries = [SeqBatchEntry([drafts[j][-1]], tables[j], lens[j] + step - 1) for j in live]
            ids, pos, meta = runner.prepare(entries)
            _, logits = runner.execute(ids, pos, meta, None)
            tokens, probs = self._sample(logits, [seqs[j] for j in live])
            for r, j in enumerate(live):
                drafts[j].append(tokens[r])
                if probs[r] is not None:
                    dprobs[j].append(probs[r])
            step += 1
        return drafts, dprobs

    def _uniform_entries(self, entries: list, seqs: Sequence[SpecSequence]) -> list:
        """The catch-up entries, with each 1-token catch-up widened to ``UNIFORM_CATCH_UP_WIDTH`` by
        re-feeding the token before it, when every catch-up is that narrow (steady decoding).

        The re-fed token's KV slot is its own committed one and gets the same keys and values again
        (same token, position and preceding cache); nothing is allocated or committed for it
        (``_Pending.catch_up`` keeps the real catch-up). Drafts only change what verification accepts,
        never the output, so a last-bit difference from a different GEMM shape is harmless."""
        from engine.runner import SeqBatchEntry

        w = UNIFORM_CATCH_UP_WIDTH
        widths = {len(e.token_ids) for e in entries}
        if not self.uniform_catch_up or widths != {1, w} or any(e.num_computed < 1 for e in entries):
            return entries
        out = []
        for e, s in zip(entries, seqs, strict=True):
            if len(e.token_ids) == w:
                out.append(e)
            else:
                start = e.num_computed - 1
                out.append(SeqBatchEntry(list(s.token_ids[start : start + w]), e.block_table, start))
        return out

    def draft_probs(self, seqs: Sequence[SpecSequence]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for s in seqs:
            p = self._pending.get(s.seq_id)
            out.append(p.probs if p is not None else None)
        return out

    def commit(self, seq_id: str, num_accepted: int) -> None:
        """Keep the catch-up tokens and the accepted drafts whose KV the drafter wrote."""
        p = self._pending.pop(seq_id, None)
        if p is None:
            return
        if not 0 <= num_accepted <= len(p.drafts):
            raise ValueError(f"draft commit: num_accepted={num_accepted} not in 0..{len(p.drafts)}")
        kept = min(num_accepted, len(p.drafts) - 1)  # the last draft was never fed
        ids = p.catch_up + p.drafts[:kept]
        self.kv.commit(seq_id, len(ids), token_ids=ids)

    def free(self, seq_id: str) -> None:
        self._pending.pop(seq_id, None)
        if self.kv.has_sequence(seq_id):
            self.kv.free(seq_id)
