"""Optional torch helpers: block tables as the tensors a paged-attention kernel reads.

Import this module only where torch is installed; ``import kvbm`` never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvbm.errors import InvalidArgumentError


def block_table_tensor(
    block_tables: Sequence[Sequence[int]],
    *,
    max_blocks: int | None = None,
    pad: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """``[num_seqs, max_blocks]`` tensor of block ids, rows padded with ``pad`` (0 by default).

    ``max_blocks`` defaults to the longest table; a fixed value keeps shapes static (CUDA graphs).
    """
    longest = max((len(t) for t in block_tables), default=0)
    width = longest if max_blocks is None else max_blocks
    if width < longest:
        raise InvalidArgumentError(
            f"block_table_tensor: max_blocks={max_blocks} but a block table has {longest} blocks"
        )
    rows = [list(t) + [pad] * (width - len(t)) for t in block_tables]
    if not rows:
        return torch.empty((0, width), dtype=dtype, device=device)
    return torch.tensor(rows, dtype=dtype, device=device)


def slot_mapping(
    block_tables: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    block_size: int,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Flattened ``[T]`` int64 cache slots of the given token positions, sequence by sequence.

    ``positions[i]`` are the positions of sequence ``i``'s query tokens (a ``range`` is fine), so a
    batch of prefill chunks, decode tokens and verify chunks maps in one call.
    """
    if block_size <= 0:
        raise InvalidArgumentError(f"slot_mapping: block_size must be > 0, got {block_size}")
    if len(block_tables) != len(positions):
        raise InvalidArgumentError(
            f"slot_mapping: {len(block_tables)} block tables but {len(positions)} position lists"
        )
    counts = [len(p) for p in positions]
    for i, (table, pos) in enumerate(zip(block_tables, positions, strict=True)):
        if pos and (min(pos) < 0 or max(pos) >= len(table) * block_size):
            raise InvalidArgumentError(
                f"slot_mapping: sequence {i} has positions {min(pos)}..{max(pos)} but its block table "
                f"holds {len(table) * block_size} slots ({len(table)} blocks)"
            )
    if sum(counts) == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    table = block_table_tensor(block_tables, dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    pos = torch.tensor([p for ps in positions for p in ps], dtype=torch.int64)
    out = table[rows, pos // block_size] * block_size + pos % block_size
    return out.to(device) if device is not None else out
