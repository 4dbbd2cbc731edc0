"""Continuous batching over kvbm: which requests run this step, with how many tokens.

Policy (FCFS, one flattened batch per step):
1. Running requests, oldest first: each gets its remaining tokens (1 for decode, the rest of a
   chunked prefill) plus its speculative lookahead, within the step's token budget. When kvbm cannot
   grant the blocks, the newest running request is preempted (its blocks freed, its progress
   dropped, recomputed later from prompt + outputs) until the allocation fits.
2. If nothing was preempted, waiting requests are admitted while a slot, the token budget and the
   KV pool allow: kvbm registers the prompt (reusing a cached prefix) and grants blocks for all of
   it at once, so an admitted request never stalls mid-prefill for lack of blocks.

KV rule (kvbm.capacity, model "engine"): every block of the pool is usable; a step needs
``num_tokens + len(draft)`` slots per sequence, and a request of ``isl`` prompt and ``osl`` output
tokens needs ``isl + osl - 1`` at its last step (drafts are cut to the room before max_tokens). The
engine refuses at admission a request the whole pool could never hold. Should one still fail to
allocate while it runs alone, it would preempt itself forever and hold the head of the queue: it is
finished instead (``finish_reason="length"``) and handed back through ``take_dropped``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import kvbm
from engine.request import Request, Status


@dataclass
class ScheduledSeq:
    request: Request
    num_new_tokens: int  # real tokens to compute (excludes draft tokens)
    draft: list[int] = field(default_factory=list)

    @property
    def completes(self) -> bool:
        """The chunk reaches the request's last known token, so its logits yield new tokens."""
        return self.request.num_computed + self.num_new_tokens == self.request.num_tokens


class Scheduler:
    def __init__(
        self,
        kv: kvbm.KVCacheManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._dropped: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def decode_candidates(self) -> list[Request]:
        """Running requests whose next step is a single decode token (the ones a drafter serves)."""
        return [r for r in self.running if r.output_token_ids and r.num_tokens - r.num_computed == 1]

    def schedule(
        self, drafts: Mapping[str, list[int]] | None = None
    ) -> tuple[list[ScheduledSeq], list[Request]]:
        """This step's sequences and the requests preempted to make room."""
        drafts = drafts or {}
        kv = self.kv
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Request] = []
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            draft = drafts.get(req.request_id, [])
            if len(draft) >= budget:
                draft = draft[: budget - 1]
            n = min(req.num_tokens - req.num_computed, budget - len(draft))
            while kv.allocate(req.request_id, n, len(draft)) is None:
                victim = running.pop()
                if victim is req and not running:  # alone and still too big: it can never fit
                    self._drop(req)
                    break
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break
            scheduled.append(ScheduledSeq(req, n, list(draft)))
            budget -= n + len(draft)
            i += 1
        if preempted:
            return scheduled, preempted
        while self.waiting and len(running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            tokens = req.all_token_ids
            if kv.allocate(req.request_id, len(tokens), token_ids=tokens) is None:
                break
            self.waiting.popleft()
            req.num_computed = kv.num_computed_tokens(req.request_id)
            req.status = Status.RUNNING
            running.append(req)
            n = min(len(tokens) - req.num_computed, budget)
            scheduled.append(ScheduledSeq(req, n))
            budget -= n
        return scheduled, preempted

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _drop(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.status = Status.FINISHED
        req.finish_reason = "length"
        self._dropped.append(req)

    def take_dropped(self) -> list[Request]:
        """Requests finished because the pool cannot hold them even alone (since the last call)."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def finish(self, req: Request, reason: str) -> None:
        """Mark finished and release its blocks (running or waiting)."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self.kv.free(req.request_id)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
