"""What one forward pass needs to know about the paged KV cache (the contract between the
scheduler that builds a batch and the attention backends that read it).

A batch is flattened: the query tokens of sequence ``b`` are rows
``query_start_loc[b]:query_start_loc[b + 1]`` of every ``[T, ...]`` tensor. Prefill chunks, single
decode tokens and speculative verify chunks (1 + k tokens) all have this one form.

Invariants:
- every query token's K/V is written to ``slot_mapping[t]`` *before* attention reads the cache, so a
  query sees its own key;
- ``seq_lens[b]`` counts the tokens of ``b`` that hold KV after this step's writes; the queries of
  ``b`` are its last ``q_len_b`` tokens, at positions ``seq_lens[b] - q_len_b + j``;
- without ``tree_mask`` attention is causal: query ``j`` sees every cached token before the chunk and
  queries ``0..j`` of its own chunk. With ``tree_mask`` (Medusa verification), query ``j`` sees every
  token before the chunk and those queries ``i`` of its chunk where ``tree_mask[b, j, i]`` is true.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each query token
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative query counts
    seq_lens: torch.Tensor  # [B] int32: tokens with KV after this step's writes
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    tree_mask: torch.Tensor | None = None  # [B, max_query_len, max_query_len] bool, or None = causal

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def is_pure_decode(self) -> bool:
        """Every sequence has exactly one query token (the shape CUDA graphs capture)."""
        return self.max_query_len == 1 and self.tree_mask is None
