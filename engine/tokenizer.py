"""Tokenizers for every model source: a ``tokenizer.json`` (HF directory), the vocabulary stored in a
GGUF file (GPT-2 style byte-level BPE rebuilt with the ``tokenizers`` library), or a byte-level
fallback for random-weight presets. Chat templates are rendered with jinja2 the way transformers
does, so prompts match what the model was trained on."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.presets import ModelSource

# A plain template for models without one (random-weight presets with the byte tokenizer).
_DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

# llama.cpp pre-tokenizer names whose splitting rule is GPT-2's regex, optionally with single digits.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "deepseek-coder"}
_NOT_A_BYTE = "\u25a1".encode()  # a byte tokenizer shows an id that is no byte as a white square


class Tokenizer:
    """encode/decode plus the chat template; the one text interface of the engine."""

    def __init__(
        self,
        backend: Any | None,
        *,
        eos_token_ids: Sequence[int],
        bos_token_id: int | None,
        add_bos: bool,
        chat_template: str | None,
        bos_token: str = "",
        eos_token: str = "",
        vocab_size: int | None = None,
    ) -> None:
        self._tok = backend  # tokenizers.Tokenizer, or None for the byte tokenizer
        self.eos_token_ids: tuple[int, ...] = tuple(int(e) for e in eos_token_ids)
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template or _DEFAULT_TEMPLATE
        self.bos_token, self.eos_token = bos_token, eos_token
        self.vocab_size = vocab_size if vocab_size is not None else backend.get_vocab_size()
        self._compiled: Any = None

    # -- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; a BOS is prepended when the model expects one."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if self._tok is None:
            ids = list(text.encode("utf-8"))
        else:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        if self._tok is None:
            return self._decode_bytes(ids, skip_special_tokens)
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _decode_bytes(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        """Byte tokenizer: ids below 256 are bytes; any other id (a random-weight model draws from its
        whole vocabulary) is a white square (U+25A1), so every generated token shows as text: a stream whose
        tokens decode to nothing, or to U+FFFD (which detokenizers hold back as a partial character),
        carries no timing to its client."""
        special = {self.bos_token_id, *self.eos_token_ids} if skip_special_tokens else set()
        data = bytearray()
        for i in ids:
            if 0 <= i < 256:
                data.append(i)
            elif i not in special:
                data += _NOT_A_BYTE
        return data.decode("utf-8", errors="replace")

    # -- chat -------------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) to the prompt text."""
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise ValueError(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r}")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        return self._compiled.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


def _compile_template(source: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def load_tokenizer(source: ModelSource) -> Tokenizer:
    """The tokenizer a ``ModelSource`` names (``hf``, ``gguf`` or ``bytes``)."""
    cfg = source.config
    if source.tokenizer == "bytes":
        return Tokenizer(
            None,
            eos_token_ids=cfg.eos_token_ids,
            bos_token_id=cfg.bos_token_id,
            add_bos=cfg.bos_token_id is not None,
            chat_template=None,
            vocab_size=cfg.vocab_size,
        )
    if source.tokenizer_path is None:
        raise ConfigError(f"model {cfg.name!r}: tokenizer {source.tokenizer!r} has no path")
    if source.tokenizer == "gguf":
        return _from_gguf(Path(source.tokenizer_path), cfg.eos_token_ids)
    if source.tokenizer == "hf":
        return _from_hf(Path(source.tokenizer_path), cfg.eos_token_ids, cfg.bos_token_id)
    raise ConfigError(f"model {cfg.name!r}: unknown tokenizer kind {source.tokenizer!r}")


def _from_hf(path: Path, eos_ids: Sequence[int], bos_id: int | None) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(path))
    cfg_file = path.with_name("tokenizer_config.json")
    cfg: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    template = cfg.get("chat_template")
    jinja_file = path.with_name("chat_template.jinja")
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)

    def token_text(key: str) -> str:
        value = cfg.get(key) or ""
        return value.get("content", "") if isinstance(value, dict) else str(value)

    bos_token = token_text("bos_token")
    if bos_token and tok.token_to_id(bos_token) is not None:
        bos_id = tok.token_to_id(bos_token)
    return Tokenizer(
        tok,
        eos_token_ids=eos_ids,
        bos_token_id=bos_id,
        add_bos=bool(cfg.get("add_bos_token", False)) and bos_id is not None,
        chat_template=template,
        bos_token=bos_token,
        eos_token=token_text("eos_token"),
    )


def _from_gguf(path: Path, eos_ids: Sequence[int]) -> Tokenizer:
    """Rebuild the byte-level BPE stored in GGUF metadata (``tokenizer.ggml.model == "gpt2"``)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from engine.weights.gguf import _reader, field_value

    r = _reader(path)
    kind = field_value(r, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigError(
            f"GGUF {str(path)!r}: tokenizer.ggml.model {kind!r} is not supported (gpt2 BPE only)"
        )
    tokens: list[str] = list(field_value(r, "tokenizer.ggml.tokens"))
    types: list[int] = list(field_value(r, "tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in field_value(r, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = field_value(r, "tokenizer.ggml.pre") or "default"
    if pre in _DIGIT_SPLIT_PRE:
        digits = pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are matched whole before BPE, as in the original.
    specials = [
        AddedToken(t, special=(ty == 3), normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (3, 4)
    ]
    tok.add_tokens(specials)
    bos_id = field_value(r, "tokenizer.ggml.bos_token_id")
    eos_id = field_value(r, "tokenizer.ggml.eos_token_id")
    return Tokenizer(
        tok,
        eos_token_ids=eos_ids,
        bos_token_id=bos_id,
        add_bos=bool(field_value(r, "tokenizer.ggml.add_bos_token", False)) and bos_id is not None,
        chat_template=field_value(r, "tokenizer.chat_template"),
        bos_token=tokens[bos_id] if bos_id is not None else "",
        eos_token=tokens[eos_id] if eos_id is not None else "",
        vocab_size=len(tokens),
    )
