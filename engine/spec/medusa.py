"""Medusa-1: extra decoding heads on the target's last hidden state, verified as a token tree.

Heads: head i is ``ResBlock(H) -> Linear(H, V)`` where ``ResBlock(x) = x + SiLU(W x + b)``; head i
predicts the token i + 1 places after the token the base LM head predicts. Parameter names follow
the public Medusa-1 checkpoints: ``medusa_head.{i}.0.linear.weight``, ``medusa_head.{i}.0.linear.bias``,
``medusa_head.{i}.1.weight`` (a ``medusa_lm_head.pt`` state dict may omit the ``medusa_head.`` prefix).

Tree: a list of paths, each a tuple of top-k ranks, one per head: ``(0, 2)`` is "head 0's top-1,
then head 1's top-3". Node 0 of the verify chunk is the root -- the last sampled token, which has no
KV yet -- and node i >= 1 is ``paths[i - 1]`` in breadth-first order. In one forward each node attends
to the committed context plus its ancestors (``tree_mask``) at position ``root_pos + depth``. After
verification the accepted path's KV is copied to the contiguous slots after the root, and kvbm
commits ``1 + accepted`` tokens, releasing the rest of the lookahead.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError
from engine.spec.config import Tree, normalize_tree

DEFAULT_TREE_NODES = 63  # + the root = 64 verify tokens per sequence
DEFAULT_TOPK = 10
# Prior used only to shape the default tree: P(head h's rank-r candidate is right | its parent was)
# ~ TOP1[h] * RANK_DECAY**r (head accuracy drops with distance, candidates with rank).
_TOP1 = (0.60, 0.42, 0.32, 0.26, 0.22, 0.19, 0.17, 0.15)
_RANK_DECAY = 0.45


def default_tree(num_heads: int, num_nodes: int = DEFAULT_TREE_NODES, topk: int = DEFAULT_TOPK) -> Tree:
    """The ``num_nodes`` paths with the highest prior probability of acceptance (best-first search
    over the path lattice; every prefix of a chosen path is chosen first since scores only fall)."""
    if num_heads < 1 or num_nodes < 1 or topk < 1:
        raise ConfigError(
            f"default_tree: num_heads={num_heads}, num_nodes={num_nodes}, topk={topk} must be >= 1"
        )

    def acc(h: int, r: int) -> float:
        return _TOP1[min(h, len(_TOP1) - 1)] * _RANK_DECAY**r

    chosen: list[tuple[int, ...]] = []
    heap: list[tuple[float, tuple[int, ...]]] = [(-acc(0, 0), (0,))]
    while heap and len(chosen) < num_nodes:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        score = -neg
        if len(path) < num_heads:  # first child
            heapq.heappush(heap, (-(score * acc(len(path), 0)), (*path, 0)))
        if path[-1] + 1 < topk:  # next sibling
            h = len(path) - 1
            sib = score / acc(h, path[-1]) * acc(h, path[-1] + 1)
            heapq.heappush(heap, (-sib, (*path[:-1], path[-1] + 1)))
    return normalize_tree(chosen)


def resolve_tree(tree: Tree | Sequence[Sequence[int]] | None, num_heads: int) -> Tree:
    return default_tree(num_heads) if tree is None else normalize_tree(tree)


@dataclass(frozen=True)
class MedusaTree:
    """Index arrays for one tree shape (shared by every sequence of a batch)."""

    paths: Tree
    depth: tuple[int, ...]  # per node (root 0)
    parent: tuple[int, ...]  # per node (root -1)
    children: tuple[tuple[int, ...], ...]
    head: tuple[int, ...]  # per non-root node: which head proposes it
    rank: tuple[int, ...]  # per non-root node: which of that head's top-k
    mask: torch.Tensor  # [N, N] bool, node j sees node i iff i is j or an ancestor of j

    @property
    def num_nodes(self) -> int:
        """Verify tokens per sequence, root included."""
        return len(self.depth)

    @property
    def num_heads(self) -> int:
        return max(self.depth)

    @property
    def topk(self) -> int:
        return max(self.rank) + 1

    @staticmethod
    @lru_cache(maxsize=16)
    def build(paths: Tree) -> MedusaTree:
        index = {p: i + 1 for i, p in enumerate(paths)}
        n = len(paths) + 1
        depth, parent = [0], [-1]
        children: list[list[int]] = [[] for _ in range(n)]
        for p in paths:
            par = index[p[:-1]] if len(p) > 1 else 0
            depth.append(len(p))
            parent.append(par)
            children[par].append(index[p])
        mask = torch.zeros(n, n, dtype=torch.bool)
        for j in range(n):
            i = j
            while i >= 0:
                mask[j, i] = True
                i = parent[i]
        return MedusaTree(
            paths=paths,
            depth=tuple(depth),
            parent=tuple(parent),
            children=tuple(tuple(c) for c in children),
            head=tuple(len(p) - 1 for p in paths),
            rank=tuple(p[-1] for p in paths),
            mask=mask,
        )

    def candidates(self, root_tokens: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
        """Node tokens ``[B, N]``: the root token, then each node's rank-th top token of its head.
        ``head_logits``: ``[B, num_heads_available, V]``."""
        if head_logits.shape[1] < self.num_heads:
            raise ValueError(
                f"tree needs {self.num_heads} Medusa heads, the model has {head_logits.shape[1]}"
            )
        top = head_logits[:, : self.num_heads].topk(self.topk, dim=-1).indices  # [B, H, K]
        h = torch.tensor(self.head, device=top.device)
        r = torch.tensor(self.rank, device=top.device)
        nodes = top[:, h, r]  # [B, N-1]
        return torch.cat([root_tokens.view(-1, 1).to(nodes.dtype), nodes], dim=1)

    def positions(self, root_positions: torch.Tensor) -> torch.Tensor:
        """Position ids ``[B, N]``: root position + node depth."""
        d = torch.tensor(self.depth, device=root_positions.device, dtype=root_positions.dtype)
        return root_positions.view(-1, 1) + d


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """``num_heads`` Medusa-1 heads; ``forward(hidden [N, H]) -> logits [N, num_heads, V]`` (float32)."""

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int) -> None:
        super().__init__()
        if num_heads < 1:
            raise ConfigError(f"Medusa num_heads must be >= 1, got {num_heads}")
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.medusa_head = nn.ModuleList(
            nn.Sequential(ResBlock(hidden_size), nn.Linear(hidden_size, vocab_size, bias=False))
            for _ in range(num_heads)
        )
        self.requires_grad_(False)

    @property
    def num_heads(self) -> int:
        return len(self.medusa_head)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(hidden).float() for head in self.medusa_head], dim=1)

    @classmethod
    def random(
        cls,
        hidden_size: int,
        vocab_size: int,
        num_heads: int,
        *,
        seed: int = 0,
        lm_head_weight: torch.Tensor | None = None,
    ) -> MedusaHeads:
        """Seeded random heads (timing; acceptance meaningless). With ``lm_head_weight``, heads start
        the way Medusa training starts them: ResBlock linear zero, LM head copied from the base."""
        heads = cls(hidden_size, vocab_size, num_heads)
        gen = torch.Generator().manual_seed(seed)
        for seq in heads.medusa_head:
            res, lm = seq[0], seq[1]
            if lm_head_weight is not None:
                res.linear.weight.zero_()
                res.linear.bias.zero_()
                lm.weight.copy_(lm_head_weight)
            else:
                std = hidden_size**-0.5
                res.linear.weight.copy_(torch.randn(res.linear.weight.shape, generator=gen) * std * 0.1)
                res.linear.bias.zero_()
                lm.weight.copy_(torch.randn(lm.weight.shape, generator=gen) * std)
        return heads

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], *, source: str = "state dict") -> MedusaHeads:
        clean = {k.removeprefix("medusa_head."): v for k, v in state.items()}
        try:
            ids = sorted({int(k.split(".")[0]) for k in clean})
        except ValueError as e:
            raise ConfigError(f"Medusa heads {source}: unexpected parameter names {sorted(state)[:4]}") from e
        if ids != list(range(len(ids))) or not ids:
            raise ConfigError(f"Medusa heads {source}: head indices {ids} are not 0..n-1")
        w0 = clean.get("0.1.weight")
        if w0 is None:
            raise ConfigError(f"Medusa heads {source}: missing medusa_head.0.1.weight")
        heads = cls(int(w0.shape[1]), int(w0.shape[0]), len(ids))
        expected = {k.removeprefix("medusa_head.") for k in heads.state_dict()}
        missing, unknown = sorted(expected - set(clean)), sorted(set(clean) - expected)
        if missing or unknown:
            raise ConfigError(f"Medusa heads {source}: missing {missing[:4]}, unexpected {unknown[:4]}")
        heads.medusa_head.load_state_dict({k: v.float() for k, v in clean.items()})
        return heads

    @classmethod
    def load(cls, path: str | Path) -> MedusaHeads:
        """A safetensors or torch (.pt/.bin) file with Medusa-1 head weights."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"medusa_heads: file {str(p)!r} does not exist")
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ConfigError(f"medusa_heads: {str(p)!r} does not hold a state dict")
        return cls.from_state_dict(state, source=repr(str(p)))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))


