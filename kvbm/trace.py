"""A simulated serving trace that drives a KVCacheManager the way a speculative-decoding engine does.

Used by ``python -m kvbm.demo`` and ``benchmarks/kvbm_bench.py``. Model of one scheduler step:

1. every running sequence drafts: with probability ``draft_coverage`` it proposes ``k`` tokens, else
   none (a prompt-lookup drafter finds no match); ``allocate(seq, 1, len(draft))``. When the pool is
   out of blocks the most recently admitted sequence is preempted (freed and re-queued with its
   tokens so far, recomputed later, as vLLM's recompute preemption does);
2. then, as vLLM's scheduler does (running first), waiting requests are admitted FCFS while fewer
   than ``max_running`` run and blocks remain: ``allocate`` the prompt (prefix-cache hits count) and
   ``commit`` the rest of it (the prefill is done within the step);
3. ``block_table`` of every scheduled sequence (what the engine turns into tensors);
4. verification accepts each draft position with probability ``acceptance`` until the first
   rejection; ``commit(seq, 1 + accepted, token_ids)``;
5. finished sequences are freed.

Each phase is timed as a whole (a handful of clock reads per step), so per-operation costs are phase
time over calls, free of per-call timer overhead.

All random decisions of a step are drawn before its timer starts, so step times measure only the
manager plus the loop that calls it. The same seed replays the same trace.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field

from kvbm.manager import KVCacheManager

OPS = (
    "allocate (1 + k lookahead)",
    "admit (allocate prompt + commit prefill)",
    "block_table",
    "commit (1 + accepted)",
    "free (finished)",
)


@dataclass(frozen=True)
class TraceConfig:
    num_requests: int = 1024
    max_running: int = 256
    k: int = 4
    draft_coverage: float = 0.8
    acceptance: float = 0.7
    num_system_prompts: int = 4
    system_prompt_len: int = 256
    user_prompt_len: tuple[int, int] = (16, 256)
    output_len: tuple[int, int] = (32, 384)
    vocab_size: int = 32000
    block_size: int = 16
    num_blocks: int = 40_000
    seed: int = 0


@dataclass
class TraceResult:
    release_lookahead: bool
    steps: int = 0
    finished: int = 0
    preemptions: int = 0
    tokens_generated: int = 0
    held_peak_sum: int = 0  # blocks held after the step's allocations, summed over steps
    held_peak_max: int = 0
    held_after_sum: int = 0  # blocks held after the step's commits and frees, summed over steps
    running_sum: int = 0
    step_ns: list[int] = field(default_factory=list)  # thread CPU time per step
    step_wall_ns: list[int] = field(default_factory=list)
    decode_step_ns: list[int] = field(default_factory=list)  # steps with no admission or departure
    op_ns: dict[str, list[int]] = field(default_factory=dict)  # op -> [calls, total ns of its phase]
    prefix_hit_rate: float = 0.0
    lookahead_blocks_released: int = 0
    usage_trace: list[float] = field(default_factory=list)

    @property
    def mean_held_peak(self) -> float:
        return self.held_peak_sum / max(self.steps, 1)

    @property
    def mean_held_after(self) -> float:
        return self.held_after_sum / max(self.steps, 1)

    @property
    def mean_running(self) -> float:
        return self.running_sum / max(self.steps, 1)


class _Req:
    __slots__ = ("rid", "prompt", "remaining")

    def __init__(self, rid: int, prompt: list[int], remaining: int) -> None:
        self.rid = rid
        self.prompt = prompt
        self.remaining = remaining


def _make_requests(cfg: TraceConfig, rng: random.Random) -> deque[_Req]:
    systems = [
        [rng.randrange(cfg.vocab_size) for _ in range(cfg.system_prompt_len)]
        for _ in range(cfg.num_system_prompts)
    ]
    reqs: deque[_Req] = deque()
    for rid in range(cfg.num_requests):
        user = [rng.randrange(cfg.vocab_size) for _ in range(rng.randint(*cfg.user_prompt_len))]
        reqs.append(_Req(rid, rng.choice(systems) + user, rng.randint(*cfg.output_len)))
    return reqs


def _preempt(
    mgr: KVCacheManager,
    rid: int,
    n_draft: int,
    running: dict[int, _Req],
    waiting: deque[_Req],
    batch: list[int],
) -> int:
    """Free the newest sequences until ``rid`` gets its slots (or is itself preempted); returns count."""
    count = 0
    while True:
        victim = next(reversed(running))
        req = running.pop(victim)
        if victim in batch:
            batch.remove(victim)
        req.prompt = mgr.token_ids(victim)  # recomputed on readmission (its prefix may still hit)
        mgr.free(victim)
        waiting.appendleft(req)
        count += 1
        if victim == rid:
            return count
        if mgr.allocate(rid, 1, n_draft) is not None:
            batch.append(rid)
            return count


def run_trace(
    cfg: TraceConfig, *, release_lookahead: bool = True, max_steps: int | None = None
) -> TraceResult:
    """Replay the trace on a fresh manager and return what it held and how long each phase took."""
    rng = random.Random(cfg.seed)
    waiting = _make_requests(cfg, rng)
    mgr = KVCacheManager(cfg.num_blocks, cfg.block_size, release_lookahead=release_lookahead)
    res = TraceResult(release_lookahead=release_lookahead, op_ns={name: [0, 0] for name in OPS})
    running: dict[int, _Req] = {}  # insertion order = admission order
    while (waiting or running) and (max_steps is None or res.steps < max_steps):
        step = _Step(_draw(cfg, rng, running))
        _run_step(mgr, cfg, step, running, waiting)
        _tally(res, step, held_after=cfg.num_blocks - mgr.num_free_blocks, usage=mgr.usage)
    metrics = mgr.metrics()
    res.prefix_hit_rate = metrics.prefix_hit_rate
    res.lookahead_blocks_released = metrics.lookahead_blocks_released
    return res


@dataclass
class _Step:
    """What one scheduler step did, with its clock readings; the result's counters come from it."""

    plan: dict[int, tuple[int, int, list[int]]]  # rid -> (lookahead, tokens to commit, their ids)
    batch: list[int] = field(default_factory=list)  # running sequences that got their lookahead
    preempted: int = 0
    admitted: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    held_peak: int = 0  # blocks held after the step's allocations
    clock: list[int] = field(default_factory=list)  # thread CPU time at each phase boundary
    wall_ns: int = 0


