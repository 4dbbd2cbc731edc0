"""fork(): shared full blocks through reference counts, a copy for a partial last block."""

from __future__ import annotations

import pytest

import kvbm
from kvbm.invariants import check_invariants, snapshot


def _seq(mgr: kvbm.KVCacheManager, n: int) -> None:
    mgr.allocate("p", n, token_ids=list(range(n)))
    mgr.commit("p", n)


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    mgr = kvbm.KVCacheManager(8, 4)
    _seq(mgr, 10)
    parent = mgr.block_table("p")
    copies = mgr.fork("p", "c")
    child = mgr.block_table("c")
    assert child[:2] == parent[:2]
    assert copies == [(parent[2], child[2])] and child[2] != parent[2]
    assert mgr.num_computed_tokens("c") == 10
    assert mgr.num_free_blocks == 8 - 4
    assert mgr._pool.ref_count[parent[0]] == 2
    check_invariants(mgr)


def test_forked_sequences_diverge_and_free_independently() -> None:
    mgr = kvbm.KVCacheManager(8, 4)
    _seq(mgr, 8)
    assert mgr.fork("p", "c") == []  # block-aligned: nothing to copy
    for sid, tok in (("p", 1), ("c", 2)):
        mgr.allocate(sid, 1, 2)
        mgr.commit(sid, 1, token_ids=[tok])
    assert mgr.block_table("p")[2] != mgr.block_table("c")[2]
    assert mgr.token_ids("c")[-1] == 2
    mgr.free("p")
    assert mgr.num_free_blocks == 8 - 3  # the child still holds the shared two
    check_invariants(mgr)
    mgr.free("c")
    assert mgr.num_free_blocks == 8
    check_invariants(mgr)


def test_fork_without_a_free_block_for_the_copy_raises_and_changes_nothing() -> None:
    mgr = kvbm.KVCacheManager(2, 4)
    _seq(mgr, 6)
    before = snapshot(mgr)
    with pytest.raises(kvbm.OutOfBlocksError, match="needs 1 free block, 0 are free"):
        mgr.fork("p", "c")
    assert snapshot(mgr) == before
