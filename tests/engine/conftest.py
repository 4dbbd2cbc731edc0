"""Fixtures shared by the engine core tests: the real SmolLM2-135M source and a transformers
reference model loaded from the very same (dequantized GGUF) tensors."""

from __future__ import annotations

import json

import pytest

from profiler.prompts import SPEC_BENCH


def spec_bench_prompts(n: int, *, max_chars: int = 800) -> list[str]:
    """First turns of ``n`` Spec-Bench questions, round robin over categories, skipping turns longer
    than ``max_chars`` (the CPU reference attention gathers each context per step; the long
    summarisation articles would dominate the test's time without testing anything new)."""
    if not SPEC_BENCH.is_file():
        pytest.skip(f"Spec-Bench prompts not found at {SPEC_BENCH}")
    rows = [json.loads(line) for line in SPEC_BENCH.read_text().splitlines() if line.strip()]
    by_cat: dict[str, list[str]] = {}
    for row in rows:
        if len(row["turns"][0]) <= max_chars:
            by_cat.setdefault(row["category"], []).append(row["turns"][0])
    picked: list[str] = []
    while len(picked) < n and any(by_cat.values()):
        for cat in sorted(by_cat):
            if by_cat[cat] and len(picked) < n:
                picked.append(by_cat[cat].pop(0))
    return picked


@pytest.fixture(scope="session")
def smollm2_source():
    from engine.errors import ConfigError
    from engine.presets import resolve_model

    try:
        return resolve_model("smollm2-135m", weights="real")
    except ConfigError as exc:
        pytest.skip(f"real SmolLM2 weights unavailable: {exc}")


@pytest.fixture(scope="session")
def smollm2_weights(smollm2_source):
    from engine.weights import iter_weights

    return dict(iter_weights(smollm2_source))


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_source, smollm2_weights):
    """transformers' LlamaForCausalLM (eager attention, float32) holding our dequantized tensors."""
    transformers = pytest.importorskip("transformers")
    c = smollm2_source.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=list(c.eos_token_ids),
        pad_token_id=c.eos_token_ids[0],
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(hf_config)
    missing, unexpected = model.load_state_dict(smollm2_weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source):
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="session")
def spec_bench_chat_prompts(smollm2_tokenizer) -> list[str]:
    """Spec-Bench first turns (one per category, round robin) with SmolLM2's chat template applied."""
    return [
        smollm2_tokenizer.apply_chat_template([{"role": "user", "content": q}])
        for q in spec_bench_prompts(16)
    ]
