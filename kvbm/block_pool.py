"""The block pool: ``num_blocks`` physical blocks, reference counts, free queues and the hash map.

Blocks are plain ints ``0 .. num_blocks-1``; per-block state lives in two parallel lists
(``ref_count`` and ``block_hash``) because list indexing is the cheapest thing Python does.

Invariants (checked by ``tests/kvbm/test_state_machine.py`` after every step):

1. Every block is in exactly one place: held (``ref_count > 0``), the *uncached* free stack, or the
   *cached* free queue. So ``num_free == len(uncached) + len(cached_free)`` and
   ``num_free + held == num_blocks``.
2. ``ref_count[b]`` equals the number of holders of ``b`` (sequences' block tables plus pins).
3. A free block is in the cached queue iff it has a hash. ``hash_to_block[h] == b`` iff
   ``block_hash[b] == h``: a hash names at most one block, and a block at most one hash. Likewise
   ``key_to_block[key] == b`` iff ``block_key[b] == key``, where ``key`` is the block's
   ``(parent hash, encoded extra keys, token bytes)`` and ``h`` its SHA-256 (kvbm.hashing).
   Prefix matching looks keys up (Python's bytes hashing, no SHA-256 per hit); the SHA-256 is
   computed once, when a block is stored, and names the block in events and chains.
4. Only ``allocate`` takes blocks from the free queues. It pops the uncached stack first (a block
   freed without a hash holds nothing anyone can reuse) and only then evicts the least recently
   freed cached block, dropping its hash (and publishing ``BlockRemoved``).
5. ``release`` appends cached blocks to the queue's tail in the order given: the manager passes a
   sequence's blocks tail-first, so a chain's leaves are evicted before its root, and a shared
   system prompt (the root of many chains) lives longest.
6. ``touch`` takes a cached block out of the free queue before any ``allocate`` of the same
   operation runs, so an allocation never evicts a block it has just hit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from kvbm.events import AllBlocksCleared, BlockRemoved, EventBus
from kvbm.hashing import BlockHash, BlockKey
from kvbm.metrics import Counters


class BlockPool:
    """Owns block state; knows nothing of sequences. The manager checks capacity before calling."""

    __slots__ = (
        "num_blocks",
        "ref_count",
        "block_hash",
        "hash_to_block",
        "block_key",
        "key_to_block",
        "uncached",
        "cached_free",
        "events",
        "counters",
    )

    def __init__(self, num_blocks: int, events: EventBus, counters: Counters) -> None:
        self.num_blocks = num_blocks
        self.ref_count: list[int] = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.hash_to_block: dict[BlockHash, int] = {}
        self.block_key: list[BlockKey | None] = [None] * num_blocks
        self.key_to_block: dict[BlockKey, int] = {}
        # Stack: pop() from the end, so block 0 is handed out first on a fresh pool.
        self.uncached: list[int] = list(range(num_blocks - 1, -1, -1))
        # LRU order: first key = least recently freed = next to evict.
        self.cached_free: OrderedDict[int, None] = OrderedDict()
        self.events = events
        self.counters = counters

    @property
    def num_free(self) -> int:
        return len(self.uncached) + len(self.cached_free)

    @property
    def num_cached(self) -> int:
        """Blocks that carry a hash (held or free)."""
        return len(self.hash_to_block)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self.hash_to_block.get(block_hash)

    def touch(self, blocks: Iterable[int]) -> None:
        """Take a reference on cached blocks (prefix hits, fork), pulling free ones off the queue."""
        ref_count = self.ref_count
        cached_free = self.cached_free
        for b in blocks:
            if ref_count[b] == 0:
                del cached_free[b]
            ref_count[b] += 1

    def allocate(self, n: int) -> list[int]:
        """Hand out ``n`` blocks with ``ref_count == 1``. The caller guarantees ``n <= num_free``."""
        uncached = self.uncached
        if n <= len(uncached):
            if n == 1:
                out = [uncached.pop()]
            else:
                out = uncached[-n:]
                del uncached[-n:]
                out.reverse()
        else:
            out = uncached[::-1]
            uncached.clear()
            for _ in range(n - len(out)):
                out.append(self._evict())
        ref_count = self.ref_count
        for b in out:
            ref_count[b] = 1
        return out

    def _evict(self) -> int:
        b, _ = self.cached_free.popitem(last=False)
        h = self.block_hash[b]
        self.block_hash[b] = None
        del self.hash_to_block[h]  # type: ignore[arg-type]
        del self.key_to_block[self.block_key[b]]  # type: ignore[arg-type]
        self.block_key[b] = None
        self.counters.evictions += 1
        if self.events.subscribers:
            self.events.emit(BlockRemoved(h, b))  # type: ignore[arg-type]
        return b

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block, in the given order (first released = first evicted)."""
        ref_count = self.ref_count
        block_hash = self.block_hash
        for b in blocks:
            r = ref_count[b] - 1
            ref_count[b] = r
            if r == 0:
                if block_hash[b] is None:
                    self.uncached.append(b)
                else:
                    self.cached_free[b] = None

    def cache(self, b: int, block_hash: BlockHash, key: BlockKey) -> bool:
        """Register a held, full block under its hash and key; False if either (or the block) is taken.

        The caller publishes ``BlockStored`` (it knows the parent and the token ids) when True.
        The manager inlines this on its hot path; keep the two in step.
        """
        if self.block_hash[b] is not None or block_hash in self.hash_to_block:
            return False
        self.block_hash[b] = block_hash
        self.hash_to_block[block_hash] = b
        self.block_key[b] = key
        self.key_to_block[key] = b
        self.counters.blocks_stored += 1
        return True

    def clear_cache(self) -> int:
        """Drop every hash. Only valid when no block is held (the manager checks)."""
        n = len(self.hash_to_block)
        for b in self.cached_free:
            self.block_hash[b] = None
            self.block_key[b] = None
            self.uncached.append(b)
        self.cached_free.clear()
        self.hash_to_block.clear()
        self.key_to_block.clear()
        if self.events.subscribers:
            self.events.emit(AllBlocksCleared(n))
        return n
