"""Step-level timing for the profiler: decode (k = 0) or draft + verify (k > 0) steps of ``c``
sequences at context ``L``, with the KV cache filled directly (random values; timing depends on
shapes, not values), so no point pays for a prefill.

Decode points keep the context constant: each sequence holds ``L - 1`` cached tokens and every timed
step queries position ``L - 1`` (rewriting that slot), so a step attends over exactly ``L`` tokens.
Speculative points run the spec helper's ``SpecStepRunner`` with drafts padded to ``k`` tokens, so
every step verifies ``1 + k`` tokens per sequence whatever the drafter found (acceptance from such a
run means nothing; it is measured separately on real prompts). On CUDA each phase is timed with
device events; on CPU with ``perf_counter`` (CPU ops are synchronous).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import kvbm
from engine.errors import CapacityError, ConfigError
from engine.presets import resolve_model
from engine.runner import ModelRunner, SeqBatchEntry

METHODS = ("none", "ngram", "draft", "medusa")


@dataclass
class StepTiming:
    draft_ms: list[float]
    verify_ms: list[float]  # the target forward (+ verification); the whole step when k = 0
    step_ms: list[float]
    kv_usage: float


class _Timer:
    """Elapsed milliseconds of a callable: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def run(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end)
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1e3


class StepProfiler:
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
        if not isinstance(k, int) or k < 0 or (method == "none") != (k == 0):
            raise ConfigError(
                f"k must be 0 with method 'none' and >= 1 otherwise, got method={method!r} k={k!r}"
            )
        if not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"tp must be an int >= 1, got {tp!r}")
        self.source = resolve_model(model, weights=weights)
        self.method, self.k, self.tp, self.seed = method, k, tp, seed
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
        self.config = self.runner.config
        self._timer = _Timer(self.runner.device)
        self._filled = False
        self._spec_config = None
        if method != "none":
            from engine.spec import SpecConfig

            self._spec_config = SpecConfig(method=method, k=k, seed=seed, **(spec_options or {}))

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
        dev = self.runner.device
        if dev.type == "cuda":
            return torch.cuda.get_device_name(dev)
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    # -- setup -------------------------------------------------------------------------------------
    def _fill_kv(self) -> None:
        """Random K/V everywhere once (what attention reads then looks like real data)."""
        if self._filled:
            return
        fill = getattr(self.runner, "fill_kv_random", None)
        if fill is not None:  # a TP executor fills every rank's shard
            fill(self.seed)
        else:
            # a runner without local caches (TP executor without a fill hook) keeps zeros: the
            # kernels read the same bytes either way
            gen = torch.Generator(device=self.runner.device).manual_seed(self.seed)
            for k_cache, v_cache in getattr(self.runner, "kv_caches", []):
                k_cache.normal_(0.0, 1.0, generator=gen)
                v_cache.normal_(0.0, 1.0, generator=gen)
        self._filled = True

    def _contexts(self, concurrency: int, context_len: int) -> dict[str, list[int]]:
        gen = torch.Generator().manual_seed(self.seed)
        vocab = self.config.vocab_size
        return {
            f"p{i}": torch.randint(0, vocab, (context_len,), generator=gen).tolist()
            for i in range(concurrency)
        }

    def _check_point(self, concurrency: int, context_len: int, lookahead: int) -> kvbm.KVCacheManager:
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not isinstance(context_len, int) or context_len < 2:
            raise ConfigError(f"context_len must be an int >= 2, got {context_len!r}")
        if context_len + lookahead > self.runner.max_model_len:
            raise CapacityError(
                f"context_len {context_len} + {lookahead} lookahead tokens exceeds max_context "
                f"{self.runner.max_model_len}"
            )
        need = kvbm.capacity.blocks_needed(concurrency, context_len, lookahead, self.block_size)
        if need > self.kv_capacity_blocks:
            raise CapacityError(
                f"concurrency {concurrency} at context {context_len} (+{lookahead} lookahead) needs "
                f"{need} KV "
                f"blocks; the pool holds {self.kv_capacity_blocks}"
            )
        return kvbm.KVCacheManager(self.kv_capacity_blocks, self.block_size, enable_prefix_caching=False)

    # -- measurements ------------------------------------------------------------------------------
    @torch.inference_mode()
    def measure_decode(
        self, concurrency: int, context_len: int, *, steps: int = 20, warmup: int = 3
    ) -> StepTiming:
        """Timed steps at (concurrency, context_len); raises CapacityError when the pool is too small."""
        if not isinstance(steps, int) or steps < 1 or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(f"steps must be >= 1 and warmup >= 0, got steps={steps!r} warmup={warmup!r}")
        if self.k == 0:
            return self._measure_plain(concurrency, context_len, steps, warmup)
        return self._measure_spec(concurrency, context_len, steps, warmup)

    def _measure_plain(self, c: int, length: int, steps: int, warmup: int) -> StepTiming:
        kv = self._check_point(c, length, 0)
        self._fill_kv()
        contexts = self._contexts(c, length)
        for sid, toks in contexts.items():
            kv.allocate(sid, length, token_ids=toks)
            kv.commit(sid, length - 1)
        entries = [
            SeqBatchEntry([toks[-1]], kv.block_table(sid), length - 1) for sid, toks in contexts.items()
        ]
        input_ids, positions, meta = self.runner.prepare(entries)
        rows = self.runner.logits_indices(meta)

        def step() -> None:
            _, logits = self.runner.execute(input_ids, positions, meta, rows)
            logits.argmax(dim=-1)

        times = []
        for i in range(warmup + steps):
            _, ms = self._timer.run(step)
            if i >= warmup:
                times.append(ms)
        usage = kv.usage
        return StepTiming([0.0] * steps, times, list(times), usage)

    def _measure_spec(self, c: int, length: int, steps: int, warmup: int) -> StepTiming:
        from engine.spec.step import SpecStepRunner

        assert self._spec_config is not None
        width = self._spec_config.num_lookahead_tokens
        growth = (warmup + steps) * (width + 1)
        kv = self._check_point(c, length, growth + width)
        self._fill_kv()
        spec = SpecStepRunner(self._spec_config, self.runner, kv, pad_drafts=True)
        seqs = spec.fill_context(self._contexts(c, length), seed=self.seed)
        draft_ms, verify_ms = [], []
        try:
            for i in range(warmup + steps):
                drafts, d_ms = self._timer.run(lambda: spec.draft(seqs))
                outs, v_ms = self._timer.run(lambda drafts=drafts: spec.verify(seqs, drafts))
                for s, o in zip(seqs, outs, strict=True):
                    s.token_ids = [*s.token_ids, *o.tokens]
                if i >= warmup:
                    draft_ms.append(d_ms)
                    verify_ms.append(v_ms)
            usage = kv.usage
        finally:
            for s in seqs:
                spec.free(s.seq_id)
        return StepTiming(
            draft_ms, verify_ms, [d + v for d, v in zip(draft_ms, verify_ms, strict=True)], usage
        )

    @torch.inference_mode()
    def measure_prefill(self, input_len: int, *, repeats: int = 3) -> list[float]:
        """Milliseconds per prefill of one ``input_len``-token sequence (after one warm-up)."""
        if not isinstance(repeats, int) or repeats < 1:
            raise ConfigError(f"repeats must be an int >= 1, got {repeats!r}")
        kv = self._check_point(1, input_len, 0)
        toks = self._contexts(1, input_len)["p0"]
        kv.allocate("p0", input_len, token_ids=toks)
        input_ids, positions, meta = self.runner.prepare([SeqBatchEntry(toks, kv.block_table("p0"), 0)])
        rows = self.runner.logits_indices(meta)
        out = []
        for i in range(repeats + 1):
            _, ms = self._timer.run(lambda: self.runner.execute(input_ids, positions, meta, rows))
            if i:
                out.append(ms)
        kv.free("p0")
        return out

    def close(self) -> None:
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()