def _draw(
    cfg: TraceConfig, rng: random.Random, running: dict[int, _Req]
) -> dict[int, tuple[int, int, list[int]]]:
    """Every random decision of a step, drawn before its timer starts: per running sequence, its
    lookahead, the tokens verification accepts plus the bonus token, and their ids."""
    plan: dict[int, tuple[int, int, list[int]]] = {}
    for rid in running:
        n_draft = cfg.k if rng.random() < cfg.draft_coverage else 0
        acc = 0
        while acc < n_draft and rng.random() < cfg.acceptance:
            acc += 1
        plan[rid] = (n_draft, 1 + acc, [rng.randrange(cfg.vocab_size) for _ in range(1 + acc)])
    return plan


def _run_step(
    mgr: KVCacheManager, cfg: TraceConfig, step: _Step, running: dict[int, _Req], waiting: deque[_Req]
) -> None:
    """Phases 1-5 of the module docstring, the clock read at each boundary."""
    ns = time.thread_time_ns
    block_table, commit, free = mgr.block_table, mgr.commit, mgr.free
    plan, clock = step.plan, step.clock
    w0 = time.perf_counter_ns()
    clock.append(ns())
    step.batch, step.preempted = _allocate_lookahead(mgr, plan, running, waiting)
    clock.append(ns())
    step.admitted = _admit(mgr, cfg, running, waiting)
    clock.append(ns())
    for rid in step.batch:
        block_table(rid)
    for rid in step.admitted:
        block_table(rid)
    step.held_peak = cfg.num_blocks - mgr.num_free_blocks
    clock.append(ns())
    for rid in step.batch:
        commit(rid, plan[rid][1], plan[rid][2])
    clock.append(ns())
    step.finished = _departures(step.batch, plan, running)
    clock.append(ns())
    for rid in step.finished:
        free(rid)
    clock.append(ns())
    step.wall_ns = time.perf_counter_ns() - w0


