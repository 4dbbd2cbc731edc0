"""The ``hf`` backend: Hugging Face transformers' own ``generate`` as the baseline.

Most speculative-decoding write-ups report speed-ups over ``model.generate`` (eager PyTorch, no paged KV,
no continuous batching), so a profile measured here sits beside the engine's: HF, the engine without
speculation, and the engine with each method (the system-versus-algorithm decomposition).

Methods: ``none`` = plain greedy ``generate`` at batch ``c``; ``draft`` = assisted generation with a
separate assistant model proposing ``k`` tokens per step (constant schedule); ``ngram`` = transformers'
prompt-lookup decoding with ``k`` candidate tokens. transformers runs assisted generation only at batch
size 1, so a speculative point at ``c > 1`` fails with a clear message (the sweep records it).

Timing: a streamer timestamps every ``put`` (one per decoding step; several tokens per put under
assisted generation). Per sequence, ITL = (last token time - first token time) / (tokens - 1); step time
is the median gap between puts; tokens per step = tokens after the first put / puts after the first.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import metrics as md
from common.metadata import cpu_description
from planner.profile import DecodePoint, PrefillPoint

if TYPE_CHECKING:
    from profiler.grid import PointSpec

METHODS = ("none", "draft", "ngram")


class HFBackendError(ValueError):
    """A point or configuration the transformers baseline cannot run; the message says why."""


class _TimingStreamer:
    """transformers streamer that records (time, tokens per sequence) of every decoding step."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.events: list[tuple[float, int]] = []

    def put(self, value: Any) -> None:
        now = time.perf_counter()
        if not self.prompt_seen:  # the first put is the prompt itself
            self.prompt_seen = True
            return
        n = int(value.shape[-1]) if value.dim() > 1 else 1  # [batch] per plain step; [1, n] when assisted
        self.events.append((now, n))

    def end(self) -> None:
        pass


