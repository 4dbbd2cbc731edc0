"""A full consistency check of a KVCacheManager, for tests and for engines' debug modes.

It walks every block, so it costs O(num_blocks + total table length): never call it on a hot path.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from kvbm.hashing import hash_key

if TYPE_CHECKING:
    from kvbm.manager import KVCacheManager


class InvariantError(AssertionError):
    """The manager's state is inconsistent (a kvbm bug, or someone mutated its internals)."""


def check_invariants(mgr: KVCacheManager) -> None:
    """Raise InvariantError naming the first broken invariant (see kvbm/block_pool.py's list)."""
    pool = mgr._pool
    n = mgr.num_blocks
    bs = mgr.block_size

    def fail(msg: str) -> None:
        raise InvariantError(msg)

    holders: Counter[int] = Counter()
    for seq_id, seq in mgr._seqs.items():
        holders.update(seq.blocks)
        if len(set(seq.blocks)) != len(seq.blocks):
            fail(f"sequence {seq_id!r} holds a block twice: {seq.blocks}")
        if not 0 <= seq.num_computed <= seq.num_reserved <= seq.num_granted:
            fail(
                f"sequence {seq_id!r}: need computed <= reserved <= granted, got "
                f"{seq.num_computed}, {seq.num_reserved}, {seq.num_granted}"
            )
        if len(seq.blocks) * bs < seq.num_granted:
            fail(f"sequence {seq_id!r} holds {len(seq.blocks)} blocks, granted {seq.num_granted} tokens")
        settled = seq.num_granted == seq.num_reserved  # no lookahead grant outstanding
        if mgr.release_lookahead and settled and len(seq.blocks) > -(-seq.num_granted // bs):
            fail(f"sequence {seq_id!r} keeps {len(seq.blocks)} blocks past its committed length")
        if mgr.enable_prefix_caching:
            if len(seq.hashes) != seq.num_computed // bs:
                fail(
                    f"sequence {seq_id!r}: {len(seq.hashes)} hashed blocks for "
                    f"{seq.num_computed} computed tokens"
                )
            if len(seq.token_ids) < seq.num_computed:
                fail(f"sequence {seq_id!r}: {len(seq.token_ids)} known ids < {seq.num_computed} computed")
        for i, h in enumerate(seq.hashes):
            b = seq.blocks[i]
            if pool.block_hash[b] is not None and pool.block_hash[b] != h:
                fail(f"sequence {seq_id!r}: block {b} at index {i} carries another prefix's hash")
    for blocks in mgr._pins.values():
        holders.update(blocks)

    uncached = pool.uncached
    cached_free = list(pool.cached_free)
    free_set = set(uncached) | set(cached_free)
    if len(free_set) != len(uncached) + len(cached_free):
        fail("a block is in the free queues twice")
    for b in range(n):
        rc = pool.ref_count[b]
        if rc != holders[b]:
            fail(f"block {b}: ref_count {rc} but {holders[b]} holders")
        if (rc == 0) != (b in free_set):
            fail(f"block {b}: ref_count {rc} but {'in' if b in free_set else 'not in'} the free queues")
    if set(holders) - set(range(n)):
        fail(f"holders reference blocks outside the pool: {sorted(set(holders) - set(range(n)))}")
    if mgr.num_free_blocks + sum(1 for b in range(n) if pool.ref_count[b] > 0) != n:
        fail("free blocks plus held blocks do not add up to the pool")
    for b in uncached:
        if pool.block_hash[b] is not None:
            fail(f"block {b} is in the uncached stack but has a hash")
    for b in cached_free:
        if pool.block_hash[b] is None:
            fail(f"block {b} is in the cached queue without a hash")
    if len(pool.hash_to_block) != sum(1 for h in pool.block_hash if h is not None):
        fail("hash map and block hashes disagree in size")
    for h, b in pool.hash_to_block.items():
        if pool.block_hash[b] != h:
            fail(f"hash map sends a hash to block {b}, which carries another")
        key = pool.block_key[b]
        if key is None or pool.key_to_block.get(key) != b:
            fail(f"block {b} has a hash but its lookup key is missing")
        if hash_key(key) != h:
            fail(f"block {b}: its hash is not the SHA-256 of its key")
    if len(pool.key_to_block) != len(pool.hash_to_block):
        fail("key map and hash map disagree in size")
    if any(pool.block_key[b] is not None for b in range(n) if pool.block_hash[b] is None):
        fail("a block without a hash keeps a lookup key")


def snapshot(mgr: KVCacheManager) -> tuple:
    """Everything observable about the manager as one comparable value (free-queue order included).

    Tests compare snapshots to prove that a failed call changed nothing.
    """
    pool = mgr._pool
    seqs = tuple(
        (
            seq_id,
            tuple(s.blocks),
            s.num_computed,
            s.num_reserved,
            s.num_granted,
            tuple(s.token_ids),
            tuple(s.hashes),
            s.extra_keys,
        )
        for seq_id, s in mgr._seqs.items()
    )
    return (
        tuple(pool.ref_count),
        tuple(pool.block_hash),
        tuple(pool.uncached),
        tuple(pool.cached_free),
        tuple(pool.hash_to_block.items()),
        tuple(pool.key_to_block.items()),
        tuple(pool.block_key),
        seqs,
        tuple((name, tuple(b)) for name, b in mgr._pins.items()),
        mgr._counters.as_tuple(),
    )
