"""Prefix caching: chained hashes, block-aligned hits, the last-token rule, eviction order, pins."""

from __future__ import annotations

import pytest

import kvbm
from kvbm.invariants import check_invariants

BS = 4


def _run(mgr: kvbm.KVCacheManager, seq_id: str, prompt: list[int], extra_keys: tuple = ()) -> list[int]:
    """Register, compute and commit a prompt; return its block table."""
    assert mgr.allocate(seq_id, len(prompt), token_ids=prompt, extra_keys=extra_keys) is not None
    mgr.commit(seq_id, len(prompt) - mgr.num_computed_tokens(seq_id))
    return mgr.block_table(seq_id)


def test_hashes_are_chained_over_the_whole_prefix() -> None:
    a = kvbm.block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS)
    b = kvbm.block_hashes([9, 9, 9, 9, 5, 6, 7, 8], BS)
    assert a[1] != b[1]  # same second block, different parent
    assert a[1] == kvbm.hash_block(a[0], (5, 6, 7, 8))
    assert kvbm.block_hashes([1, 2, 3], BS) == []  # partial blocks are never hashed
    assert kvbm.block_hashes([1, 2, 3, 4], BS, ("lora-a",)) != kvbm.block_hashes([1, 2, 3, 4], BS)


def test_hits_are_block_aligned_and_stop_at_the_first_miss() -> None:
    mgr = kvbm.KVCacheManager(32, BS)
    first = _run(mgr, "a", list(range(14)))  # 3 full blocks cached
    # shares blocks 0 and 1, differs in block 2, equals block 3 again: block 3 must not hit
    prompt = list(range(8)) + [99, 99, 99, 99] + list(range(12, 14)) + [0, 0, 0, 0]
    new = mgr.allocate("b", len(prompt), token_ids=prompt)
    assert new is not None
    assert mgr.num_computed_tokens("b") == 8
    assert mgr.block_table("b")[:2] == first[:2]
    assert mgr.block_table("b")[2] not in first
    assert mgr.match_prefix(list(range(10))) == first[:2]
    check_invariants(mgr)


def test_whole_prompt_hit_still_recomputes_the_last_token() -> None:
    mgr = kvbm.KVCacheManager(16, BS)
    table = _run(mgr, "a", list(range(8)))
    mgr.free("a")
    mgr.allocate("b", 8, token_ids=list(range(8)))
    assert mgr.num_computed_tokens("b") == 4  # block 1 holds the last token: recomputed
    assert mgr.block_table("b")[0] == table[0]
    assert mgr.block_table("b")[1] != table[1]
    assert mgr.match_prefix(list(range(8))) == table  # the read-only lookup sees both
    # one more token than the cached prefix: both cached blocks are reused
    mgr.allocate("c", 9, token_ids=list(range(9)))
    assert mgr.num_computed_tokens("c") == 8
    assert mgr.block_table("c")[:2] == table
    check_invariants(mgr)


def test_extra_keys_isolate_caches() -> None:
    mgr = kvbm.KVCacheManager(16, BS)
    _run(mgr, "a", list(range(9)), extra_keys=("adapter-1",))
    mgr.allocate("b", 9, token_ids=list(range(9)), extra_keys=("adapter-2",))
    assert mgr.num_computed_tokens("b") == 0
    mgr.allocate("c", 9, token_ids=list(range(9)), extra_keys=("adapter-1",))
    assert mgr.num_computed_tokens("c") == 8
    assert mgr.match_prefix(list(range(9))) == []
    with pytest.raises(kvbm.InvalidArgumentError, match="extra_keys"):
        mgr.allocate("d", 1, token_ids=[1], extra_keys=(object(),))


def test_decode_tokens_are_hashed_once_committed_but_drafts_never() -> None:
    mgr = kvbm.KVCacheManager(16, BS)
    _run(mgr, "a", [1, 2, 3])
    mgr.allocate("a", 1, 4)
    mgr.commit("a", 1, token_ids=[4])  # drafts [5, 6, 7, 8] were rejected
    full = [1, 2, 3, 4]
    assert len(mgr.match_prefix(full)) == 1
    assert mgr.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]) == mgr.block_table("a")[:1]
    mgr.allocate("a", 1, 4)
    mgr.commit("a", 3, token_ids=[10, 11, 12])  # 7 computed: block 1 is partial, not hashed
    assert mgr.metrics().blocks_stored == 1
    assert len(mgr.match_prefix([1, 2, 3, 4, 10, 11, 12, 13])) == 1
    mgr.allocate("a", 1)
    mgr.commit("a", 1, token_ids=[13])
    assert mgr.match_prefix([1, 2, 3, 4, 10, 11, 12, 13]) == mgr.block_table("a")
    check_invariants(mgr)


