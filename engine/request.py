"""A request's life in the engine (prompt, outputs, timestamps, finish) and what ``step`` reports."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """One request's progress after a step. ``token_ids`` are all output tokens so far;
    ``token_times`` their arrival times (``time.monotonic()``, one per token; tokens accepted
    together in one speculative step share a time)."""

    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    num_prompt_tokens: int
    first_token_time: float | None
    token_times: list[float]
    stop_reason: str | int | None = None  # the stop string or stop token that ended it


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    # tokens whose KV is in the cache (mirrors kvbm's num_computed_tokens while running)
    num_computed: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list (decode hot path)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def first_token_time(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def output(self, new_token_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=new_token_ids,
            token_ids=list(self.output_token_ids),
            finished=self.is_finished,
            finish_reason=self.finish_reason,
            num_prompt_tokens=self.num_prompt_tokens,
            first_token_time=self.first_token_time,
            token_times=list(self.token_times),
            stop_reason=self.stop_reason,
        )
