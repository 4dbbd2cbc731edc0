"""Real SmolLM2-135M-Instruct in float32: the engine's greedy tokens equal transformers' greedy tokens
on 16 Spec-Bench prompts (engine side batched in one engine), and the chat answer is sensible."""

from __future__ import annotations

import pytest
import torch

from engine.llm import LLM
from engine.sampling import SamplingParams

pytestmark = pytest.mark.slow


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation with its KV cache, never stopping at EOS (like ignore_eos;
    ``generate(min_new_tokens=...)`` would instead forbid EOS and change the argmax)."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    past, tokens = out.past_key_values, []
    for _ in range(n):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokens


NUM_PROMPTS = 16
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def llm(smollm2_source):
    return LLM("smollm2-135m", dtype="float32", device="cpu", weights="real", max_num_seqs=16)


def test_greedy_matches_transformers_on_spec_bench(llm, hf_smollm2, request):
    prompts = request.getfixturevalue("spec_bench_chat_prompts")[:NUM_PROMPTS]
    ids = [llm.tokenizer.encode(p) for p in prompts]
    outs = llm.generate(ids, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.num_blocks
    mismatches = []
    for i, (prompt_ids, out) in enumerate(zip(ids, outs, strict=True)):
        ref = hf_greedy(hf_smollm2, prompt_ids, NEW_TOKENS)
        assert len(out.token_ids) == NEW_TOKENS
        if out.token_ids != ref:
            mismatches.append((i, out.token_ids, ref))
    assert not mismatches, mismatches[:1]


def test_capital_of_france(llm):
    (out,) = llm.generate(["What is the capital of France?"], SamplingParams(max_tokens=32), chat=True)
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
