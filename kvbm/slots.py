"""Pure-Python slot arithmetic: where token position ``p`` of a sequence lives in the paged cache."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvbm.errors import InvalidArgumentError


def slot_ids(block_table: Sequence[int], positions: Iterable[int], block_size: int) -> list[int]:
    """``block_table[p // block_size] * block_size + p % block_size`` for each position ``p``.

    Raises InvalidArgumentError naming the position when it is negative or past the table.
    """
    if block_size <= 0:
        raise InvalidArgumentError(f"slot_ids: block_size must be > 0, got {block_size}")
    capacity = len(block_table) * block_size
    out: list[int] = []
    for p in positions:
        if not 0 <= p < capacity:
            raise InvalidArgumentError(
                f"slot_ids: position {p} is outside the block table ({len(block_table)} blocks of "
                f"{block_size} = {capacity} slots)"
            )
        q, r = divmod(p, block_size)
        out.append(block_table[q] * block_size + r)
    return out
