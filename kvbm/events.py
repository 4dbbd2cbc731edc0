"""Cache events for routers and dashboards.

The manager publishes, synchronously and in order:

* :class:`BlockStored` when a full, committed block gets its hash registered (it becomes reusable by
  other sequences). It carries the parent hash and the token ids, so a subscriber that sees every
  event can rebuild the hash chains (a radix tree of cached prefixes) without access to the engine.
* :class:`BlockRemoved` when a cached block loses its hash (evicted to make room).
* :class:`AllBlocksCleared` after :meth:`KVCacheManager.reset_prefix_cache`.

A block whose content duplicates an already-cached hash is not stored again, so every ``BlockStored``
is matched by at most one later ``BlockRemoved`` (or an ``AllBlocksCleared``).

Callbacks run inside manager calls: keep them cheap and never call back into the manager. With no
subscriber, no event object is built at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hash: bytes
    parent_hash: bytes | None
    token_ids: tuple[int, ...]
    block_id: int
    extra_keys: tuple = ()


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hash: bytes
    block_id: int


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    num_blocks_cleared: int


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
Callback = Callable[[KVEvent], None]


class EventBus:
    """A list of callbacks; ``subscribe`` returns the function that unsubscribes."""

    __slots__ = ("subscribers",)

    def __init__(self) -> None:
        self.subscribers: list[Callback] = []

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        if not callable(callback):
            raise TypeError(f"subscribe: callback must be callable, got {callback!r}")
        self.subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self.subscribers:
                self.subscribers.remove(callback)

        return unsubscribe

    def emit(self, event: KVEvent) -> None:
        for callback in self.subscribers:
            callback(event)
