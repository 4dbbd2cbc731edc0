"""Tokenizers: the GGUF vocabulary rebuilt as byte-level BPE, its chat template, and the byte fallback."""

from __future__ import annotations

import pytest

from engine.presets import resolve_model
from engine.tokenizer import load_tokenizer


def test_gguf_tokenizer_round_trips_and_keeps_specials_whole(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Hello world! Ünïcödé, 2024 digits\n\tand  spaces."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>user")[0] == 1  # a control token is one id, not pieces
    assert tok.eos_token_ids == (2,)
    assert tok.encode("12") == [tok.encode("1")[0], tok.encode("2")[0]]  # SmolLM splits digits


def test_gguf_tokenizer_agrees_with_transformers_on_plain_text(smollm2_source, smollm2_tokenizer):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(
        str(smollm2_source.path.parent), gguf_file=smollm2_source.path.name
    )
    # transformers' GGUF converter omits SmolLM's digit splitting, so compare text without digits
    text = "Write a persuasive email to convince your introverted friend to volunteer as a guest speaker."
    assert smollm2_tokenizer.encode(text) == ref.encode(text, add_special_tokens=False)


def test_chat_template_from_gguf(smollm2_tokenizer):
    prompt = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_rejects_malformed_messages(smollm2_tokenizer):
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        smollm2_tokenizer.apply_chat_template([{"role": "user"}])


def test_byte_tokenizer_for_random_presets():
    tok = load_tokenizer(resolve_model("tiny"))
    ids = tok.encode("héllo")
    assert ids[0] == 256  # BOS
    assert tok.decode(ids) == "héllo"
    assert tok.eos_token_ids == (257,)
    # a random-weight model draws ids beyond the bytes: each shows as a white square (so it streams)
    assert tok.decode([104, 300, 105, 257]) == "h\u25a1i"
    assert tok.decode([104, 257], skip_special_tokens=False) == "h\u25a1"
    assert "assistant" in tok.apply_chat_template([{"role": "user", "content": "x"}])
