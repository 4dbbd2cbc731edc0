"""Slot arithmetic, pure and torch, and the capacity formula agreeing with the manager."""

from __future__ import annotations

import subprocess
import sys

import pytest

import kvbm


def test_slot_ids_follow_the_block_table() -> None:
    assert kvbm.slot_ids([5, 2], range(8), 4) == [20, 21, 22, 23, 8, 9, 10, 11]
    with pytest.raises(kvbm.InvalidArgumentError, match="position 8 is outside"):
        kvbm.slot_ids([5, 2], [8], 4)


def test_torch_slot_mapping_and_block_table_tensor() -> None:
    torch = pytest.importorskip("torch")
    from kvbm.torch_utils import block_table_tensor, slot_mapping

    tables = [[3, 1], [2], [7, 4, 6]]
    positions = [range(2, 6), [0], [9]]  # a prefill chunk, a decode token, a decode token
    out = slot_mapping(tables, positions, 4)
    assert out.dtype == torch.int64
    expected = [s for t, p in zip(tables, positions, strict=True) for s in kvbm.slot_ids(t, p, 4)]
    assert out.tolist() == expected == [14, 15, 4, 5, 8, 25]
    bt = block_table_tensor(tables)
    assert bt.dtype == torch.int32 and bt.tolist() == [[3, 1, 0], [2, 0, 0], [7, 4, 6]]
    assert block_table_tensor(tables, max_blocks=5, pad=-1).shape == (3, 5)
    with pytest.raises(kvbm.InvalidArgumentError, match="max_blocks=2 but a block table has 3"):
        block_table_tensor(tables, max_blocks=2)
    with pytest.raises(kvbm.InvalidArgumentError, match="sequence 1 has positions 0..4"):
        slot_mapping(tables, [[0], range(5), []], 4)
    assert slot_mapping([[1]], [[]], 4).shape == (0,)


def test_kvbm_and_its_demo_import_without_torch() -> None:
    code = "import sys\nsys.modules['torch'] = None\nimport kvbm, kvbm.demo, kvbm.invariants\nprint('ok')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize(("ctx", "k"), [(0, 0), (7, 4), (16, 0), (14, 4), (31, 0), (100, 12)])
def test_capacity_formula_matches_what_the_manager_holds(ctx: int, k: int) -> None:
    bs = 16
    need = kvbm.capacity.blocks_per_sequence(ctx, k, bs)
    mgr = kvbm.KVCacheManager(need, bs, enable_prefix_caching=False)
    mgr.allocate("s", ctx)
    mgr.commit("s", ctx)
    assert mgr.allocate("s", 1, k) is not None  # exactly enough
    assert mgr.num_free_blocks == 0
    if 0 < -(-ctx // bs) < need:  # one block fewer must refuse the step
        mgr2 = kvbm.KVCacheManager(need - 1, bs, enable_prefix_caching=False)
        mgr2.allocate("s", ctx)
        mgr2.commit("s", ctx)
        assert mgr2.allocate("s", 1, k) is None


def test_max_concurrency_is_admitted_and_one_more_is_not() -> None:
    bs, ctx, k, blocks = 16, 100, 4, 1000
    c = kvbm.capacity.max_concurrency(blocks, ctx, k, bs)
    assert (
        kvbm.capacity.blocks_needed(c, ctx, k, bs) <= blocks < kvbm.capacity.blocks_needed(c + 1, ctx, k, bs)
    )
    mgr = kvbm.KVCacheManager(blocks, bs, enable_prefix_caching=False)
    for i in range(c):
        assert mgr.allocate(i, ctx + 1 + k) is not None
    assert mgr.allocate(c, ctx + 1 + k) is None