def _allocate_lookahead(
    mgr: KVCacheManager,
    plan: dict[int, tuple[int, int, list[int]]],
    running: dict[int, _Req],
    waiting: deque[_Req],
) -> tuple[list[int], int]:
    """Phase 1: the running sequences' lookahead, preempting the newest on failure; the sequences that
    got theirs and the number preempted."""
    allocate = mgr.allocate
    batch: list[int] = []
    preempted = 0
    for rid, (n_draft, _, _) in plan.items():
        if rid not in running:
            continue  # preempted earlier in this loop
        if allocate(rid, 1, n_draft) is not None:
            batch.append(rid)
        else:
            preempted += _preempt(mgr, rid, n_draft, running, waiting, batch)
    return batch, preempted


def _admit(
    mgr: KVCacheManager, cfg: TraceConfig, running: dict[int, _Req], waiting: deque[_Req]
) -> list[int]:
    """Phase 2: waiting requests, first come first served, while a slot and the blocks for the prompt
    remain; each prefill completes within the step. A prompt that no empty pool can hold is an error
    (the trace would never finish)."""
    allocate, commit = mgr.allocate, mgr.commit
    admitted: list[int] = []
    while waiting and len(running) < cfg.max_running:
        req = waiting[0]
        if allocate(req.rid, len(req.prompt), 0, token_ids=req.prompt) is None:
            if not running:
                raise ValueError(
                    f"run_trace: request {req.rid} ({len(req.prompt)} prompt tokens) does not fit "
                    f"in an empty pool of {cfg.num_blocks} blocks of {cfg.block_size}"
                )
            break
        commit(req.rid, len(req.prompt) - mgr.num_computed_tokens(req.rid))
        waiting.popleft()
        running[req.rid] = req
        admitted.append(req.rid)
    return admitted


def _departures(
    batch: list[int], plan: dict[int, tuple[int, int, list[int]]], running: dict[int, _Req]
) -> list[int]:
    """Phase 5's bookkeeping: count each sequence's committed tokens; those done leave ``running``."""
    finished = []
    for rid in batch:
        req = running[rid]
        req.remaining -= plan[rid][1]
        if req.remaining <= 0:
            finished.append(rid)
            del running[rid]
    return finished


def _tally(res: TraceResult, step: _Step, *, held_after: int, usage: float) -> None:
    """Add one step to the result. Its time leaves out the simulator's own bookkeeping of phase 5;
    a step without admission, departure or preemption also counts as a pure decode step."""
    t0, t1, t2, t3, t4, t5, t6 = step.clock
    batch, admitted, finished = step.batch, step.admitted, step.finished
    res.step_wall_ns.append(step.wall_ns)
    elapsed = (t6 - t0) - (t5 - t4)
    res.step_ns.append(elapsed)
    if not (step.preempted or admitted or finished):
        res.decode_step_ns.append(elapsed)
    calls = (len(batch), len(admitted), len(batch) + len(admitted), len(batch), len(finished))
    phases = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t6 - t5)
    for name, n, ns in zip(OPS, calls, phases, strict=True):
        entry = res.op_ns[name]
        entry[0] += n
        entry[1] += ns
    res.steps += 1
    res.finished += len(finished)
    res.preemptions += step.preempted
    res.tokens_generated += sum(step.plan[rid][1] for rid in batch)
    res.held_peak_sum += step.held_peak
    res.held_peak_max = max(res.held_peak_max, step.held_peak)
    res.held_after_sum += held_after
    res.running_sum += len(batch)
    res.usage_trace.append(usage)
