"""Step-level timing for the profiler: whole ``LLMEngine.step()`` calls, the code that serves requests,
for every method (none, ngram, draft, medusa) at ``c`` sequences of context ``L``.

Setup skips the prefill: each sequence enters the engine as a running request whose KV is already
there (``LLMEngine.add_running_decode``; the cache is filled with random values once, since timing
depends on shapes, not values). Then the engine steps as it would serving: propose, schedule, prepare,
forward, sample or verify, kvbm commit, proposer update, output; a ``PhaseClock`` records each phase.

Speculative points are measured at a given draft coverage: ``round(coverage * c)`` sequences carry a
draft of exactly ``k`` tokens (the proposer's own drafts; prompt lookup's are padded with their last
token where it finds nothing on random tokens: acceptance from such a run means nothing, timing does), the
others speculate=False and carry no draft, as a sequence without a draft does in serving: where a verify
CUDA graph exists the engine pads them to ``k`` (``LLMEngine._pad_drafts``) so the step replays it.

Every step appends at least one token, so contexts start half the planned number of steps below ``L``
and the timed steps straddle it. Timed steps come in repeats of ``steps``; repeats continue until the
running median of the repeat medians moves by less than ``rel_tol`` (at least ``min_repeats``, at most
``max_repeats``), and the result says whether it settled.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from common.metadata import cpu_description
from common.metrics import MAX_TIMING_SPREAD, timing_spread
from engine.engine_config import EngineConfig
from engine.errors import CapacityError, ConfigError
from engine.llm_engine import LLMEngine
from engine.phases import PhaseClock
from engine.sampling import SamplingParams
from engine.synthetic import add_random_running, random_token_proposer


@dataclass
class StepTiming:
    step_ms: list[float]  # every timed step, whole step
    phases_ms: dict[str, float]  # median milliseconds per phase over the timed steps
    repeat_medians: list[float]  # median step time of each repeat
    settled: bool  # the running median converged before the repeat cap
    kv_usage: float
    draft_coverage: float | None  # share of sequences that verified k drafts; None without speculation
    draft_ms: list[float] = field(default_factory=list)  # propose phase per timed step
    verify_ms: list[float] = field(default_factory=list)  # the rest of each timed step

    @property
    def median_ms(self) -> float:
        return statistics.median(self.repeat_medians)

    @property
    def spread(self) -> float:
        """``timing_spread`` of the repeat medians (0 with one repeat)."""
        return timing_spread(self.repeat_medians)

    @property
    def stable(self) -> bool:
        return self.settled and self.spread <= MAX_TIMING_SPREAD


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU and its threads: where a measurement ran, as its profile records it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_description(torch.get_num_threads())


class StepProfiler:
    def __init__(self, config: EngineConfig) -> None:
        """Times the engine ``config`` describes; its ``spec`` gives every point's method and k (None:
        method none). The profiler sets the step's token budget and turns prefix caching off."""
        spec = config.spec
        self.method, self.k = (spec.method, spec.k) if spec is not None else ("none", 0)
        self.tp, self.seed = config.tp, config.seed
        self.lookahead = spec.num_lookahead_tokens if spec is not None else 0
        self.engine = LLMEngine(
            dataclasses.replace(
                config,
                # a whole verify batch in one step, as many tokens as the largest point can ask for
                max_num_batched_tokens=max(2048, config.max_num_seqs * (1 + self.lookahead)),
                enable_prefix_caching=False,  # random contexts share nothing; no hashing cost either
            )
        )
        self.engine.proposer = random_token_proposer(self.engine.proposer, spec)
        self.source = self.engine.source
        self.runner = self.engine.runner
        self.config = self.runner.config
        self.runner.fill_kv_random(config.seed)
        self._num_points = 0

    # -- descriptions ------------------------------------------------------------------------------
    @property
    def model_info(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "hf_id": self.config.hf_id,
            "shape": self.config.shape_dict(),
            "weights": self.source.weights_label,
            "dtype": self.dtype,
            "tp": self.tp,
        }

    @property
    def kv_capacity_blocks(self) -> int:
        return int(self.runner.num_blocks)

    @property
    def block_size(self) -> int:
        return int(self.runner.block_size)

    @property
    def dtype(self) -> str:
        return str(self.runner.dtype).removeprefix("torch.")

    @property
    def device_name(self) -> str:
        return describe_device(self.runner.device)

    # -- setup -------------------------------------------------------------------------------------
    def _check_point(self, c: int, length: int, growth: int) -> int:
        """The context to start at so the timed steps straddle ``length``; raises when it cannot fit."""
        if not isinstance(c, int) or c < 1:
            raise ConfigError(f"concurrency must be an int >= 1, got {c!r}")
        if not isinstance(length, int) or length < 2:
            raise ConfigError(f"context_len must be an int >= 2, got {length!r}")
        if c > self.engine.scheduler.max_num_seqs:
            raise CapacityError(f"concurrency {c} exceeds max_num_seqs {self.engine.scheduler.max_num_seqs}")
        limit = self.engine.max_model_len
        if length > limit:
            raise CapacityError(f"context_len {length} exceeds max_context {limit}")
        # start half the growth below L, and early enough that the last step (its verify tokens
        # included) still fits: a point at L = max_context is timed on the steps just below it
        latest = limit - growth - self.lookahead - 1
        if latest < 2:
            raise CapacityError(
                f"context_len {length}: {growth} steps of 1 + {self.lookahead} lookahead tokens do not fit "
                f"within max_context {limit}"
            )
        start = max(2, min(length - growth // 2, latest))
        import kvbm

        need = kvbm.capacity.blocks_needed(c, start + growth, self.lookahead, self.block_size)
        if need > self.kv_capacity_blocks:
            raise CapacityError(
                f"concurrency {c} at context {length} (+{self.lookahead} lookahead) needs {need} KV blocks; "
                f"the pool holds {self.kv_capacity_blocks}"
            )
        return start

    def _add_sequences(self, c: int, length: int, num_drafting: int) -> list[str]:
        self._num_points += 1
        ids = [f"p{self._num_points}-{i}" for i in range(c)]
        add_random_running(
            self.engine, ids, length, torch.Generator().manual_seed(self.seed), num_drafting=num_drafting
        )
        return ids

    # -- measurements ------------------------------------------------------------------------------
    @torch.inference_mode()
    def measure_decode(
        self,
        concurrency: int,
        context_len: int,
        *,
        steps: int = 20,
        warmup: int = 3,
        coverage: float | None = None,
        min_repeats: int = 1,
        max_repeats: int = 1,
        rel_tol: float = 0.02,
    ) -> StepTiming:
        """Whole engine steps at (concurrency, context_len[, coverage]); raises CapacityError when the
        pool is too small. ``steps`` timed steps per repeat (see the module docstring)."""
        if not isinstance(steps, int) or steps < 1 or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(f"steps must be >= 1 and warmup >= 0, got steps={steps!r} warmup={warmup!r}")
        if not isinstance(min_repeats, int) or not 1 <= min_repeats <= max_repeats:
            raise ConfigError(f"need 1 <= min_repeats <= max_repeats, got {min_repeats!r}, {max_repeats!r}")
        if coverage is not None and not 0.0 <= coverage <= 1.0:
            raise ConfigError(f"coverage must be within [0, 1], got {coverage!r}")
        if self.k == 0:
            coverage = None
        elif coverage is None:
            coverage = 1.0
        num_drafting = 0 if coverage is None else round(coverage * concurrency)
        start = self._check_point(concurrency, context_len, warmup + steps * max_repeats)
        engine = self.engine
        ids = self._add_sequences(concurrency, start, num_drafting)
        clock = PhaseClock(self.runner.device)
        engine.clock = clock
        step_ms: list[float] = []
        phases: list[dict[str, float]] = []
        medians: list[float] = []
        settled = False
        try:
            for _ in range(warmup):
                engine.step()
            while len(medians) < max_repeats:
                block = []
                for _ in range(steps):
                    engine.step()
                    ph = clock.stop()
                    phases.append(ph)
                    block.append(sum(ph.values()))
                step_ms += block
                previous = statistics.median(medians) if medians else None
                medians.append(statistics.median(block))
                moved = None if previous is None else abs(statistics.median(medians) - previous)
                if moved is not None and len(medians) >= min_repeats and moved <= rel_tol * previous:
                    settled = True
                    break
            settled = settled or max_repeats == 1
            usage = engine.kv_usage
            running = {r.request_id for r in engine.scheduler.running}
            if lost := [rid for rid in ids if rid not in running]:
                raise CapacityError(
                    f"concurrency {concurrency} at context {context_len}: {len(lost)} sequences stopped "
                    f"running during the timed steps (reached max_context {engine.max_model_len} or were "
                    "preempted), so the steps did not run the point"
                )
        finally:
            engine.clock = None
            for rid in ids:
                engine.abort(rid)
        names = list(dict.fromkeys(n for ph in phases for n in ph))
        phase_ms = {n: statistics.median(ph.get(n, 0.0) for ph in phases) for n in names}
        draft = [ph.get("propose", 0.0) for ph in phases]
        return StepTiming(
            step_ms=step_ms,
            phases_ms=phase_ms,
            repeat_medians=medians,
            settled=settled,
            kv_usage=usage,
            draft_coverage=None if coverage is None else num_drafting / concurrency,
            draft_ms=draft,
            verify_ms=[s - d for s, d in zip(step_ms, draft, strict=True)],
        )

    @torch.inference_mode()
    def measure_prefill(self, input_len: int, *, repeats: int = 3) -> list[float]:
        """Milliseconds from adding one ``input_len``-token request to its first token, through the
        engine's steps (chunked when longer than the step budget), after one warm-up.

        ``input_len == max_context`` times a prompt of ``max_context - 1`` tokens: a served prompt
        must leave room for the token it generates (``LLMEngine`` refuses a longer one), so that is
        the longest prefill serving runs; one token less moves the time by about ``1 / input_len``."""
        if not isinstance(repeats, int) or repeats < 1:
            raise ConfigError(f"repeats must be an int >= 1, got {repeats!r}")
        if not isinstance(input_len, int) or input_len < 1:
            raise ConfigError(f"input_len must be an int >= 1, got {input_len!r}")
        limit = self.engine.max_model_len
        if input_len > limit:
            raise CapacityError(f"input_len {input_len} exceeds max_context {limit}")
        input_len = min(input_len, limit - 1)
        self._check_point(1, input_len + 1, 0)
        gen = torch.Generator().manual_seed(self.seed)
        toks = torch.randint(0, self.config.vocab_size, (input_len,), generator=gen).tolist()
        params = SamplingParams(max_tokens=1, ignore_eos=True)
        clock = PhaseClock(self.runner.device)
        out = []
        for i in range(repeats + 1):
            self._num_points += 1
            self.engine.add_request(f"prefill{self._num_points}", toks, params)
            self.engine.clock = clock
            ms = 0.0
            try:
                while self.engine.has_unfinished():
                    self.engine.step()
                    ms += sum(clock.stop().values())
            finally:
                self.engine.clock = None
            if i:
                out.append(ms)
        return out

    def close(self) -> None:
        self.engine.close()
