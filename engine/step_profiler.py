"""Step-level timing for the profiler: ``c`` sequences at context ``L``, timed decode steps.

Why not run the serving loop: a sweep visits hundreds of (method, k, c, L) points, and prefilling
``c x L`` tokens for each would dominate. Step time depends on shapes, not on the values in the
cache, so the sequences are registered in kvbm with all but their last token marked computed and
the paged cache keeps whatever it holds; then warm-up and timed steps run exactly the kernels a
serving decode step runs (CUDA graphs included for plain decode on GPU).

Speculative points time the two phases separately through ``engine.spec.SpecStepRunner`` with
``pad_drafts=True``: every sequence verifies exactly ``k`` draft tokens, so the verify cost at ``k`` is
measured even where prompt lookup finds no match in random token ids. Acceptance from such a run
means nothing (the profiler takes acceptance from ``profiler acceptance`` or live counters).

Timing is wall clock around each phase with a device synchronize before and after, so it includes
the engine's own Python and launch overhead -- the cost a served token really pays.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import kvbm
from engine.errors import CapacityError, ConfigError
from engine.presets import resolve_model
from engine.runner import ModelRunner, SeqBatchEntry

METHODS = ("none", "ngram", "draft", "medusa")


@dataclass
class StepTiming:
    """Per-step times in milliseconds (one entry per timed step). ``draft_ms`` is all zeros without
    speculation; ``step_ms = draft_ms + verify_ms``."""

    draft_ms: list[float] = field(default_factory=list)
    verify_ms: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    kv_usage: float = 0.0
    tokens_per_step: float = 1.0  # what the timed steps produced; meaningless with random weights


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepProfiler:
    """One model (and, with speculation, one drafter) loaded once; many points measured on it."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str | None = None,
        tp: int = 1,
        method: str = "none",
        k: int = 0,
        seed: int = 0,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_context: int | None = None,
        cuda_graphs: bool = True,
        weights: str = "auto",
        max_num_seqs: int = 256,
        spec_options: dict[str, Any] | None = None,
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
        if not isinstance(k, int) or k < 0:
            raise ConfigError(f"k must be an int >= 0, got {k!r}")
        if (method == "none") != (k == 0):
            raise ConfigError(f"method={method!r} with k={k}: k is 0 exactly when method is 'none'")
        if not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"tp must be a positive int, got {tp!r}")
        self.method, self.k, self.tp, self.seed = method, k, tp, seed
        self.source = resolve_model(model, weights=weights)
        kwargs: dict[str, Any] = dict(
            dtype=dtype,
            device=device,
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_model_len=max_context,
            cuda_graphs=cuda_graphs,
            seed=seed,
        )
        if tp == 1:
            self.runner: Any = ModelRunner(self.source, **kwargs)
        else:
            from engine.tp import build_tp_runner

            self.runner = build_tp_runner(self.source, tp=tp, **kwargs)
        self.kv = kvbm.KVCacheManager(self.runner.num_blocks, block_size, enable_prefix_caching=False)
        self.spec: Any = None
        if method != "none":
            from engine.spec import SpecConfig
            from engine.spec.step import SpecStepRunner

            options = dict(spec_options or {})
            if method == "draft" and not options.get("draft_model") and not options.get("draft_layers"):
                # a self-speculative drafter: the target's first layers (a quarter, at least one)
                options["draft_layers"] = max(1, self.source.config.num_layers // 4)
            config = SpecConfig(method=method, k=k, **options)
            self.spec = SpecStepRunner(config, self.runner, self.kv, pad_drafts=True)
        self._gen = torch.Generator().manual_seed(seed)

    # -- description --------------------------------------------------------------------------------
    @property
    def model_info(self) -> dict[str, Any]:
        cfg = self.source.config
        return {
            "name": cfg.name,
            "hf_id": cfg.hf_id,
            "shape": cfg.shape_dict(),
            "weights": self.source.weights_label,
        }

    @property
    def kv_capacity_blocks(self) -> int:
        return int(self.runner.num_blocks)

    @property
    def block_size(self) -> int:
        return int(self.runner.block_size)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"

    @property
    def dtype(self) -> str:
        return str(self.runner.dtype).removeprefix("torch.")

    # -- measurements -------------------------------------------------------------------------------
    def _random_tokens(self, n: int) -> list[int]:
        return torch.randint(0, self.source.config.vocab_size, (n,), generator=self._gen).tolist()

    def _check_room(self, concurrency: int, context_len: int, steps: int) -> None:
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be a positive int, got {concurrency!r}")
        if not isinstance(context_len, int) or context_len < 2:
            raise ConfigError(f"context_len must be an int >= 2, got {context_len!r}")
        final = context_len + steps * (1 + self.k)
        if final > self.runner.max_model_len:
            raise CapacityError(
                f"context {context_len} + {steps} steps of up to {1 + self.k} tokens = {final} exceeds "
                f"max_model_len {self.runner.max_model_len}"
            )
        need = kvbm.capacity.blocks_needed(concurrency, final, self.k, self.block_size)
        if need > self.kv.num_free_blocks:
            raise CapacityError(
                f"concurrency {concurrency} at context {context_len} (k={self.k}) needs {need} KV blocks; "
                f"the pool holds {self.kv.num_free_blocks}"
            )

    def measure_decode(
        self, concurrency: int, context_len: int, *, steps: int = 20, warmup: int = 3
    ) -> StepTiming:
        """Time ``steps`` decode (or draft + verify) steps over ``concurrency`` sequences that start at
        ``context_len`` tokens, after ``warmup`` untimed ones. Raises CapacityError when it cannot fit."""
        if steps < 1 or warmup < 0:
            raise ConfigError(f"steps must be >= 1 and warmup >= 0, got steps={steps} warmup={warmup}")
        self._check_room(concurrency, context_len, steps + warmup)
        ids = [f"p{i}" for i in range(concurrency)]
        contexts = {sid: self._random_tokens(context_len) for sid in ids}
        timing = StepTiming()
        produced = 0
        try:
            if self.spec is not None:
                seqs = self.spec.fill_context(contexts, seed=self.seed)
            else:
                seqs = None
                for sid, toks in contexts.items():
                    if self.kv.allocate(sid, len(toks) - 1, token_ids=toks[:-1]) is None:
                        raise CapacityError(f"no KV room for sequence {sid} at context {context_len}")
                    self.kv.commit(sid, len(toks) - 1)
            for i in range(warmup + steps):
                timed = i >= warmup
                if self.spec is not None:
                    draft_ms, verify_ms, n = self._spec_step(seqs)
                else:
                    draft_ms, verify_ms, n = 0.0, self._plain_step(contexts), concurrency
                if timed:
                    timing.draft_ms.append(draft_ms)
                    timing.verify_ms.append(verify_ms)
                    timing.step_ms.append(draft_ms + verify_ms)
                    produced += n
                timing.kv_usage = max(timing.kv_usage, self.kv.usage)
        finally:
            for sid in ids:
                if self.spec is not None:
                    self.spec.free(sid)
                elif self.kv.has_sequence(sid):
                    self.kv.free(sid)
        timing.tokens_per_step = produced / (steps * concurrency)
        return timing

    @torch.inference_mode()
    def _plain_step(self, contexts: dict[str, list[int]]) -> float:
        """One decode step (greedy) for every sequence; returns its wall time in ms."""
        _sync(self.device)
        t0 = time.perf_counter()
        entries = []
        for sid, toks in contexts.items():
            if self.kv.allocate(sid, 1) is None:
                raise CapacityError(f"no KV room to extend sequence {sid}")
            entries.append(SeqBatchEntry([toks[-1]], self.kv.block_table(sid), len(toks) - 1))
        ids, pos, meta = self.runner.prepare(entries)
        _, logits = self.runner.execute(ids, pos, meta, self.runner.logits_indices(meta))
        next_tokens = logits.argmax(dim=-1).tolist()
        for (sid, toks), tok in zip(contexts.items(), next_tokens, strict=True):
            self.kv.commit(sid, 1, token_ids=[toks[-1]])
            toks.append(int(tok))
        _sync(self.device)
        return (time.perf_counter() - t0) * 1e3

    def _spec_step(self, seqs: list[Any]) -> tuple[float, float, int]:
        _sync(self.device)
        t0 = time.perf_counter()
        drafts = self.spec.draft(seqs)
        _sync(self.device)
        t1 = time.perf_counter()
        outs = self.spec.verify(seqs, drafts)
        _sync(self.device)
        t2 = time.perf_counter()
        for s, out in zip(seqs, outs, strict=True):
            s.token_ids.extend(out.tokens)
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, sum(len(o.tokens) for o in outs)

    @torch.inference_mode()
    def measure_prefill(self, input_len: int, *, repeats: int = 3) -> list[float]:
        """Wall time (ms) of one sequence's prefill of ``input_len`` tokens, ``repeats`` times after
        one warm-up; the prefix cache is off, so every repeat computes every token."""
        if not isinstance(input_len, int) or input_len < 1:
            raise ConfigError(f"input_len must be a positive int, got {input_len!r}")
        if input_len > self.runner.max_model_len:
            raise CapacityError(f"input_len {input_len} exceeds max_model_len {self.runner.max_model_len}")
        times = []
        for i in range(repeats + 1):
            toks = self._random_tokens(input_len)
            sid = f"prefill{i}"
            if self.kv.allocate(sid, input_len, token_ids=toks) is None:
                raise CapacityError(f"prefill of {input_len} tokens: the KV pool cannot hold it")
            try:
                _sync(self.device)
                t0 = time.perf_counter()
                ids, pos, meta = self.runner.prepare([SeqBatchEntry(toks, self.kv.block_table(sid), 0)])
                _, logits = self.runner.execute(ids, pos, meta, self.runner.logits_indices(meta))
                logits.argmax(dim=-1).tolist()
                _sync(self.device)
                if i > 0:
                    times.append((time.perf_counter() - t0) * 1e3)
            finally:
                self.kv.free(sid)
        return times

    def close(self) -> None:
        """Release the model and its cache (and tensor-parallel workers)."""
        close = getattr(self.runner, "close", None)
        if callable(close):
            close()
        self.spec = None
        self.runner = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
