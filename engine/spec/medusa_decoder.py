"""Medusa decoding step over the target runner: candidates from the heads, one tree-masked verify
forward, tree walk, KV compaction of the accepted path.

State per sequence: the heads' top-k token ids at the sequence's last verified position (computed
from that position's final hidden state). A sequence without state (its first decode step, unless
the engine passed its prefill hidden state to ``observe``) verifies just its root -- a plain decode
step -- which seeds the state; it counts as a decode step without a draft.

Division of work with the engine (the same shape as the chain path):
1. ``num_lookahead(seq_id)``: the engine reserves ``1 + num_lookahead`` KV slots in kvbm;
2. ``propose(seqs)``: node tokens per sequence (the draft phase; cheap, no model call);
3. ``verify(seqs, proposals, tables, num_computed)``: one forward over every sequence's tree, walk,
   copy the accepted nodes' KV to contiguous slots, refresh head state; returns the tokens to append
   (``accepted + 1``) and the accepted count;
4. the engine commits ``1 + accepted`` tokens (ids ``[root, *accepted]``) in kvbm, which releases
   the rest of the tree's slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.errors import ConfigError
from engine.spec.base import SpecSequence
from engine.spec.medusa import MedusaHeads, MedusaTree, compact_accepted_kv, resolve_tree
from engine.spec.verify import verify_tree

if TYPE_CHECKING:
    from engine.runner import ModelRunner
    from engine.spec.config import SpecConfig


@dataclass
class TreeProposal:
    """One sequence's verify chunk: ``tokens`` [N] (root first); ``tree`` None = root only."""

    tokens: list[int]
    tree: MedusaTree | None

    @property
    def num_draft_tokens(self) -> int:
        return len(self.tokens) - 1


@dataclass
class TreeResult:
    num_accepted: int
    tokens: list[int]  # accepted node tokens + the next token


class MedusaDecoder:
    def __init__(self, config: SpecConfig, runner: ModelRunner, heads: MedusaHeads | None = None) -> None:
        self.runner = runner
        cfg = runner.config
        if heads is None:
            if config.medusa_heads is not None:
                heads = MedusaHeads.load(config.medusa_heads)
            else:
                heads = MedusaHeads.random(cfg.hidden_size, cfg.vocab_size, config.k, seed=config.seed)
        if heads.hidden_size != cfg.hidden_size or heads.vocab_size != cfg.vocab_size:
            raise ConfigError(
                f"Medusa heads (hidden {heads.hidden_size}, vocab {heads.vocab_size}) do not fit model "
                f"{cfg.name!r} (hidden {cfg.hidden_size}, vocab {cfg.vocab_size})"
            )
        self.tree = MedusaTree.build(resolve_tree(config.tree, config.k))
        if heads.num_heads < self.tree.num_heads:
            raise ConfigError(
                f"Medusa tree needs {self.tree.num_heads} heads, the heads file has {heads.num_heads}"
            )
        self.heads = heads.to(device=runner.device, dtype=runner.dtype)
        self._mask = self.tree.mask.to(runner.device)
        self._head_idx = torch.tensor(self.tree.head, device=runner.device)
        self._rank_idx = torch.tensor(self.tree.rank, device=runner.device)
        self._depth = torch.tensor(self.tree.depth, device=runner.device)
        self._topk: dict[str, torch.Tensor] = {}  # seq_id -> [num_heads_used, topk] token ids

    # -- state ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def observe(self, seq_ids: Sequence[str], hidden: torch.Tensor) -> None:
        """Seed the head state from final hidden states ``[len(seq_ids), H]`` (e.g. prefill's last)."""
        if not seq_ids:
            return
        logits = self.heads(hidden)[:, : self.tree.num_heads]
        top = logits.topk(self.tree.topk, dim=-1).indices
        for i, sid in enumerate(seq_ids):
            self._topk[sid] = top[i]

    def has_state(self, seq_id: str) -> bool:
        return seq_id in self._topk

    def num_lookahead(self, seq_id: str) -> int:
        """Tree slots beyond the root that the next step of ``seq_id`` will use."""
        return self.tree.num_nodes - 1 if seq_id in self._topk else 0

    def free(self, seq_id: str) -> None:
        self._topk.pop(seq_id, None)

    # -- draft phase ---------------------------------------------------------------------------------
    def propose(
        self, seqs: Sequence[SpecSequence], *, enabled: Sequence[bool] | None = None
    ) -> list[TreeProposal]:
        out: list[TreeProposal] = []
        for i, s in enumerate(seqs):
            root = int(s.token_ids[-1])
            top = self._topk.get(s.seq_id)
            if top is None or (enabled is not None and not enabled[i]):
                out.append(TreeProposal([root], None))
                continue
            nodes = top[self._head_idx, self._rank_idx].tolist()
            out.append(TreeProposal([root, *nodes], self.tree))
        return out

    # -- verify phase --------------------------------------------------------------------------------
    @torch.inference_mode()
    def verify(
        self,
        seqs: Sequence[SpecSequence],
        proposals: Sequence[TreeProposal],
        block_tables: Sequence[Sequence[int]],
        num_computed: Sequence[int],
    ) -> list[TreeResult]:
        """Run the tree-masked forward for every sequence, walk each tree, compact accepted KV.
        ``num_computed[b]``: tokens of b with target KV (the root sits at that position)."""
        from engine.runner import SeqBatchEntry

        runner = self.runner
        entries = [
            SeqBatchEntry(p.tokens, table, n)
            for p, table, n in zip(proposals, block_tables, num_computed, strict=True)
        ]
        ids, _, meta = runner.prepare(entries)
        q_lens = [len(p.tokens) for p in proposals]
        width = max(q_lens)
        positions: list[int] = []
        for p, n in zip(proposals, num_computed, strict=True):
            positions.extend(n + d for d in (self.tree.depth if p.tree is not None else (0,)))
        pos = torch.tensor(positions, dtype=torch.long, device=runner.device)
        if width > 1:
            tm = torch.zeros(len(proposals), width, width, dtype=torch.bool, device=runner.device)
            for b, p in enumerate(proposals):
                if p.tree is not None:
                    tm[b, : len(p.tokens), : len(p.tokens)] = self._mask
                else:
                    tm[b, 0, 0] = True
            meta.tree_mask = tm
        hidden, logits = runner.execute(ids, pos, meta, None)
        results: list[TreeResult] = []
        next_hidden_rows: list[int] = []
        row = 0
        for s, p, table, n in zip(seqs, proposals, block_tables, num_computed, strict=True):
            rows = logits[row : row + len(p.tokens)]
            children = p.tree.children if p.tree is not None else ((),)
            path, nxt = verify_tree(
                rows, p.tokens, children, temperature=s.temperature, top_p=s.top_p, generator=s.generator
            )
            if path:
                compact_accepted_kv(runner.kv_caches, table, runner.block_size, n, path)
            results.append(TreeResult(len(path), [p.tokens[i] for i in path] + [nxt]))
            next_hidden_rows.append(row + (path[-1] if path else 0))
            row += len(p.tokens)
        # heads on the hidden state of each sequence's last accepted node seed its next tree
        self.observe([s.seq_id for s in seqs], hidden[torch.tensor(next_hidden_rows, device=hidden.device)])
        return results
