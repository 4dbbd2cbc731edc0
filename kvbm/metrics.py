"""Counters the manager keeps, and the immutable snapshot it hands out.

Counters change only when an operation succeeds: an ``allocate`` that returns ``None`` leaves every
counter as it was. Prefix counters count only sequences registered with prefix caching on; the
queried tokens of a prompt are all of its tokens (the hit never covers the last one, see the manager).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


class Counters:
    """Mutable counters, updated in place on the hot path."""

    __slots__ = (
        "prefix_queries",
        "prefix_hit_queries",
        "prefix_query_tokens",
        "prefix_hit_tokens",
        "evictions",
        "blocks_stored",
        "lookahead_blocks_released",
    )

    def __init__(self) -> None:
        self.prefix_queries = 0
        self.prefix_hit_queries = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.evictions = 0
        self.blocks_stored = 0
        self.lookahead_blocks_released = 0

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)


@dataclass(frozen=True, slots=True)
class KVCacheMetrics:
    """A point-in-time view of the cache, cheap to build and safe to keep."""

    num_blocks: int
    num_free_blocks: int
    num_sequences: int
    num_cached_blocks: int
    prefix_queries: int
    prefix_hit_queries: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    evictions: int
    blocks_stored: int
    lookahead_blocks_released: int

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences or pins (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens served from the cache over prompt tokens queried (0.0 before any query)."""
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def prefix_miss_tokens(self) -> int:
        return self.prefix_query_tokens - self.prefix_hit_tokens

    @property
    def query_hit_rate(self) -> float:
        """Fraction of prompts that reused at least one cached block."""
        return self.prefix_hit_queries / self.prefix_queries if self.prefix_queries else 0.0

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = asdict(self)
        out.update(usage=self.usage, prefix_hit_rate=self.prefix_hit_rate, query_hit_rate=self.query_hit_rate)
        return out