class HFBackend:
    """One transformers model (and optional assistant) at a time; ``configure`` picks (tp, method, k)."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "float32",
        draft_model: str | None = None,
        device: str | None = None,
        seed: int = 0,
    ) -> None:
        if not (Path(model) / "config.json").is_file():
            raise HFBackendError(
                f"model {model!r}: the hf backend needs a Hugging Face directory with config.json"
            )
        import torch

        self.model_path, self.draft_path, self.seed = model, draft_model, seed
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if dtype not in dtypes:
            raise HFBackendError(f"dtype must be one of auto, {', '.join(dtypes)}; got {dtype!r}")
        self.dtype_name, self.torch_dtype = dtype, dtypes[dtype]
        self.model: Any = None
        self.assistant: Any = None
        self.method, self.k = "none", 0

    def _load(self, path: str) -> Any:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(path, dtype=self.torch_dtype, attn_implementation="eager")
        return m.to(self.device).eval()

    def configure(self, tp: int, method: str, k: int) -> None:
        if tp != 1:
            raise HFBackendError(f"tp must be 1 for the hf backend (transformers generate), got {tp}")
        if method not in METHODS:
            raise HFBackendError(
                f"method must be one of {', '.join(METHODS)} for the hf backend, got {method!r}"
            )
        if (method == "none") != (k == 0):
            raise HFBackendError(f"method {method!r} with k={k}: k is 0 exactly when method is 'none'")
        if method == "draft" and not self.draft_path:
            raise HFBackendError("method 'draft' needs draft_model (an HF directory of the assistant model)")
        if self.model is None:
            self.model = self._load(self.model_path)
        if method == "draft" and self.assistant is None:
            self.assistant = self._load(self.draft_path)  # type: ignore[arg-type]
        self.method, self.k = method, k

    @property
    def info(self) -> dict[str, Any]:
        """What the profile's metadata needs (same keys as the engine backend's ``info``)."""
        import torch

        cfg = self.model.config
        heads = cfg.num_attention_heads
        shape = {
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "heads": heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            "vocab": cfg.vocab_size,
            "params": sum(p.numel() for p in self.model.parameters()),
        }
        device_name = (
            torch.cuda.get_device_name(0)
            if self.device.startswith("cuda")
            else cpu_description(torch.get_num_threads())
        )
        import transformers

        return {
            "backend": "hf",
            "engine": {
                "name": "transformers",
                "version": f"{transformers.__version__} (torch {torch.__version__})",
            },
            "model_info": {"name": Path(self.model_path).name, "shape": shape, "weights": "real"},
            "kv_capacity_blocks": 0,  # no paged KV pool: a contiguous cache per sequence
            "block_size": 1,
            "device_name": device_name,
            "dtype": self.dtype_name,
        }

    def _input_ids(self, concurrency: int, context_len: int) -> Any:
        import torch

        vocab = int(self.model.config.vocab_size)
        g = torch.Generator().manual_seed(self.seed)
        # Repeating a short random pattern gives prompt lookup something to find, as real text does.
        pattern = torch.randint(100, min(vocab, 30000), (concurrency, 16), generator=g)
        reps = -(-context_len // 16)
        return pattern.repeat(1, reps)[:, :context_len].to(self.device)

    def _generate(self, input_ids: Any, new_tokens: int, streamer: Any = None) -> Any:
        import torch

        kwargs: dict[str, Any] = dict(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=streamer,
            attention_mask=torch.ones_like(input_ids), pad_token_id=self.model.config.eos_token_id or 0,
        )  # fmt: skip
        if self.method == "draft":
            kwargs.update(assistant_model=self.assistant)
            self.assistant.generation_config.num_assistant_tokens = self.k
            self.assistant.generation_config.num_assistant_tokens_schedule = "constant"
            self.assistant.generation_config.assistant_confidence_threshold = 0.0
        elif self.method == "ngram":
            kwargs.update(prompt_lookup_num_tokens=self.k)
        with torch.inference_mode():
            return self.model.generate(input_ids, **kwargs)

    def measure(self, spec: PointSpec, *, steps: int, warmup: int, power: Any = None) -> DecodePoint:
        """One point: ``warmup`` untimed tokens, then a generate of ``steps + 1`` tokens per sequence."""
        self.configure(spec.tp, spec.method, spec.k)
        if spec.method != "none" and spec.concurrency != 1:
            raise HFBackendError(
                f"concurrency {spec.concurrency}: transformers runs assisted generation "
                f"({spec.method}) only at batch size 1"
            )
        if steps < 1:
            raise HFBackendError(f"steps must be >= 1, got {steps}")
        input_ids = self._input_ids(spec.concurrency, max(1, spec.context_len))
        if warmup:
            self._generate(input_ids, max(2, warmup))
        streamer = _TimingStreamer()
        if power is not None:
            power.start()
        t0 = time.perf_counter()
        out = self._generate(input_ids, steps + 1, streamer)
        t1 = time.perf_counter()
        watts = power.stop() if power is not None else None
        new_tokens = int(out.shape[1] - input_ids.shape[1])
        ev = streamer.events
        if new_tokens < 2 or len(ev) < 2:
            raise HFBackendError(f"generate produced {new_tokens} tokens in {len(ev)} steps; need >= 2")
        first, last = ev[0][0], ev[-1][0]
        itl_ms = 1000.0 * md.request_itl(first, last, new_tokens)  # type: ignore[operator]
        gaps = [1000.0 * (b[0] - a[0]) for a, b in zip(ev, ev[1:], strict=False)]
        tps = max(1.0, (new_tokens - ev[0][1]) / (len(ev) - 1))  # the first put may carry several
        thr = md.throughput_per_gpu(spec.concurrency * new_tokens, t1 - t0, spec.tp)
        return DecodePoint(
            tp=spec.tp,
            method=spec.method,  # type: ignore[arg-type]
            k=spec.k,
            concurrency=spec.concurrency,
            context_len=spec.context_len,
            step_ms=statistics.median(gaps),
            tokens_per_step=tps,
            # One generate: every sequence of the batch shares the same token times.
            itl_ms=md.summarize([itl_ms] * spec.concurrency),
            throughput_per_gpu=thr,
            samples=spec.concurrency,
            power_w=watts,
            joules_per_token=(watts / (thr * spec.tp)) if watts and thr > 0 else None,
        )

    def measure_prefill(self, tp: int, input_len: int, *, repeats: int = 3) -> PrefillPoint:
        """Time to the first token of one sequence of ``input_len`` tokens (median of ``repeats``)."""
        self.configure(tp, "none", 0)
        input_ids = self._input_ids(1, input_len)
        self._generate(input_ids, 1)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self._generate(input_ids, 1)
            times.append(1000.0 * (time.perf_counter() - t0))
        ms = statistics.median(times)
        rate = input_len / (ms / 1000.0) / tp
        return PrefillPoint(
            tp=tp, input_len=input_len, ttft_ms=ms, prefill_tokens_per_s_per_gpu=rate, samples=repeats
        )

    def close(self) -> None:
        self.model = self.assistant = None
