"""Start-up warm-up: run every step shape a server will replay before the first request arrives.

The runner captures a CUDA graph on the first step of each (batch bucket, verify width), and Triton
compiles a kernel on the first use of each specialisation. Either one inside a served request costs that
request 0.1-1 s: on a fresh H200, the first drafting pass of ``profiler validate`` (draft k=4, c=2) measured
13.7 ms ITL where later passes measured 5.1 ms. vLLM captures its graphs at start-up for the same reason.

``warm_up`` runs the engine's own ``step()`` (so the target, the drafter and tensor-parallel ranks all see
the shapes serving will give them): two prefills, one of them next to a decoding sequence, then for every
graph batch size from ``max_num_seqs`` down, that many running sequences stepping twice with full drafts
(the first step of a draft model is its catch-up) and, with speculation, twice without any draft (the plain
decode graph of a step where nobody drafts). It leaves the engine as it found it: no request, every
KV block free, an empty prefix cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

import kvbm
from engine.cuda_graphs import GraphCounters, bucket_sizes
from engine.sampling import SamplingParams
from engine.spec.draft import DraftModelProposer
from engine.synthetic import add_random_running, random_token_proposer

if TYPE_CHECKING:
    from engine.engine_config import EngineConfig
    from engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)


STEPS_PER_SIZE = 2  # a draft model's first step catches the drafter up; the second is a steady step


@dataclass(frozen=True)
class WarmUpReport:
    batch_sizes: list[int]  # decode batch sizes stepped, largest first
    skipped: list[int]  # batch sizes whose sequences the KV pool could not hold
    captures: int  # CUDA graphs captured (target and drafter)
    seconds: float

    def describe(self) -> str:
        sizes = ", ".join(map(str, self.batch_sizes)) or "none"
        text = f"warm-up: batch sizes {sizes}; {self.captures} CUDA graphs captured; {self.seconds:.1f} s"
        if self.skipped:
            text += f" (batch sizes {self.skipped} skipped: the KV pool cannot hold them)"
        return text


def model_runners(engine: LLMEngine) -> dict[str, Any]:
    """The target's runner and, for a draft-model proposer (wrapped or not), the drafter's."""
    runners: dict[str, Any] = {"target": engine.runner}
    proposer = engine.proposer
    while proposer is not None and not isinstance(proposer, DraftModelProposer):
        proposer = getattr(proposer, "inner", None)
    if proposer is not None:
        runners["drafter"] = proposer.runner
    return runners


def graph_counters(engine: LLMEngine) -> dict[str, GraphCounters]:
    return {name: r.graph_counters for name, r in model_runners(engine).items()}


def wants_warm_up(flag: bool | None, engine: LLMEngine) -> bool:
    """``--[no-]warm-up`` as given; not given: on a GPU, where graphs and Triton kernels exist."""
    return flag if flag is not None else engine.runner.device.type == "cuda"


def serving_engine(config: EngineConfig, flag: bool | None) -> tuple[LLMEngine, WarmUpReport | None]:
    """The engine ``engine serve`` runs (on its thread or in its core process): built from ``config``,
    then warmed up where ``wants_warm_up(flag, ...)`` says so; the report is None when it was not."""
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(config)
    if not wants_warm_up(flag, engine):
        return engine, None
    log.info("warming up: every CUDA-graph batch size up to max_num_seqs %d ...", config.max_num_seqs)
    return engine, warm_up(engine)


def warm_up(engine: LLMEngine, *, context: int = 64, seed: int = 0) -> WarmUpReport:
    """Step every shape serving will replay (see the module docstring); the engine must be idle."""
    if engine.has_unfinished():
        raise RuntimeError("warm_up needs an idle engine: requests are queued or running")
    t0 = time.perf_counter()
    before = sum(c.captures for c in graph_counters(engine).values())
    context = max(2, min(context, engine.max_model_len // 2))
    gen = torch.Generator().manual_seed(seed)
    _prefills(engine, context, gen)
    stepped, skipped = _decode_sizes(engine, context, gen)
    if engine.kv_manager.enable_prefix_caching:
        engine.kv_manager.reset_prefix_cache()
    captures = sum(c.captures for c in graph_counters(engine).values()) - before
    return WarmUpReport(stepped, skipped, captures, time.perf_counter() - t0)


def _prefills(engine: LLMEngine, context: int, gen: torch.Generator) -> None:
    """A prefill alone, then one next to a decoding sequence (the mixed step of arriving traffic)."""
    vocab = engine.config.vocab_size
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for i, length in enumerate((context, context // 2 + 1)):
        prompt = torch.randint(0, vocab, (length,), generator=gen).tolist()
        engine.add_request(f"warmup-prefill-{i}", prompt, params)
        engine.step()  # the second prefill runs next to the first request's decode
    while engine.has_unfinished():
        engine.step()


def _decode_sizes(engine: LLMEngine, context: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Every graph batch size from the largest down: that many sequences step ``STEPS_PER_SIZE`` times."""
    spec = engine.spec
    lookahead = spec.num_lookahead_tokens if spec is not None else 0
    saved = engine.proposer
    engine.proposer = random_token_proposer(saved, spec)
    stepped: list[int] = []
    skipped: list[int] = []
    bs = engine.runner.block_size
    peak = context + STEPS_PER_SIZE * (1 + lookahead)
    try:
        for size in sorted(bucket_sizes(engine.scheduler.max_num_seqs), reverse=True):
            if kvbm.capacity.blocks_needed(size, peak, lookahead, bs) > engine.kv_manager.num_free_blocks:
                skipped.append(size)
                continue
            # with speculation, a step where no sequence drafts runs the plain decode graph: both
            for drafting in (size, 0) if spec is not None else (0,):
                ids = [f"warmup-{size}-{drafting}-{i}" for i in range(size)]
                add_random_running(engine, ids, context, gen, num_drafting=drafting)
                try:
                    for _ in range(STEPS_PER_SIZE):
                        engine.step()
                finally:
                    for rid in ids:
                        engine.abort(rid)
            stepped.append(size)
    finally:
        engine.proposer = saved
    return stepped, skipped
