"""The paged model reproduces transformers' logits for real SmolLM2 weights, in one prefill and when
the same prompt is split into prefill + decode steps over scattered KV blocks."""

from __future__ import annotations

import pytest
import torch

from engine.runner import ModelRunner, SeqBatchEntry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runner(smollm2_source):
    return ModelRunner(smollm2_source, dtype="float32", device="cpu", num_blocks=64, block_size=16)


def test_prefill_logits_match_transformers(runner, hf_smollm2, smollm2_tokenizer):
    prompt = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    ids = smollm2_tokenizer.encode(prompt)
    table = [9, 3, 30, 11][: -(-len(ids) // 16)]
    input_ids, positions, meta = runner.prepare([SeqBatchEntry(ids, table, 0)])
    _, logits = runner.execute(input_ids, positions, meta, None)
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].float()
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits, ref, atol=2e-3, rtol=1e-3)
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_chunked_prefill_and_decode_match_transformers(runner, hf_smollm2):
    ids = list(range(100, 140))
    table = [5, 17, 2]
    outs = []
    for start, end in ((0, 21), (21, 22), (22, 37), (37, 40)):
        input_ids, positions, meta = runner.prepare([SeqBatchEntry(ids[start:end], table, start)])
        _, logits = runner.execute(input_ids, positions, meta, None)
        outs.append(logits)
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(torch.cat(outs), ref, atol=2e-3, rtol=1e-3)


def test_gguf_tensors_equal_transformers_gguf_reader(smollm2_source, smollm2_weights):
    """Our dequantize + Q/K un-permute yields exactly the tensors transformers' own GGUF loader makes
    (the logits tests above share our tensors, so they cannot catch a wrong un-permute)."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_source.path.parent), gguf_file=smollm2_source.path.name, dtype=torch.float32
    ).state_dict()
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.7.self_attn.k_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ):
        torch.testing.assert_close(smollm2_weights[name], ref[name], atol=0, rtol=0)