def test_commit_needs_ids_past_the_prompt_and_checks_known_ones() -> None:
    mgr = kvbm.KVCacheManager(16, BS)
    _run(mgr, "a", [1, 2, 3])
    mgr.allocate("a", 1)
    with pytest.raises(kvbm.TokenIdsError, match="'a'"):
        mgr.commit("a", 1)
    with pytest.raises(kvbm.TokenIdsError, match="2 ids for 1 tokens"):
        mgr.commit("a", 1, token_ids=[4, 5])
    mgr.allocate("b", 4, token_ids=[1, 2, 3, 4])
    with pytest.raises(kvbm.TokenIdsError, match="differ"):
        mgr.commit("b", 4, token_ids=[1, 2, 3, 5])
    mgr.commit("b", 4, token_ids=[1, 2, 3, 4])  # agreeing ids are accepted
    check_invariants(mgr)


def test_hit_and_miss_counters() -> None:
    mgr = kvbm.KVCacheManager(32, BS)
    _run(mgr, "a", list(range(10)))
    _run(mgr, "b", list(range(10)))  # hits 8 of 10 tokens
    _run(mgr, "c", [50] * 10)  # misses
    m = mgr.metrics()
    assert (m.prefix_queries, m.prefix_hit_queries) == (3, 1)
    assert (m.prefix_query_tokens, m.prefix_hit_tokens, m.prefix_miss_tokens) == (30, 8, 22)
    assert m.prefix_hit_rate == pytest.approx(8 / 30)
    assert m.query_hit_rate == pytest.approx(1 / 3)
    mgr.match_prefix(list(range(10)))  # read-only: counts nothing
    assert mgr.metrics() == m


def test_uncached_blocks_are_reused_before_cached_ones() -> None:
    mgr = kvbm.KVCacheManager(4, BS)
    cached = _run(mgr, "a", list(range(4)) + [9])  # block 0 full (hashed), block 1 partial
    mgr.free("a")
    new = mgr.allocate("b", 12, token_ids=[7] * 12)  # needs 3 blocks of the 4 free
    assert new is not None and cached[0] not in new
    assert mgr.metrics().evictions == 0
    assert mgr.match_prefix(list(range(4))) == cached[:1]


def test_cached_blocks_are_evicted_lru_and_a_freed_chain_from_its_tail() -> None:
    mgr = kvbm.KVCacheManager(6, BS)
    old = _run(mgr, "old", [1] * 8)  # 2 blocks, freed first
    mgr.free("old")
    young = _run(mgr, "young", [2] * 12)  # 3 blocks, freed later
    mgr.free("young")
    assert mgr.num_free_blocks == 6 and mgr.metrics().num_cached_blocks == 5
    removed: list[int] = []
    mgr.subscribe(lambda e: removed.append(e.block_id) if isinstance(e, kvbm.BlockRemoved) else None)
    mgr.allocate("x", 12, token_ids=[3] * 12)  # 1 uncached + evicts 2
    assert removed == [old[1], old[0]]  # the least recently freed chain, tail first
    mgr.free("x")
    removed.clear()
    mgr.allocate("y", 8, token_ids=[4] * 8)  # x's 3 uncached blocks go first
    mgr.allocate("z", 16, token_ids=[5] * 16)
    assert removed[:3] == [young[2], young[1], young[0]]


def test_a_block_hit_by_an_allocation_is_not_evicted_by_it() -> None:
    mgr = kvbm.KVCacheManager(3, BS)
    lru = _run(mgr, "a", [1, 1, 1, 1, 0])[0]  # freed first: the least recently used cached block
    mgr.free("a")
    other = _run(mgr, "b", [2, 2, 2, 2, 0])[0]
    mgr.free("b")
    # 1 uncached + 2 cached free. 'c' hits the LRU block and needs 2 more: the uncached one and an
    # eviction, which must take 'other' although the hit block is first in LRU order
    new = mgr.allocate("c", 12, token_ids=[1, 1, 1, 1] + [3] * 8)
    assert new is not None and new[0] == lru
    assert other in new
    assert len(set(new)) == 3
    assert mgr.num_computed_tokens("c") == 4
    assert mgr.metrics().evictions == 1
    check_invariants(mgr)


