"""The Triton paged-attention kernel against the PyTorch reference on random paged layouts.

Runs on a CUDA device. Without one it is skipped, unless ``TRITON_INTERPRET=1`` is set and Triton is
installed: then the same checks run (on smaller shapes) through Triton's CPU interpreter, which is how
the kernel is checked on a machine without a GPU. (With Triton 3.6 and numpy 2.4 the interpreter fails
on this kernel's data-dependent loop bounds -- a TypeError inside triton/runtime/interpreter.py -- so
today these checks run on GPUs: 122 passed on an H200 pair, benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import pytest
import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.reference import paged_attention_ref
from tests.support.triton_device import triton_test_device

DEVICE = triton_test_device()
triton_paged = pytest.importorskip("engine.attention.triton_paged", reason="Triton is not installed")

pytestmark = pytest.mark.gpu
SMALL = DEVICE.type == "cpu"  # the interpreter is slow: shrink shapes, keep every code path


def random_tree_mask(size: int, gen: torch.Generator) -> torch.Tensor:
    """[size, size] ancestor-or-self mask of a random tree whose node 0 is the root and whose
    nodes are in topological order (a parent precedes its children), as Medusa lays them out."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[0, 0] = True
    for i in range(1, size):
        parent = int(torch.randint(0, i, (1,), generator=gen))
        mask[i] = mask[parent]
        mask[i, i] = True
    return mask


