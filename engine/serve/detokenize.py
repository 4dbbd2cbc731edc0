"""Incremental detokenization for streaming, with OpenAI stop strings.

Token ids arrive a few at a time; a byte-level tokenizer can split one character over several
tokens, so a step's text is only released once it no longer ends in an incomplete character
(U+FFFD). Decoding is windowed (a few tokens of left context) so a long output costs O(n), not O(n^2).
Stop strings end the output *before* the stop text; while the request runs, the last
``len(longest stop) - 1`` characters are held back so a stop string split across steps never leaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
# Left context kept when decoding a window: enough for tokenizers whose decode of a token depends on
# its neighbours (leading-space markers, byte fallback).
_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas; finds stop strings."""

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._stop = [s for s in stop if s]
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # tokens before this are already text
        self.text = ""  # all stable text so far (truncated at a stop string once found)
        self._emitted = 0  # characters of self.text already returned by update()
        self.stopped = False  # a stop string was found
        self.num_tokens_at_stop: int | None = None

    def update(self, new_token_ids: Sequence[int], *, finished: bool) -> str:
        """Add tokens; return the text that may be sent now (everything left when ``finished``)."""
        if self.stopped:
            return ""
        self.token_ids.extend(new_token_ids)
        searched_from = max(0, len(self.text) - self._holdback)
        self._decode_stable(final=finished)
        if self._stop:
            self._find_stop(searched_from)
        if self.stopped or finished:
            end = len(self.text)
        else:
            end = max(self._emitted, len(self.text) - self._holdback)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def _decode_stable(self, *, final: bool) -> None:
        ids = self.token_ids
        if self._read_offset >= len(ids):
            return
        prefix_text = self._tok.decode(ids[self._prefix_offset : self._read_offset])
        full_text = self._tok.decode(ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) and not final:
            return
        if full_text.endswith(_REPLACEMENT) and not final:
            return  # an incomplete character: wait for the rest of its bytes
        self.text += full_text[len(prefix_text) :]
        self._prefix_offset = max(0, len(ids) - _CONTEXT_TOKENS)
        self._read_offset = len(ids)

    def _find_stop(self, searched_from: int) -> None:
        best: int | None = None
        for s in self._stop:
            idx = self.text.find(s, max(0, searched_from - len(s) + 1))
            if idx != -1 and (best is None or idx < best):
                best = idx
        if best is not None:
            self.text = self.text[:best]
            self._emitted = min(self._emitted, best)
            self.stopped = True
            self.num_tokens_at_stop = len(self.token_ids)
