"""Megatron-style tensor-parallel layers. With ``tp_size == 1`` they are plain linear layers, so the
one model definition serves a single GPU, a CPU test and every rank of a tensor-parallel group.

- ``ColumnParallelLinear`` splits output features: each rank computes its slice, no communication.
  Fused projections (QKV, gate/up) pass ``output_sizes`` so each part is split separately and a
  rank's shard stays ``[q_r, k_r, v_r]``.
- ``RowParallelLinear`` splits input features and all-reduces the partial sums (one all-reduce,
  through ``engine.model.allreduce``: symmetric memory for small messages on GPUs, else NCCL/gloo).
- ``VocabParallelEmbedding`` splits the vocabulary; rows a rank does not own are zero, then summed.
- ``ParallelLMHead`` splits the vocabulary and all-gathers the logits.
Shards are cut from full Hugging Face tensors by ``load_shard`` so every loader stays unaware of tp.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.model.allreduce import all_reduce


def _split(size: int, tp_size: int, what: str) -> int:
    if size % tp_size:
        raise ValueError(f"{what}={size} is not divisible by tp_size={tp_size}")
    return size // tp_size


class _TPModule(nn.Module):
    def __init__(self, tp_rank: int, tp_size: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group


class ColumnParallelLinear(_TPModule):
    """y = x W^T (+ b) with W's rows (output features) split across ranks."""

    def __init__(
        self,
        in_features: int,
        output_sizes: Sequence[int],
        *,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        group: dist.ProcessGroup | None = None,
        replicate: Sequence[bool] | None = None,
    ) -> None:
        super().__init__(tp_rank, tp_size, group)
        # replicate[i]: part i is not split but every rank keeps the slice for its own heads (used
        # for K/V when there are fewer KV heads than ranks); the caller passes the per-rank size.
        self.replicate = tuple(replicate) if replicate is not None else (False,) * len(output_sizes)
        self.shard_sizes = tuple(
            s if rep else _split(s, tp_size, "output size")
            for s, rep in zip(output_sizes, self.replicate, strict=True)
        )
        self.weight = nn.Parameter(torch.empty(sum(self.shard_sizes), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(self.shard_sizes)), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load_shard(
        self, part: int, full: torch.Tensor, *, is_bias: bool = False, start: int | None = None
    ) -> None:
        """Copy this rank's slice of part ``part`` (a full HF tensor) into the fused parameter.

        ``start`` overrides the slice start (rows of ``full``) for replicated parts."""
        size = self.shard_sizes[part]
        begin = start if start is not None else (0 if self.replicate[part] else self.tp_rank * size)
        offset = sum(self.shard_sizes[:part])
        target = self.bias if is_bias else self.weight
        assert target is not None
        target.data[offset : offset + size].copy_(full[begin : begin + size])


class RowParallelLinear(_TPModule):
    """y = all_reduce(x_r W_r^T) with W's columns (input features) split across ranks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(tp_rank, tp_size, group)
        self.in_shard = _split(in_features, tp_size, "input size")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_shard), requires_grad=False)

    def forward(self, x: torch.Tensor, *, reduce: bool = True) -> torch.Tensor:
        """``reduce=False`` returns this rank's partial sum, for a caller that fuses the all-reduce
        into what follows (engine.model.allreduce.all_reduce_add_rmsnorm)."""
        y = F.linear(x, self.weight)
        return all_reduce(y, self.group) if self.tp_size > 1 and reduce else y

    def load_shard(self, full: torch.Tensor) -> None:
        begin = self.tp_rank * self.in_shard
        self.weight.data.copy_(full[:, begin : begin + self.in_shard])


class VocabParallelEmbedding(_TPModule):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(tp_rank, tp_size, group)
        self.shard = -(-vocab_size // tp_size)  # ceil: the last rank may hold padding rows
        self.vocab_start = tp_rank * self.shard
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.zeros(self.shard, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.shard)
        out = F.embedding(local.clamp(0, self.shard - 1), self.weight) * mine.unsqueeze(-1).to(
            self.weight.dtype
        )
        return all_reduce(out, self.group)

    def load_shard(self, full: torch.Tensor) -> None:
        rows = full[self.vocab_start : self.vocab_start + self.shard]
        self.weight.data.zero_()
        self.weight.data[: rows.shape[0]].copy_(rows)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocabulary-split output projection; ``logits`` gathers the full vocabulary on every rank."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight)
        if self.tp_size > 1:
            parts = [torch.empty_like(local) for _ in range(self.tp_size)]
            dist.all_gather(parts, local, group=self.group)
            local = torch.cat(parts, dim=-1)
        return local[..., : self.vocab_size]