def test_failed_allocate_with_a_hit_changes_nothing() -> None:
    from kvbm.invariants import snapshot

    mgr = kvbm.KVCacheManager(3, BS)
    _run(mgr, "a", list(range(8)) + [0])
    mgr.free("a")
    before = snapshot(mgr)
    assert mgr.allocate("b", 20, token_ids=list(range(8)) + [2] * 12) is None
    assert snapshot(mgr) == before


def test_duplicate_blocks_computed_twice_are_stored_once() -> None:
    mgr = kvbm.KVCacheManager(16, BS)
    stored: list[kvbm.BlockStored] = []
    mgr.subscribe(lambda e: stored.append(e) if isinstance(e, kvbm.BlockStored) else None)
    mgr.allocate("a", 5, token_ids=[1] * 5)
    mgr.allocate("b", 5, token_ids=[1] * 5)  # before 'a' committed: no hit
    mgr.commit("a", 5)
    mgr.commit("b", 5)
    assert len(stored) == 1
    assert mgr.metrics().num_cached_blocks == 1
    mgr.free("a")
    mgr.free("b")
    check_invariants(mgr)


def test_events_carry_parent_hashes_so_chains_can_be_rebuilt() -> None:
    mgr = kvbm.KVCacheManager(4, BS)
    events: list[kvbm.KVEvent] = []
    unsubscribe = mgr.subscribe(events.append)
    _run(mgr, "a", list(range(9)))
    stored = [e for e in events if isinstance(e, kvbm.BlockStored)]
    assert [e.parent_hash for e in stored] == [None, stored[0].block_hash]
    assert stored[1].token_ids == (4, 5, 6, 7)
    assert [e.block_id for e in stored] == mgr.block_table("a")[:2]
    # a router's view: hash -> (parent, tokens); walking parents rebuilds the prefix
    tree = {e.block_hash: (e.parent_hash, e.token_ids) for e in stored}
    h, tokens = stored[1].block_hash, []
    while h is not None:
        h, toks = tree[h]
        tokens[:0] = toks
    assert tokens == list(range(8))
    mgr.free("a")
    mgr.allocate("b", 16, token_ids=[7] * 16)  # evicts both cached blocks
    removed = [e for e in events if isinstance(e, kvbm.BlockRemoved)]
    assert {e.block_hash for e in removed} == set(tree)
    unsubscribe()
    mgr.free("b")
    mgr.reset_prefix_cache()
    assert not any(isinstance(e, kvbm.AllBlocksCleared) for e in events)


def test_reset_prefix_cache_refuses_while_blocks_are_held() -> None:
    mgr = kvbm.KVCacheManager(8, BS)
    _run(mgr, "a", list(range(9)))
    with pytest.raises(kvbm.CacheBusyError, match="3 blocks are held by 1 sequences"):
        mgr.reset_prefix_cache()
    assert mgr.match_prefix(list(range(8))) != []
    mgr.free("a")
    events: list[kvbm.KVEvent] = []
    mgr.subscribe(events.append)
    assert mgr.reset_prefix_cache() == 2
    assert events == [kvbm.AllBlocksCleared(2)]
    assert mgr.match_prefix(list(range(8))) == []
    assert mgr.num_free_blocks == 8
    check_invariants(mgr)


def test_pinned_prefix_survives_pressure_and_unpin_releases_it() -> None:
    mgr = kvbm.KVCacheManager(4, BS)
    system = list(range(8))
    table = _run(mgr, "a", system + [0])
    mgr.free("a")
    assert mgr.pin("system", system) == table[:2]
    assert mgr.num_free_blocks == 2
    assert mgr.allocate("big", 12, token_ids=[9] * 12) is None  # would have to evict the pin
    assert mgr.allocate("ok", 8, token_ids=[9] * 8) is not None
    mgr.free("ok")
    with pytest.raises(kvbm.CacheBusyError, match="1 pins"):
        mgr.reset_prefix_cache()
    with pytest.raises(kvbm.SequenceExistsError):
        mgr.pin("system", system)
    mgr.allocate("user", 9, token_ids=system + [5])
    assert mgr.num_computed_tokens("user") == 8  # the pinned prefix hits
    mgr.free("user")
    mgr.unpin("system")
    with pytest.raises(kvbm.UnknownPinError, match="'system'"):
        mgr.unpin("system")
    assert mgr.num_free_blocks == 4
    assert mgr.pins == {}
    check_invariants(mgr)
