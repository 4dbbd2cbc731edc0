"""The lookahead rule: k draft slots are granted by allocate() and released by commit().

Rule (kvbm/manager.py): after ``commit`` the table keeps exactly
``ceil(max(num_computed, num_reserved) / block_size)`` blocks; blocks wholly past that go back to the
pool before ``commit`` returns, and only the partial block holding the last committed token stays.
"""

from __future__ import annotations

import pytest

import kvbm
from kvbm.invariants import check_invariants

BS = 4
K = 4


def _decoding(num_blocks: int = 16, prompt_len: int = 7, **kw: bool) -> kvbm.KVCacheManager:
    """A sequence 's' whose 7-token prompt is computed: 2 blocks held, block 1 has 1 free slot."""
    mgr = kvbm.KVCacheManager(num_blocks, BS, **kw)
    mgr.allocate("s", prompt_len, token_ids=list(range(prompt_len)))
    mgr.commit("s", prompt_len)
    return mgr


def test_allocate_with_lookahead_grants_room_for_pending_token_plus_k() -> None:
    mgr = _decoding()
    assert len(mgr.block_table("s")) == 2 and mgr.num_free_blocks == 14
    new = mgr.allocate("s", 1, K)  # 7 computed + 1 pending + 4 drafts = 12 tokens = 3 blocks
    assert new is not None and len(new) == 1
    assert len(mgr.block_table("s")) == kvbm.capacity.blocks_per_sequence(7, K, BS) == 3
    assert mgr.num_granted_tokens("s") == 12
    assert mgr.num_free_blocks == 13
    check_invariants(mgr)


@pytest.mark.parametrize(
    ("accepted", "blocks_after", "free_after", "released"),
    [
        (0, 2, 14, 1),  # 8 computed: the lookahead block goes back at once
        (2, 3, 13, 0),  # 10 computed: block 2 holds tokens 8, 9 and stays
        (K, 3, 13, 0),  # 12 computed: all drafts accepted, 3 full blocks
    ],
)
def test_commit_releases_blocks_wholly_past_the_committed_length(
    accepted: int, blocks_after: int, free_after: int, released: int
) -> None:
    mgr = _decoding()
    mgr.allocate("s", 1, K)
    table = mgr.block_table("s")
    mgr.commit("s", 1 + accepted, token_ids=[100 + i for i in range(1 + accepted)])
    assert mgr.num_computed_tokens("s") == 8 + accepted
    assert mgr.block_table("s") == table[:blocks_after]
    assert mgr.num_free_blocks == free_after
    assert mgr.num_granted_tokens("s") == 8 + accepted
    assert mgr.metrics().lookahead_blocks_released == released
    check_invariants(mgr)


def test_released_lookahead_blocks_are_reused_first_and_not_hashed() -> None:
    mgr = _decoding()
    mgr.allocate("s", 1, K)
    lookahead_block = mgr.block_table("s")[2]
    mgr.commit("s", 1, token_ids=[100])  # every draft rejected
    assert mgr.metrics().num_cached_blocks == 2  # the 2 full blocks, nothing from the drafts
    new = mgr.allocate("t", 3, token_ids=[7, 7, 7])
    assert new == [lookahead_block]  # uncached blocks are handed out first
    check_invariants(mgr)


def test_lookahead_across_several_blocks_accept_some() -> None:
    mgr = _decoding(prompt_len=8)  # 2 full blocks
    new = mgr.allocate("s", 1, 8)  # 17 tokens -> 5 blocks
    assert new is not None and len(new) == 3
    mgr.commit("s", 1 + 3, token_ids=[1, 2, 3, 4])  # 12 computed -> 3 blocks
    assert len(mgr.block_table("s")) == 3
    assert mgr.num_free_blocks == 16 - 3
    assert mgr.metrics().lookahead_blocks_released == 2
    check_invariants(mgr)


def test_a_full_decode_loop_never_holds_more_than_the_capacity_formula() -> None:
    mgr = _decoding(num_blocks=64)
    accepted = [0, 4, 1, 3, 0, 2, 4, 4, 0, 1]
    for step, a in enumerate(accepted):
        ctx = mgr.num_computed_tokens("s")
        assert mgr.allocate("s", 1, K) is not None
        assert len(mgr.block_table("s")) == kvbm.capacity.blocks_per_sequence(ctx, K, BS)
        mgr.commit("s", 1 + a, token_ids=[step] * (1 + a))
        assert len(mgr.block_table("s")) == -(-mgr.num_computed_tokens("s") // BS)
        assert mgr.num_free_blocks == 64 - len(mgr.block_table("s"))
        check_invariants(mgr)
    mgr.free("s")
    assert mgr.num_free_blocks == 64


def test_keeping_lookahead_blocks_holds_them_until_free() -> None:
    mgr = _decoding(release_lookahead=False)
    mgr.allocate("s", 1, K)
    table = mgr.block_table("s")
    mgr.commit("s", 1, token_ids=[100])
    assert mgr.block_table("s") == table  # the rejected-draft block is still held
    assert mgr.num_free_blocks == 13
    assert mgr.allocate("s", 1, 0) == []  # and reused by the next step
    mgr.commit("s", 1, token_ids=[101])
    check_invariants(mgr)
    mgr.free("s")
    assert mgr.num_free_blocks == 16


def test_allocate_never_shrinks_an_outstanding_grant() -> None:
    mgr = _decoding()
    mgr.allocate("s", 1, K)
    table = mgr.block_table("s")
    assert mgr.allocate("s", 1, 0) == []
    assert mgr.block_table("s") == table
    assert mgr.num_granted_tokens("s") == 12
    mgr.commit("s", 1 + K, token_ids=[0] * (1 + K))  # the larger grant still stands
    check_invariants(mgr)


def test_lookahead_on_a_prompt_is_released_but_the_prompt_reservation_is_not() -> None:
    mgr = kvbm.KVCacheManager(16, BS)
    mgr.allocate("s", 10, K, token_ids=list(range(10)))  # 14 tokens -> 4 blocks
    assert len(mgr.block_table("s")) == 4
    mgr.commit("s", 3)  # first prefill chunk: the prompt's 3 blocks stay reserved
    assert len(mgr.block_table("s")) == 3
    mgr.commit("s", 7)
    assert len(mgr.block_table("s")) == 3
    with pytest.raises(kvbm.CommitBeyondGrantedError):
        mgr.commit("s", 1)  # the lookahead grant was dropped by the first commit
    check_invariants(mgr)
