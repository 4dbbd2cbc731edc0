"""A full consistency check of a KVCacheManager, for tests and for engines' debug modes.

It walks every block, so it costs O(num_blocks + total table length): never call it on a hot path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from typing import TYPE_CHECKING

from kvbm.hashing import hash_key

if TYPE_CHECKING:
    from kvbm.block_pool import BlockPool
    from kvbm.manager import KVCacheManager, _Seq


class InvariantError(AssertionError):
    """The manager's state is inconsistent (a kvbm bug, or someone mutated its internals)."""


def check_invariants(mgr: KVCacheManager) -> None:
    """Raise InvariantError naming the first broken invariant: each sequence's token accounting and
    prefix-cache state (kvbm/manager.py's docstring), then the pool's (kvbm/block_pool.py's list)."""
    for seq_id, seq in mgr._seqs.items():
        _check_accounting(mgr, seq_id, seq)
        _check_sequence_hashes(mgr, seq_id, seq)
    _check_holders(mgr)
    _check_free_queues(mgr._pool)
    _check_hash_maps(mgr._pool)


def _check_accounting(mgr: KVCacheManager, seq_id: Hashable, seq: _Seq) -> None:
    """``computed <= reserved <= granted``, the table covers the grant with distinct blocks, and with
    lookahead release on, a sequence with no outstanding lookahead keeps no block past its length."""
    bs = mgr.block_size
    if len(set(seq.blocks)) != len(seq.blocks):
        raise InvariantError(f"sequence {seq_id!r} holds a block twice: {seq.blocks}")
    if not 0 <= seq.num_computed <= seq.num_reserved <= seq.num_granted:
        raise InvariantError(
            f"sequence {seq_id!r}: need computed <= reserved <= granted, got "
            f"{seq.num_computed}, {seq.num_reserved}, {seq.num_granted}"
        )
    if len(seq.blocks) * bs < seq.num_granted:
        raise InvariantError(
            f"sequence {seq_id!r} holds {len(seq.blocks)} blocks, granted {seq.num_granted} tokens"
        )
    settled = seq.num_granted == seq.num_reserved  # no lookahead grant outstanding
    if mgr.release_lookahead and settled and len(seq.blocks) > -(-seq.num_granted // bs):
        raise InvariantError(f"sequence {seq_id!r} keeps {len(seq.blocks)} blocks past its committed length")


def _check_sequence_hashes(mgr: KVCacheManager, seq_id: Hashable, seq: _Seq) -> None:
    """With prefix caching, every full computed block is hashed and every computed token's id known;
    a sequence's hashes never disagree with the hash its block carries in the pool."""
    if mgr.enable_prefix_caching:
        if len(seq.hashes) != seq.num_computed // mgr.block_size:
            raise InvariantError(
                f"sequence {seq_id!r}: {len(seq.hashes)} hashed blocks for {seq.num_computed} computed tokens"
            )
        if len(seq.token_ids) < seq.num_computed:
            raise InvariantError(
                f"sequence {seq_id!r}: {len(seq.token_ids)} known ids < {seq.num_computed} computed"
            )
    block_hash = mgr._pool.block_hash
    for i, h in enumerate(seq.hashes):
        b = seq.blocks[i]
        if block_hash[b] is not None and block_hash[b] != h:
            raise InvariantError(f"sequence {seq_id!r}: block {b} at index {i} carries another prefix's hash")


def _check_holders(mgr: KVCacheManager) -> None:
    """Invariants 1 and 2: every block is held (its ref_count is its number of holders: block tables
    and pins) or in exactly one free queue, and the two add up to the pool."""
    pool = mgr._pool
    n = mgr.num_blocks
    holders: Counter[int] = Counter()
    for seq in mgr._seqs.values():
        holders.update(seq.blocks)
    for blocks in mgr._pins.values():
        holders.update(blocks)
    free_set = set(pool.uncached) | set(pool.cached_free)
    if len(free_set) != len(pool.uncached) + len(pool.cached_free):
        raise InvariantError("a block is in the free queues twice")
    for b in range(n):
        rc = pool.ref_count[b]
        if rc != holders[b]:
            raise InvariantError(f"block {b}: ref_count {rc} but {holders[b]} holders")
        if (rc == 0) != (b in free_set):
            where = "in" if b in free_set else "not in"
            raise InvariantError(f"block {b}: ref_count {rc} but {where} the free queues")
    if set(holders) - set(range(n)):
        raise InvariantError(
            f"holders reference blocks outside the pool: {sorted(set(holders) - set(range(n)))}"
        )
    if mgr.num_free_blocks + sum(1 for b in range(n) if pool.ref_count[b] > 0) != n:
        raise InvariantError("free blocks plus held blocks do not add up to the pool")


def _check_free_queues(pool: BlockPool) -> None:
    """Invariant 3's first rule: a free block is in the cached queue iff it has a hash."""
    for b in pool.uncached:
        if pool.block_hash[b] is not None:
            raise InvariantError(f"block {b} is in the uncached stack but has a hash")
    for b in pool.cached_free:
        if pool.block_hash[b] is None:
            raise InvariantError(f"block {b} is in the cached queue without a hash")


def _check_hash_maps(pool: BlockPool) -> None:
    """Invariant 3's maps: hash and key name one block each, both ways, and a hash is its key's SHA-256."""
    if len(pool.hash_to_block) != sum(1 for h in pool.block_hash if h is not None):
        raise InvariantError("hash map and block hashes disagree in size")
    for h, b in pool.hash_to_block.items():
        if pool.block_hash[b] != h:
            raise InvariantError(f"hash map sends a hash to block {b}, which carries another")
        key = pool.block_key[b]
        if key is None or pool.key_to_block.get(key) != b:
            raise InvariantError(f"block {b} has a hash but its lookup key is missing")
        if hash_key(key) != h:
            raise InvariantError(f"block {b}: its hash is not the SHA-256 of its key")
    if len(pool.key_to_block) != len(pool.hash_to_block):
        raise InvariantError("key map and hash map disagree in size")
    if any(pool.block_key[b] is not None for b in range(pool.num_blocks) if pool.block_hash[b] is None):
        raise InvariantError("a block without a hash keeps a lookup key")


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