def accepted_kv_moves(
    block_table: Sequence[int], block_size: int, root_pos: int, path: Sequence[int]
) -> list[tuple[int, int]]:
    """(source slot, destination slot) pairs that move the accepted nodes' KV (written in slot
    order at ``root_pos + node``) to the contiguous positions ``root_pos + 1 .. root_pos + len(path)``
    where the next steps expect them. RoPE was applied at ``root_pos + depth``, which is exactly the
    destination position, so a plain copy is right. Nodes already in place are skipped."""

    def slot(p: int) -> int:
        return block_table[p // block_size] * block_size + p % block_size

    return [(slot(root_pos + node), slot(root_pos + d)) for d, node in enumerate(path, 1) if node != d]


def move_kv_slots(
    kv_caches: Iterable[tuple[torch.Tensor, torch.Tensor]], moves: Sequence[tuple[int, int]]
) -> None:
    """Apply slot moves for any number of sequences at once: one gather/scatter per cache tensor.
    The gather reads every source before the scatter writes, and a node's source index is never
    below its destination, so moves within a path cannot clobber each other."""
    if not moves:
        return
    caches = list(kv_caches)
    device = caches[0][0].device
    src = torch.tensor([m[0] for m in moves], device=device)
    dst = torch.tensor([m[1] for m in moves], device=device)
    for k_cache, v_cache in caches:
        for cache in (k_cache, v_cache):
            flat = cache.view(-1, *cache.shape[2:])
            flat[dst] = flat[src]


def compact_accepted_kv(
    kv_caches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    block_table: Sequence[int],
    block_size: int,
    root_pos: int,
    path: Sequence[int],
) -> None:
    """Move one sequence's accepted path next to its root (see ``accepted_kv_moves``)."""
    move_kv_slots(kv_caches, accepted_kv_moves(block_table, block_size, root_pos, path))
