"""Hash stability across processes, token-id validation, and the invariant checker catching damage."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import kvbm
from kvbm.invariants import InvariantError, check_invariants, snapshot

_CODE = "import kvbm; print(kvbm.block_hashes(list(range(40)), 16, ('lora-7', 3))[-1].hex())"


def test_block_hashes_agree_across_processes_and_hash_seeds() -> None:
    outs = set()
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", _CODE], capture_output=True, text=True, env=env, check=True
        )
        outs.add(out.stdout.strip())
    assert len(outs) == 1
    assert outs.pop() == kvbm.block_hashes(list(range(40)), 16, ("lora-7", 3))[-1].hex()


def test_block_hashes_equal_the_managers_stored_hashes() -> None:
    mgr = kvbm.KVCacheManager(8, 4)
    stored: list[bytes] = []
    mgr.subscribe(lambda e: stored.append(e.block_hash) if isinstance(e, kvbm.BlockStored) else None)
    mgr.allocate("a", 9, token_ids=list(range(9)), extra_keys=("salt",))
    mgr.commit("a", 9)
    assert stored == kvbm.block_hashes(list(range(9)), 4, ("salt",))


@pytest.mark.parametrize("bad", [[1, 2**63], [1, "x"], [1, 2.5]])
def test_token_ids_outside_int64_are_rejected_without_changing_state(bad: list[object]) -> None:
    mgr = kvbm.KVCacheManager(8, 4)
    mgr.allocate("a", 2, 2, token_ids=[5, 6])
    before = snapshot(mgr)
    with pytest.raises(kvbm.TokenIdsError, match="'b'.*int64"):
        mgr.allocate("b", 2, token_ids=bad)  # type: ignore[arg-type]
    with pytest.raises(kvbm.TokenIdsError, match="'a'.*int64"):
        mgr.commit("a", 2, token_ids=bad)  # type: ignore[arg-type]
    assert snapshot(mgr) == before
    mgr.commit("a", 2)
    mgr.allocate("a", 2)
    before = snapshot(mgr)
    with pytest.raises(kvbm.TokenIdsError, match="'a'.*int64"):
        mgr.commit("a", 2, token_ids=bad)  # type: ignore[arg-type]  # the decode fast path
    assert snapshot(mgr) == before
    check_invariants(mgr)


def test_the_invariant_checker_catches_damage() -> None:
    mgr = kvbm.KVCacheManager(8, 4)
    mgr.allocate("a", 8, token_ids=list(range(8)))
    mgr.commit("a", 8)
    check_invariants(mgr)
    block = mgr.block_table("a")[0]
    mgr._pool.ref_count[block] += 1  # a leaked reference
    with pytest.raises(InvariantError, match=f"block {block}: ref_count 2 but 1 holders"):
        check_invariants(mgr)
    mgr._pool.ref_count[block] -= 1
    mgr._pool.uncached.append(block)  # a held block also on the free stack
    with pytest.raises(InvariantError):
        check_invariants(mgr)
    mgr._pool.uncached.pop()
    mgr._seqs["a"].num_granted = 100  # a grant the table cannot hold
    with pytest.raises(InvariantError, match="granted 100 tokens"):
        check_invariants(mgr)


def test_metrics_snapshot_and_unsubscribe() -> None:
    mgr = kvbm.KVCacheManager(8, 4)
    seen: list[object] = []
    unsubscribe = mgr.subscribe(seen.append)
    unsubscribe()
    mgr.allocate("a", 8, token_ids=list(range(8)))
    mgr.commit("a", 8)
    assert seen == []
    d = mgr.metrics().as_dict()
    assert d["blocks_stored"] == 2 and d["num_sequences"] == 1 and d["usage"] == pytest.approx(0.25)
    with pytest.raises(TypeError, match="callable"):
        mgr.subscribe(42)  # type: ignore[arg-type]
