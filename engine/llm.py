"""Offline API: ``LLM(model).generate(prompts, SamplingParams)`` runs a batch to completion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.engine_config import EngineConfig
from engine.errors import ConfigError, RequestError
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    token_times: list[float]  # time.monotonic() per output token
    prompt_token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None


class LLM:
    """Thin wrapper over LLMEngine: ``LLM(model, **options)`` with the fields of ``EngineConfig`` as
    keywords, or ``LLM(config)`` with a config a command line already built."""

    def __init__(self, model: str | EngineConfig, **options: Any) -> None:
        if isinstance(model, EngineConfig):
            if options:
                raise ConfigError(
                    f"LLM: pass options in the EngineConfig, not as keywords: {sorted(options)}"
                )
            config = model
        else:
            config = EngineConfig(model=model, **options)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    @property
    def weights_label(self) -> str:
        return self.engine.weights_label

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat: bool = False,
    ) -> list[Completion]:
        """Texts (encoded with the model's tokenizer; ``chat=True`` applies its chat template first)
        or token-id lists; one SamplingParams for all or one per prompt. Results in prompt order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise RequestError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        ids_list = [self._encode(p, chat) for p in prompts]
        rid = []
        for ids, p in zip(ids_list, plist, strict=True):
            self._counter += 1
            request_id = f"llm-{self._counter}"
            self.engine.add_request(request_id, ids, p)
            rid.append(request_id)
        done: dict[str, Any] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        results = []
        for request_id, ids in zip(rid, ids_list, strict=True):
            out = done[request_id]
            text = self.tokenizer.decode(out.token_ids)
            if isinstance(out.stop_reason, str) and out.stop_reason in text:
                text = text[: text.index(out.stop_reason)]
            results.append(
                Completion(
                    text, list(out.token_ids), list(out.token_times), ids, out.finish_reason, out.stop_reason
                )
            )
        return results

    def _encode(self, prompt: str | Sequence[int], chat: bool) -> list[int]:
        if isinstance(prompt, str):
            if chat:
                prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        if chat:
            raise RequestError("chat=True needs text prompts, got token ids")
        return list(prompt)
