"""OpenAI request and response documents (the subset `engine serve` honours).

Requests validate strictly: a field of the wrong type or out of range is rejected with its name and
value, and a field the engine cannot honour (``n > 1``, ``logprobs``, penalties) is rejected rather
than silently ignored, so a benchmark never measures something other than what it asked for.
Unknown extra fields are ignored, as OpenAI clients send optional fields (``user``) freely. Text that
is not valid Unicode (a lone surrogate such as ``"\\ud800"``, which JSON can spell) is rejected with the
field that holds it, since it cannot be tokenized or sent back.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 16


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


def _lone_surrogate_path(value: Any, path: str) -> str | None:
    """The path of the first string under ``value`` that UTF-8 cannot encode, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        items: Any = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((p for p in (_lone_surrogate_path(v, sub) for sub, v in items) if p), None)


# Accepted only at their neutral value (the engine implements none of them): field -> neutral values.
_NEUTRAL_ONLY: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "top_k": (None, -1, 0),
    "min_tokens": (None, 0),
}


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat; strict types so "abc" never becomes a number."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_invalid_text_and_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        where = _lone_surrogate_path(data, "")
        if where is not None:
            raise ValueError(f"{where}: text contains a lone surrogate (not valid Unicode)")
        for name, neutral in _NEUTRAL_ONLY.items():
            value = data.get(name)
            if not any(value == n and type(value) is type(n) for n in neutral):
                raise ValueError(f"{name}: not supported by this engine, got {value!r}")
        return data

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension, used by benchmarks to fix the output length
    # Accepted only at their neutral value: the engine implements none of them.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _int_is_float(cls, v: Any) -> Any:
        # JSON has one number type: 1 is as good a temperature as 1.0 (bool is not a number).
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _check_unsupported(self) -> _SamplingFields:
        if self.n != 1:
            raise ValueError(f"n: only n=1 is supported, got {self.n}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value not in (None, 0.0):
                raise ValueError(f"{name}: not supported by this engine (only 0), got {value}")
        if self.logprobs not in (None, False, 0):
            raise ValueError(f"logprobs: not supported by this engine, got {self.logprobs!r}")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by this engine")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("max_tokens")
    @classmethod
    def _positive_max_tokens(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("must be at least 1")
        return v

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list) and len(p) != 1:
            raise ValueError(f"prompt: one prompt per request is supported, got a batch of {len(p)}")
        if isinstance(p, list) and not p:
            raise ValueError("prompt: must not be empty")
        if self.echo:
            raise ValueError("echo: not supported by this engine")
        if self.best_of not in (None, 1):
            raise ValueError(f"best_of: only 1 is supported, got {self.best_of}")
        if self.suffix:
            raise ValueError("suffix: not supported by this engine")
        return self

    def single_prompt(self) -> str | list[int]:
        """The one prompt, as text or as token ids."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("must be at least 1")
        return v

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages: must contain at least one message")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- responses ---------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


FinishReason = Literal["stop", "length", "abort"] | None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: FinishReason = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): the ids a completion of ``prompt`` would be given."""

    model_config = ConfigDict(extra="forbid", strict=True)  # e.g. add_special_tokens: not silently ignored

    model: str | None = None
    prompt: str


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "specplan"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
