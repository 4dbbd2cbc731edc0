"""The fused Triton kernels (engine.kernels) against the exact eager reference, and the whole Llama
model with them against ``SPECPLAN_FUSED_KERNELS=0``.

Runs on a CUDA device. Without one it is skipped, unless ``TRITON_INTERPRET=1`` is set and Triton is
installed: then the same checks run (on smaller shapes) through Triton's CPU interpreter.
"""

from __future__ import annotations

import pytest
import torch

import engine.kernels as kernels
from engine.attention.metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.kernels.reference import (
    fused_add_rmsnorm_ref,
    rope_and_write_kv_ref,
    rope_ref,
    silu_and_mul_ref,
)
from tests.support.triton_device import triton_test_device

DEVICE = triton_test_device()
fused = pytest.importorskip("engine.kernels.fused_triton", reason="Triton is not installed")

pytestmark = pytest.mark.gpu
SMALL = DEVICE.type == "cpu"  # the interpreter is slow: shrink shapes, keep every code path
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# one or two units in the last place of each dtype (the kernels round where eager does, but reduce
# and take rsqrt/exp in another order)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}


def exact(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Bit-equal, except bf16 under the interpreter: Triton 3.6's interpreter truncates float32 to
    bf16 instead of rounding to nearest even (a GPU rounds), so there an ulp of slack is allowed."""
    if SMALL and dtype == torch.bfloat16:
        close(actual, expected, dtype)
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOL[dtype] * scale
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("hidden", [96, 512 if SMALL else 4096])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm(dtype, tokens, hidden, with_residual):
    gen = torch.Generator().manual_seed(tokens * 7 + hidden)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    res = (torch.randn(tokens, hidden, generator=gen) * 3).to(DEVICE, dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    x0, r0 = x.clone(), None if res is None else res.clone()
    out, new_res = fused.fused_add_rmsnorm(x, res, w, 1e-6)
    ref_out, ref_res = fused_add_rmsnorm_ref(x, res, w, 1e-6)
    # the residual sum is one rounding of an exact float32 sum, as the eager add: bit-equal
    exact(new_res, ref_res, dtype)
    close(out, ref_out, dtype)
    assert torch.equal(x, x0) and (res is None or torch.equal(res, r0)), "inputs must be untouched"


def test_add_rmsnorm_strided_rows():
    """Rows with a stride (a slice of a wider buffer) are read through their stride."""
    wide = torch.randn(5, 200, dtype=torch.float16).to(DEVICE)
    x, res = wide[:, :96], wide[:, 100:196]
    w = torch.rand(96, dtype=torch.float16).to(DEVICE)
    out, new_res = fused.fused_add_rmsnorm(x, res, w, 1e-5)
    ref_out, ref_res = fused_add_rmsnorm_ref(x, res, w, 1e-5)
    torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)
    close(out, ref_out, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("inter", [88, 256 if SMALL else 11008])
def test_silu_and_mul(dtype, tokens, inter):
    gen = torch.Generator().manual_seed(tokens + inter)
    gate_up = (torch.randn(tokens, 2 * inter, generator=gen) * 2).to(DEVICE, dtype)
    close(fused.silu_and_mul(gate_up), silu_and_mul_ref(gate_up), dtype)


def make_rope_case(
    tokens: int, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    """q/k/v as views of one fused qkv output (as the model has them), caches full of garbage,
    scattered slots and positions."""
    gen = torch.Generator().manual_seed(seed)
    max_pos, num_blocks, block_size = 4096, 9, 8
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    emb = torch.cat((emb, emb), dim=-1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d)
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(DEVICE, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(DEVICE)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(DEVICE)
    return positions, q, k, v, cos, sin, k_cache, v_cache, slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 4, 64), (8, 2, 128), (6, 3, 64), (32, 8, 128)])
def test_rope_and_write_kv(dtype, tokens, hq, hkv, d):
    if SMALL and hq == 32 and tokens == 64:
        pytest.skip("slow under the interpreter; the shape is covered on a GPU")
    pos, q, k, v, cos, sin, kc, vc, slots = make_rope_case(tokens, hq, hkv, d, dtype, seed=tokens + d)
    k0, v0 = k.clone(), v.clone()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref = rope_and_write_kv_ref(pos, q.clone(), k, v, cos, sin, kc_ref, vc_ref, slots)
    # float32 rotation rounded once: compare against the float32 reference, to about an ulp
    q32, k32 = rope_ref(pos, q.float(), k.float(), cos, sin)
    q_out = fused.rope_and_write_kv(pos, q, k, v, cos, sin, kc, vc, slots)
    close(q_out, q32.to(dtype), dtype)
    close(q_out, q_ref, dtype, scale=4)  # the eager path rounds the tables and each product
    flat_k, flat_v = kc.view(-1, hkv, d), vc.view(-1, hkv, d)
    close(flat_k[slots], k32.to(dtype), dtype)
    torch.testing.assert_close(flat_v[slots], v, rtol=0, atol=0)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert torch.equal(flat_k[untouched], kc_ref.view(-1, hkv, d)[untouched])
    assert torch.equal(flat_v[untouched], vc_ref.view(-1, hkv, d)[untouched])
    assert torch.equal(k, k0) and torch.equal(v, v0), "k and v must be untouched"


def test_rope_skips_negative_slots():
    pos, q, k, v, cos, sin, kc, vc, slots = make_rope_case(3, 4, 2, 64, torch.float16, seed=1)
    slots[1] = -1
    kc0, vc0 = kc.clone(), vc.clone()
    fused.rope_and_write_kv(pos, q, k, v, cos, sin, kc, vc, slots)
    changed = (kc != kc0).flatten(2).any(-1).flatten() | (vc != vc0).flatten(2).any(-1).flatten()
    assert set(torch.nonzero(changed).flatten().tolist()) <= {int(slots[0]), int(slots[2])}


def test_env_switch(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "0")
    kernels.fused_enabled.cache_clear()
    try:
        assert not kernels.fused_enabled()
        monkeypatch.setenv(kernels.ENV_VAR, "1")
        kernels.fused_enabled.cache_clear()
        assert kernels.fused_enabled()
    finally:
        kernels.fused_enabled.cache_clear()


# -- the whole model ------------------------------------------------------------------------------
TINY = ModelConfig(
    name="tiny-fused",
    num_layers=2,
    hidden_size=128,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=176,
    vocab_size=101,
    max_position_embeddings=256,
)


def build_model(dtype: torch.dtype):  # noqa: ANN201
    from engine.model.llama import LlamaForCausalLM
    from engine.weights.random import iter_random_weights

    # built as engine.model.loader does: parameters in ``dtype``, the rope tables stay float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(TINY, attn_backend="torch" if SMALL else "auto")
    finally:
        torch.set_default_dtype(old)
    assert model.rope.cos.dtype == torch.float32
    model.load_weights(iter_random_weights(TINY, seed=3, dtype=dtype, device=DEVICE))
    model.set_attn_backend("torch" if SMALL else "auto")
    return model.eval()


def generate(model, dtype: torch.dtype, prompts: list[list[int]], steps: int, forced=None):  # noqa: ANN001, ANN201
    """Prefill both prompts in one flattened batch, then ``steps`` greedy decode steps (feeding
    ``forced`` tokens instead of the argmax when given). Returns (tokens [steps+1, B], logits)."""
    bs, blocks_per_seq = 4, 8
    num_blocks = len(prompts) * blocks_per_seq + 3
    d, hkv = TINY.head_dim, TINY.num_kv_heads
    caches = [
        (
            torch.zeros(num_blocks, bs, hkv, d, dtype=dtype, device=DEVICE),
            torch.zeros(num_blocks, bs, hkv, d, dtype=dtype, device=DEVICE),
        )
        for _ in range(TINY.num_layers)
    ]
    # sequences own blocks in reverse, interleaved order so slots are scattered
    tables = torch.tensor(
        [
            [num_blocks - 1 - (j * len(prompts) + b) for j in range(blocks_per_seq)]
            for b in range(len(prompts))
        ],
        dtype=torch.int32,
    )
    lens = [0] * len(prompts)
    chunks = [list(p) for p in prompts]
    out_tokens, out_logits = [], []
    for step in range(steps + 1):
        ids, pos, slots, qsl = [], [], [], [0]
        for b, chunk in enumerate(chunks):
            for tok in chunk:
                p = lens[b]
                ids.append(tok)
                pos.append(p)
                slots.append(int(tables[b, p // bs]) * bs + p % bs)
                lens[b] += 1
            qsl.append(qsl[-1] + len(chunk))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
            block_tables=tables.to(DEVICE),
            max_query_len=max(len(c) for c in chunks),
            max_seq_len=max(lens),
        )
        with torch.no_grad():
            hidden = model(torch.tensor(ids, device=DEVICE), torch.tensor(pos, device=DEVICE), caches, meta)
            last = torch.tensor(qsl[1:], device=DEVICE) - 1
            logits = model.compute_logits(hidden[last])
        nxt = logits.argmax(-1)
        out_tokens.append(nxt.cpu())
        out_logits.append(logits.cpu())
        feed = forced[step] if forced is not None else nxt.cpu()
        chunks = [[int(t)] for t in feed]
    return torch.stack(out_tokens), torch.stack(out_logits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_fused_matches_unfused(dtype, monkeypatch):
    """Greedy tokens equal (float32) and logits close with the fused kernels on and off."""
    model = build_model(dtype)
    prompts = [[5, 17, 3, 99, 42, 8, 61], [7, 1, 100]]
    steps = 4 if SMALL else 12
    monkeypatch.setattr(kernels, "_use_fused", lambda t: False)
    ref_tokens, ref_logits = generate(model, dtype, prompts, steps)
    monkeypatch.setattr(kernels, "_use_fused", lambda t: True)
    tokens, logits = generate(model, dtype, prompts, steps, forced=ref_tokens)  # same inputs
    scale = float(ref_logits.abs().max())
    atol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}[dtype] * scale
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=atol)
    top2 = ref_logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * atol  # argmax is well defined where not a near tie
    assert torch.equal(tokens[clear], ref_tokens[clear])
    if dtype == torch.float32:
        free_tokens, _ = generate(model, dtype, prompts, steps)
        assert torch.equal(free_tokens, ref_tokens)


def test_model_cpu_default_is_reference():
    """On CPU tensors the dispatcher never picks Triton (bit-identical eager path)."""
    assert not kernels._use_fused(torch.zeros(1))
