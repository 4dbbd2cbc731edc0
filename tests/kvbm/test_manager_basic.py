"""Core slot management: registration, allocate / commit / free, block tables, failures."""

from __future__ import annotations

import pytest

import kvbm
from kvbm.invariants import check_invariants


def test_first_allocate_registers_and_covers_prompt_plus_lookahead() -> None:
    mgr = kvbm.KVCacheManager(8, 4)
    new = mgr.allocate("s", 6, 3, token_ids=list(range(6)))
    assert new == mgr.block_table("s")
    assert len(new) == 3  # ceil((6 + 3) / 4)
    assert mgr.num_computed_tokens("s") == 0
    assert mgr.num_granted_tokens("s") == 9
    assert mgr.num_free_blocks == 5
    assert mgr.has_sequence("s") and not mgr.has_sequence("t")
    check_invariants(mgr)


def test_block_table_is_a_copy_and_slots_follow_the_table() -> None:
    mgr = kvbm.KVCacheManager(8, 4)
    mgr.allocate("s", 9, token_ids=list(range(9)))
    table = mgr.block_table("s")
    table.append(99)
    assert 99 not in mgr.block_table("s")
    table = mgr.block_table("s")
    slots = [table[p // 4] * 4 + p % 4 for p in range(9)]
    assert len(set(slots)) == 9


def test_commit_advances_computed_and_later_allocate_grows_the_table() -> None:
    mgr = kvbm.KVCacheManager(8, 4)
    mgr.allocate("s", 4, token_ids=[1, 2, 3, 4])
    mgr.commit("s", 4)
    assert mgr.num_computed_tokens("s") == 4
    assert len(mgr.block_table("s")) == 1
    new = mgr.allocate("s", 1)
    assert new is not None and len(new) == 1
    assert mgr.block_table("s")[1] == new[0]
    mgr.commit("s", 1, token_ids=[5])
    assert mgr.num_computed_tokens("s") == 5
    assert mgr.allocate("s", 1) == []  # room left in block 1
    check_invariants(mgr)


def test_chunked_prefill_keeps_the_reserved_prompt_blocks_across_commits() -> None:
    mgr = kvbm.KVCacheManager(8, 4)
    mgr.allocate("s", 12, token_ids=list(range(12)))
    table = mgr.block_table("s")
    mgr.commit("s", 5)  # first chunk
    assert mgr.block_table("s") == table
    mgr.commit("s", 7)  # second chunk
    assert mgr.num_computed_tokens("s") == 12
    assert mgr.block_table("s") == table
    check_invariants(mgr)


def test_failed_allocate_returns_none_and_changes_nothing() -> None:
    mgr = kvbm.KVCacheManager(4, 4)
    mgr.allocate("a", 8, token_ids=list(range(8)))
    mgr.commit("a", 8)
    before = (mgr.num_free_blocks, mgr.block_table("a"), mgr.metrics())
    assert mgr.allocate("b", 12, token_ids=list(range(100, 112))) is None
    assert not mgr.has_sequence("b")
    assert mgr.allocate("a", 1, 8) is None
    assert mgr.num_granted_tokens("a") == 8
    assert (mgr.num_free_blocks, mgr.block_table("a"), mgr.metrics()) == before
    check_invariants(mgr)


def test_free_returns_every_block_and_forgets_the_sequence() -> None:
    mgr = kvbm.KVCacheManager(6, 4)
    mgr.allocate("a", 10, 2, token_ids=list(range(10)))
    mgr.commit("a", 10)
    mgr.free("a")
    assert mgr.num_free_blocks == 6
    assert mgr.usage == 0.0
    assert not mgr.has_sequence("a")
    with pytest.raises(kvbm.UnknownSequenceError):
        mgr.block_table("a")
    check_invariants(mgr)


def test_usage_counts_held_blocks_only() -> None:
    mgr = kvbm.KVCacheManager(10, 4)
    mgr.allocate("a", 8, token_ids=list(range(8)))
    assert mgr.usage == pytest.approx(0.2)
    mgr.commit("a", 8)
    mgr.free("a")  # its two blocks stay cached but are free
    assert mgr.usage == 0.0
    assert mgr.metrics().num_cached_blocks == 2


def test_prefix_caching_off_needs_no_token_ids_and_shares_nothing() -> None:
    mgr = kvbm.KVCacheManager(8, 4, enable_prefix_caching=False)
    mgr.allocate("a", 8)
    mgr.commit("a", 8)
    mgr.allocate("b", 8, token_ids=list(range(8)))
    assert mgr.num_computed_tokens("b") == 0
    assert mgr.match_prefix(list(range(8))) == []
    assert set(mgr.block_table("a")).isdisjoint(mgr.block_table("b"))
    assert mgr.metrics().prefix_queries == 0
    check_invariants(mgr)
