"""Capacity math shared by the block manager and the planner.

A sequence at context length ``L`` that reserves ``k`` lookahead (speculative) slots for the next
step holds ``ceil((L + 1 + k) / block_size)`` blocks during that step: ``L`` tokens already in the
cache, the one pending token being fed, and ``k`` draft tokens being verified. The planner uses the
same formula to bound the concurrency a KV budget admits, so the two can never disagree.
"""

from __future__ import annotations

from math import ceil


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def blocks_per_sequence(context_len: int, num_lookahead_tokens: int, block_size: int) -> int:
    """Blocks one sequence holds during a decode step at ``context_len`` with ``k`` lookahead."""
    _check_non_negative(context_len=context_len, num_lookahead_tokens=num_lookahead_tokens)
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    return ceil((context_len + 1 + num_lookahead_tokens) / block_size)


def blocks_needed(concurrency: int, context_len: int, num_lookahead_tokens: int, block_size: int) -> int:
    """Blocks that ``concurrency`` sequences need together (no prefix sharing assumed)."""
    _check_non_negative(concurrency=concurrency)
    return concurrency * blocks_per_sequence(context_len, num_lookahead_tokens, block_size)


def max_concurrency(num_blocks: int, context_len: int, num_lookahead_tokens: int, block_size: int) -> int:
    """Largest number of sequences at ``context_len`` with ``k`` lookahead that ``num_blocks`` admit."""
    _check_non_negative(num_blocks=num_blocks)
    return num_blocks // blocks_per_sequence(context_len, num_lookahead_tokens, block_size)