def make_batch(
    q_lens: list[int],
    ctx_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    tree: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random q and caches, each sequence's blocks scattered over a shuffled pool (with spare
    blocks holding garbage that must never be read)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 7
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_seq) + 2
    tables = torch.zeros(len(q_lens), max_blocks, dtype=torch.int32)
    taken = 0
    for b, nb in enumerate(blocks_per_seq):
        tables[b, :nb] = torch.tensor(perm[taken : taken + nb], dtype=torch.int32)
        taken += nb
    slots = []
    for b, (c, q) in enumerate(zip(ctx_lens, q_lens, strict=True)):
        for p in range(c, c + q):
            slots.append(int(tables[b, p // block_size]) * block_size + p % block_size)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    max_q = max(q_lens)
    tree_mask = None
    if tree:
        tree_mask = torch.zeros(len(q_lens), max_q, max_q, dtype=torch.bool)
        for b, ql in enumerate(q_lens):
            tree_mask[b, :ql, :ql] = random_tree_mask(ql, gen)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=qsl.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE),
        max_query_len=max_q,
        max_seq_len=max(seq_lens),
        tree_mask=tree_mask.to(DEVICE) if tree_mask is not None else None,
    )
    to = dict(device=DEVICE, dtype=dtype)
    return q.to(**to), k_cache.to(**to), v_cache.to(**to), meta


def check(q, k_cache, v_cache, meta, **kwargs) -> float:
    """Relative L2 error of the kernel against the float32 reference; also rejects NaN/inf."""
    scale = q.shape[-1] ** -0.5
    out = triton_paged.paged_attention_triton(q, k_cache, v_cache, meta, scale, **kwargs)
    ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "kernel wrote NaN/inf (or left rows unwritten)"
    err = float((out.float() - ref).norm() / ref.norm())
    assert err < 1e-2, f"relative error {err:.2e}"
    return err


# Triton 3.6's interpreter computes bf16 tl.dot wrongly (numpy has no bf16), so on CPU the bf16 cases
# run in fp16 instead; on a GPU every case runs in its own dtype.
BF16 = torch.float16 if SMALL else torch.bfloat16
DTYPES = [torch.float16, BF16]
D = 32 if SMALL else 128


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_mha(dtype, num_splits):
    ctx = [5, 40, 17, 64] if SMALL else [1, 511, 2047, 300, 1024, 77]
    check(
        *make_batch(
            [1] * len(ctx),
            ctx,
            num_heads=4 if SMALL else 32,
            num_kv_heads=4 if SMALL else 32,
            head_dim=D,
            block_size=16,
            dtype=dtype,
            seed=1,
        ),
        num_splits=num_splits,
    )


@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_decode_gqa(num_splits):
    ctx = [9, 33, 70] if SMALL else [2000, 15, 512, 900]
    check(
        *make_batch(
            [1] * len(ctx), ctx, num_heads=8, num_kv_heads=2, head_dim=D, block_size=16, dtype=BF16, seed=2
        ),
        num_splits=num_splits,
    )


@pytest.mark.parametrize("k", [1, 4, 8])
def test_verify_chunks(k):
    ctx = [20, 47] if SMALL else [511, 1500, 3, 64]
    check(
        *make_batch(
            [1 + k] * len(ctx),
            ctx,
            num_heads=4 if SMALL else 32,
            num_kv_heads=4 if SMALL else 32,
            head_dim=D,
            block_size=16,
            dtype=torch.float16,
            seed=3 + k,
        )
    )


def test_mixed_prefill_and_decode_gqa_odd_group():
    # 7 query heads per KV head (Qwen2.5-7B's ratio), a prefill from scratch, a chunk on top of
    # cached context, and decodes, in one flattened batch; block size 8 and a non-power-of-2 head_dim.
    q_lens = [23, 9, 1, 1] if SMALL else [200, 90, 1, 1, 5]
    ctx = [0, 30, 12, 3] if SMALL else [0, 333, 1000, 7, 60]
    check(
        *make_batch(
            q_lens,
            ctx,
            num_heads=14,
            num_kv_heads=2,
            head_dim=24 if SMALL else 80,
            block_size=8,
            dtype=BF16,
            seed=5,
        ),
    )


@pytest.mark.parametrize("num_splits", [None, 2])
def test_tree_mask(num_splits):
    q_lens = [13, 6] if SMALL else [65, 65, 40]
    ctx = [19, 40] if SMALL else [512, 1900, 7]
    check(
        *make_batch(
            q_lens,
            ctx,
            num_heads=4 if SMALL else 32,
            num_kv_heads=4 if SMALL else 32,
            head_dim=D,
            block_size=16,
            dtype=torch.float16,
            seed=6,
            tree=True,
        ),
        num_splits=num_splits,
    )


def test_tree_mask_causal_equals_plain_causal():
    """A lower-triangular tree_mask (a chain) must give exactly the causal result."""
    q, k_cache, v_cache, meta = make_batch(
        [5, 3], [11, 30], num_heads=4, num_kv_heads=2, head_dim=D, block_size=16, dtype=torch.float16, seed=7
    )
    scale = D**-0.5
    plain = triton_paged.paged_attention_triton(q, k_cache, v_cache, meta, scale)
    meta.tree_mask = torch.tril(torch.ones(2, 5, 5, dtype=torch.bool, device=DEVICE))
    chain = triton_paged.paged_attention_triton(q, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(plain, chain, rtol=0, atol=2e-3)


def test_reads_cache_in_place_not_past_seq_len():
    """Garbage (NaN) in slots past each sequence's length and in unused blocks never leaks in."""
    q, k_cache, v_cache, meta = make_batch(
        [1, 1, 3],
        [18, 5, 29],
        num_heads=4,
        num_kv_heads=4,
        head_dim=D,
        block_size=16,
        dtype=torch.float16,
        seed=8,
    )
    used = torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool)
    for b, s in enumerate(meta.seq_lens.tolist()):
        for p in range(s):
            used[int(meta.block_tables[b, p // 16]) * 16 + p % 16] = True
    flat_k, flat_v = k_cache.view(-1, 4, D), v_cache.view(-1, 4, D)
    ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, D**-0.5)
    flat_k[~used.to(DEVICE)] = float("nan")
    flat_v[~used.to(DEVICE)] = float("nan")
    for splits in (1, 3):
        out = triton_paged.paged_attention_triton(q, k_cache, v_cache, meta, D**-0.5, num_splits=splits)
        assert torch.isfinite(out).all()
        assert float((out.float() - ref).norm() / ref.norm()) < 1e-2


def test_split_heuristic():
    assert triton_paged.choose_num_splits(32, 512, 132) == 4
    assert triton_paged.choose_num_splits(32, 100, 132) == 1
    assert triton_paged.choose_num_splits(4096, 2048, 132) == 1
    assert triton_paged.choose_num_splits(1, 100_000, 132) == 16
    assert triton_paged.choose_tiles(1, 1) == (1, 16)
    assert triton_paged.choose_tiles(1, 4) == (1, 16)
    assert triton_paged.choose_tiles(65, 1) == (128, 128)
    assert triton_paged.choose_tiles(9, 1) == (16, 16)
    assert triton_paged.choose_tiles(300, 4) == (32, 128)
    assert triton_paged.choose_tiles(5, 7) == (8, 64)


def test_bad_input_names_the_problem():
    q, k_cache, v_cache, meta = make_batch(
        [1], [4], num_heads=4, num_kv_heads=4, head_dim=D, block_size=16, dtype=torch.float16, seed=9
    )
    with pytest.raises(ValueError, match="q must be"):
        triton_paged.paged_attention_triton(q[0], k_cache, v_cache, meta, 1.0)
    with pytest.raises(ValueError, match="tokens"):
        triton_paged.paged_attention_triton(torch.cat([q, q]), k_cache, v_cache, meta, 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        triton_paged.paged_attention_triton(q, k_cache, v_cache, meta, 1.0, num_splits=0)
