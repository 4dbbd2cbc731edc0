"""Medusa decoding over the target runner: candidates from the heads, one tree-masked verify
forward, tree walk, KV compaction of the accepted path.

State per sequence: the heads' top-k token ids at the sequence's last verified position (computed
from that position's final hidden state, see ``observe``). A sequence without state (its first
decode step when the engine did not pass its prefill hidden state, or a budget too small for the
tree's depth) verifies just its root -- a plain decode step -- and that step seeds the state.

The verify chunk of a sequence is ``[root, *nodes]`` in breadth-first order, so it has exactly the
chain path's shape: the engine reserves ``len(nodes)`` lookahead slots in kvbm, runs the chunk in its
one flattened forward after ``apply_tree`` fixed positions and the mask, walks the tree with
``accept`` (which moves the accepted nodes' KV to contiguous slots) and commits ``1 + accepted``
tokens, which releases the rest of the tree's slots. Any breadth-first prefix of the node list is a
valid tree (parents come first), so a scheduler may cut a tree short to fit its token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.attention.metadata import AttentionMetadata
from engine.errors import ConfigError
from engine.spec.base import SpecSequence, per_seq_k
from engine.spec.medusa import MedusaHeads, MedusaTree, accepted_kv_moves, resolve_tree
from engine.spec.verify import verify_tree

if TYPE_CHECKING:
    from engine.runner import ModelRunner
    from engine.spec.config import SpecConfig


class MedusaDecoder:
    """Medusa heads + tree for one target runner. Implements the chain ``Proposer`` protocol
    (``propose`` returns the tree's node tokens) plus the tree-specific ``apply_tree``/``accept``."""

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
        self._head_idx = torch.tensor(self.tree.head, device=runner.device)
        self._rank_idx = torch.tensor(self.tree.rank, device=runner.device)
        self._topk: dict[str, torch.Tensor] = {}  # seq_id -> [num_heads_used, topk] token ids
        self._mask_np = self.tree.mask.numpy()

    @property
    def num_nodes(self) -> int:
        """Tree nodes besides the root (the lookahead a full tree needs)."""
        return self.tree.num_nodes - 1

    # -- state -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def observe(self, seq_ids: Sequence[str], hidden: torch.Tensor) -> None:
        """Seed the head state from final hidden states ``[len(seq_ids), H]`` (the position whose
        next token was just sampled: a prefill's last token, or a verify step's last accepted node)."""
        if not seq_ids:
            return
        logits = self.heads(hidden.to(self.heads.medusa_head[0][1].weight.dtype))[:, : self.tree.num_heads]
        top = logits.topk(self.tree.topk, dim=-1).indices
        for i, sid in enumerate(seq_ids):
            self._topk[sid] = top[i]

    def has_state(self, seq_id: str) -> bool:
        return seq_id in self._topk

    # -- Proposer protocol -----------------------------------------------------------------------------
    def propose(self, seqs: Sequence[SpecSequence], k: int | Sequence[int] | None = None) -> list[list[int]]:
        """Node tokens (breadth-first, root excluded) per sequence; ``[]`` without head state or when
        the sequence's budget ``k`` is below the tree's depth (drafts must fit max_tokens/context)."""
        ks = per_seq_k(k, len(seqs)) if k is not None else [self.tree.num_heads] * len(seqs)
        take = [
            i
            for i, (s, kk) in enumerate(zip(seqs, ks, strict=True))
            if s.seq_id in self._topk and kk >= self.tree.num_heads
        ]
        out: list[list[int]] = [[] for _ in seqs]
        if take:
            top = torch.stack([self._topk[seqs[i].seq_id] for i in take])  # [B, heads, topk]
            nodes = top[:, self._head_idx, self._rank_idx].tolist()  # one sync for the batch
            for i, n in zip(take, nodes, strict=True):
                out[i] = n
        return out

    def draft_probs(self, seqs: Sequence[SpecSequence]) -> list[torch.Tensor | None]:
        return [None] * len(seqs)  # tree verification samples without replacement: no q needed

    def commit(self, seq_id: str, num_accepted: int) -> None:
        return None  # the state was refreshed by ``accept``/``observe``

    def free(self, seq_id: str) -> None:
        self._topk.pop(seq_id, None)

    # -- verify helpers --------------------------------------------------------------------------------
    @lru_cache(maxsize=64)  # noqa: B019 - one decoder per engine, a handful of prefix lengths
    def _prefix(self, m: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
        """(depths, children) of the tree cut to its first ``m`` nodes (plus the root)."""
        t = self.tree
        depth = t.depth[: m + 1]
        children = tuple(tuple(c for c in ch if c <= m) for ch in t.children[: m + 1])
        return depth, children

    def apply_tree(self, meta: AttentionMetadata, positions: torch.Tensor, num_nodes: Sequence[int]) -> None:
        """Turn a causal batch into a tree batch, in place: for each sequence ``b`` whose chunk ends
        with a tree of ``num_nodes[b]`` nodes (its root right before them), set the nodes' positions
        to ``root + depth`` and give the batch a ``tree_mask`` (causal rows for every other chunk).
        Built on the host and copied once (two small transfers per step, whatever the batch)."""
        if not any(num_nodes):
            return
        starts = meta.query_start_loc.tolist()
        width = meta.max_query_len
        tm = np.broadcast_to(np.tri(width, dtype=bool), (len(num_nodes), width, width)).copy()
        delta = np.zeros(int(positions.shape[0]), dtype=np.int64)
        for b, m in enumerate(num_nodes):
            if not m:
                continue
            depth, _ = self._prefix(m)
            end = starts[b + 1]
            r0 = end - starts[b] - m - 1  # the root's row inside the chunk
            delta[end - m : end] = np.asarray(depth[1:]) - np.arange(1, m + 1)
            tm[b, r0 : r0 + m + 1, r0 : r0 + m + 1] = self._mask_np[: m + 1, : m + 1]
        positions += torch.from_numpy(delta).to(positions.device)
        meta.tree_mask = torch.from_numpy(tm).to(positions.device)

    def accept_batch(
        self,
        seqs: Sequence[SpecSequence],
        drafts: Sequence[Sequence[int]],
        logits: torch.Tensor,
        row_starts: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        root_positions: Sequence[int],
    ) -> list[tuple[list[int], list[int]]]:
        """Walk every sequence's tree (its rows of ``logits`` start at ``row_starts[b]``: root, then
        nodes) and move all accepted nodes' KV next to their roots in one batched copy. Returns per
        sequence (accepted node indices, tokens to append = accepted + next). One device sync for
        the greedy rows, whatever the batch size."""
        argmax = logits.argmax(dim=-1).tolist() if any(s.greedy for s in seqs) else None
        moves: list[tuple[int, int]] = []
        out: list[tuple[list[int], list[int]]] = []
        for s, nodes, r0, table, root_pos in zip(
            seqs, drafts, row_starts, block_tables, root_positions, strict=True
        ):
            tokens = [int(s.token_ids[-1]), *nodes]
            _, children = self._prefix(len(nodes))
            rows = logits[r0 : r0 + len(tokens)]
            path, nxt = verify_tree(
                rows,
                tokens,
                children,
                temperature=s.temperature,
                top_p=s.top_p,
                generator=s.generator,
                argmax=argmax[r0 : r0 + len(tokens)] if s.greedy and argmax is not None else None,
            )
            moves.extend(accepted_kv_moves(table, self.runner.block_size, root_pos, path))
            out.append((path, [tokens[i] for i in path] + [nxt]))
        self.runner.move_kv_slots(moves)  # a TPExecutor moves the slots on every rank's shard
        return out
