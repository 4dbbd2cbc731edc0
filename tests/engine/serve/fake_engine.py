"""A deterministic stand-in for ``LLMEngine`` that follows the engine contract, for front-end tests.

It lets the HTTP layer be tested for what is its own job (SSE framing, aborts, stop strings, waiting
requests, metric bookkeeping) without model compute; the real-engine tests sit beside it. Output
token i of a request is byte ``TEXT[(seed + i) % len(TEXT)]`` so expected text is known exactly.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from engine.errors import RequestError

TEXT = b"hello world, this is a fake engine. "
EOS = 257


class ByteTokenizer:
    eos_token_ids = (EOS,)
    vocab_size = 320

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


@dataclass
class FakeParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class FakeOutput:
    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int


@dataclass
class _Req:
    prompt: list[int]
    params: FakeParams
    out: list[int] = field(default_factory=list)


class FakeEngine:
    """FIFO admission up to ``max_num_seqs``; one token per running request per step."""

    def __init__(
        self,
        max_num_seqs: int = 4,
        eos_after: int | None = None,
        step_delay: float = 0.0,
        fail_at_step: int = 0,
    ) -> None:
        self.fail_at_step = fail_at_step  # raise inside this step (1-based), once
        self.step_delay = step_delay  # seconds per step, so a test can act while requests are in flight
        self.tokenizer = ByteTokenizer()
        self.max_num_seqs = max_num_seqs
        self.max_model_len = 256
        self.eos_after = eos_after
        self.waiting: OrderedDict[str, _Req] = OrderedDict()
        self.running: OrderedDict[str, _Req] = OrderedDict()
        self.aborted: list[str] = []
        self.steps = 0

    def add_request(self, request_id, prompt_token_ids, params, arrival_time=None) -> None:
        if request_id in self.waiting or request_id in self.running:
            raise RequestError(f"request_id {request_id!r} exists")
        if 300 in prompt_token_ids:  # a hook for the "engine rejects" path
            raise RequestError("prompt_token_ids: token 300 is rejected by the fake engine")
        self.waiting[request_id] = _Req(list(prompt_token_ids), params)

    def abort(self, request_id) -> None:
        if self.waiting.pop(request_id, None) or self.running.pop(request_id, None):
            self.aborted.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        return len(self.running) / self.max_num_seqs

    spec_stats = None

    def step(self) -> list[FakeOutput]:
        self.steps += 1
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.steps == self.fail_at_step:
            raise RuntimeError("simulated device failure")
        while self.waiting and len(self.running) < self.max_num_seqs:
            rid, req = self.waiting.popitem(last=False)
            self.running[rid] = req
        outs = []
        for rid, req in list(self.running.items()):
            seed = req.params.seed or 0
            i = len(req.out)
            tok = EOS if self.eos_after is not None and i == self.eos_after else TEXT[(seed + i) % len(TEXT)]
            req.out.append(tok)
            reason = None
            if tok == EOS and not req.params.ignore_eos:
                reason = "stop"
            elif len(req.out) >= req.params.max_tokens:
                reason = "length"
            if reason:
                del self.running[rid]
            outs.append(FakeOutput(rid, [tok], list(req.out), reason is not None, reason, len(req.prompt)))
        return outs


def expected_text(n: int, seed: int = 0) -> str:
    return bytes(TEXT[(seed + i) % len(TEXT)] for i in range(n)).decode()
