"""FastAPI routes of `engine serve`: OpenAI completions and chat (plain and SSE), models, health, metrics.

Each request is validated (pydantic, then context length against the model), turned into token ids
and ``SamplingParams``, and handed to the ``AsyncEngine``. Streaming sends one SSE event per engine
step that produced text; under speculation one event may carry several tokens, as with vLLM.
A client that goes away mid-request (stream or not) aborts its request at once.
The routes sit on three routers (health and metrics, models, completions) and share one
``ServeState`` through ``app.state.serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.errors import RequestError
from engine.serve.async_engine import AsyncEngine, EngineDeadError, RequestHandle
from engine.serve.detokenize import IncrementalDetokenizer
from engine.serve.errors import APIError, error_body, install_error_handlers
from engine.serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics
from engine.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
    new_id,
    now_s,
)

log = logging.getLogger(__name__)


class TokenizerLike(Protocol):
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def apply_chat_template(self, messages: list[dict[str, str]]) -> str: ...


@dataclass
class ServedModel:
    """What the HTTP layer needs to know about the model behind the engine."""

    name: str  # first served name: the one in responses and in the metrics' model_name label
    tokenizer: TokenizerLike
    max_model_len: int
    vocab_size: int
    aliases: tuple[str, ...] = field(default_factory=tuple)
    created: int = field(default_factory=now_s)

    def accepts(self, requested: str | None) -> bool:
        return requested is None or requested == self.name or requested in self.aliases


@dataclass
class _Prepared:
    request_id: str
    prompt_ids: list[int]
    params: Any
    max_tokens: int
    stops: list[str]


def _sampling_params(**kwargs: Any) -> Any:
    from engine.sampling import SamplingParams

    params = SamplingParams(**kwargs)
    params.validate()
    return params


@dataclass
class ServeState:
    """What every route shares, kept on ``app.state.serve``: the engine thread, the model it serves, the
    metrics registry and how a request's sampling fields become engine parameters."""

    async_engine: AsyncEngine
    served: ServedModel
    metrics: ServeMetrics | None
    params_factory: Callable[..., Any]

    def check_model(self, requested: str | None) -> None:
        """A request naming another model is a 404, as vLLM answers it."""
        if not self.served.accepts(requested):
            raise APIError(
                f"The model `{requested}` does not exist.", status=404, param="model", kind="NotFoundError"
            )

    def prepare(
        self,
        prompt_ids: list[int],
        req: CompletionRequest | ChatCompletionRequest,
        max_tokens: int | None,
        prefix: str,
    ) -> _Prepared:
        """Check the request against the context length and build its sampling parameters."""
        max_tokens = self._output_budget(len(prompt_ids), max_tokens)
        kwargs: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": req.ignore_eos}
        kwargs["temperature"] = 1.0 if req.temperature is None else req.temperature
        if req.top_p is not None:
            kwargs["top_p"] = req.top_p
        if req.seed is not None:
            kwargs["seed"] = req.seed
        try:
            params = self.params_factory(**kwargs)
        except RequestError as exc:
            raise APIError(str(exc)) from exc
        return _Prepared(new_id(prefix), prompt_ids, params, max_tokens, req.stop_list())

    def _output_budget(self, n_prompt: int, max_tokens: int | None) -> int:
        """The output tokens a request may have: what it asked for (the rest of the context if nothing),
        refused with vLLM's wording when the prompt and the output do not fit the context."""
        max_len = self.served.max_model_len
        if n_prompt == 0:
            raise APIError("prompt: must contain at least one token", param="prompt")
        if n_prompt >= max_len:
            raise APIError(
                f"This model's maximum context length is {max_len} tokens. However, your "
                f"prompt has {n_prompt} tokens; leave room for at least one output token.",
                param="prompt",
            )
        if max_tokens is None:
            return max_len - n_prompt
        if n_prompt + max_tokens > max_len:
            raise APIError(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                "completion). Please reduce the length of the prompt or max_tokens.",
                param="max_tokens",
            )
        return max_tokens

    async def submit(self, p: _Prepared) -> RequestHandle:
        """Hand a prepared request to the engine thread; a refusal is a 400, a dead engine a 503."""
        try:
            return await self.async_engine.submit(
                p.request_id, p.prompt_ids, p.params, max_tokens=p.max_tokens
            )
        except RequestError as exc:
            raise APIError(str(exc)) from exc
        except EngineDeadError as exc:
            raise APIError(str(exc), status=503) from exc


def _serve_state(request: Request) -> ServeState:
    return request.app.state.serve


State = Annotated[ServeState, Depends(_serve_state)]

health_router = APIRouter()
models_router = APIRouter()
completions_router = APIRouter()
ROUTERS = (health_router, models_router, completions_router)


@health_router.get("/health")
async def health(state: State) -> Response:
    if not state.async_engine.running:
        return JSONResponse(error_body("engine loop is not running", status=503), status_code=503)
    return Response(status_code=200)


@health_router.get("/metrics")
async def prometheus_metrics(state: State) -> Response:
    body = state.metrics.exposition() if state.metrics is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@models_router.get("/v1/models")
async def models(state: State) -> ModelList:
    served = state.served
    names = (served.name, *served.aliases)
    return ModelList(
        data=[ModelCard(id=n, created=served.created, max_model_len=served.max_model_len) for n in names]
    )


@models_router.post("/tokenize")
async def tokenize(req: TokenizeRequest, state: State) -> TokenizeResponse:
    """vLLM's endpoint: clients (the profiler's exact-length prompts) cut ids instead of probing."""
    state.check_model(req.model)
    ids = state.served.tokenizer.encode(req.prompt)
    return TokenizeResponse(count=len(ids), max_model_len=state.served.max_model_len, tokens=ids)


@completions_router.post("/v1/completions")
async def completions(req: CompletionRequest, raw: Request, state: State) -> Response:
    state.check_model(req.model)
    served = state.served
    prepared = state.prepare(_completion_prompt_ids(req, served), req, req.max_tokens, "cmpl")
    handle = await state.submit(prepared)
    if req.stream:
        return _sse(_completion_events(handle, prepared, served, req.include_usage), handle)
    return await _until_disconnect(raw, handle, _completion_body(handle, prepared, served))


@completions_router.post("/v1/chat/completions")
async def chat(req: ChatCompletionRequest, raw: Request, state: State) -> Response:
    state.check_model(req.model)
    served = state.served
    prepared = state.prepare(_chat_prompt_ids(req, served), req, req.requested_max_tokens(), "chatcmpl")
    handle = await state.submit(prepared)
    if req.stream:
        return _sse(_chat_events(handle, prepared, served, req.include_usage), handle)
    return await _until_disconnect(raw, handle, _chat_body(handle, prepared, served))


def _completion_prompt_ids(req: CompletionRequest, served: ServedModel) -> list[int]:
    """A text prompt is tokenized; a prompt of ids is taken as given once every id is in the vocabulary,
    so a bad id is a 400 naming it rather than an index error inside the model."""
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        return served.tokenizer.encode(prompt)
    bad = next((t for t in prompt if not 0 <= t < served.vocab_size), None)
    if bad is not None:
        raise APIError(
            f"prompt: token id {bad} is outside the vocabulary [0, {served.vocab_size})",
            param="prompt",
        )
    return list(prompt)


def _chat_prompt_ids(req: ChatCompletionRequest, served: ServedModel) -> list[int]:
    """The conversation through the model's chat template; a template that rejects it is bad input."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = served.tokenizer.apply_chat_template(messages)
    except Exception as exc:  # noqa: BLE001 - a template that rejects the conversation is bad input
        raise APIError(f"messages: the chat template rejected them: {exc}", param="messages") from exc
    return served.tokenizer.encode(text)


def build_app(
    async_engine: AsyncEngine,
    served: ServedModel,
    metrics: ServeMetrics | None = None,
    *,
    params_factory: Callable[..., Any] = _sampling_params,
) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine thread."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.shutdown()

    app = FastAPI(title="specplan engine serve", lifespan=lifespan)
    install_error_handlers(app)
    app.state.serve = ServeState(async_engine, served, metrics, params_factory)
    for router in ROUTERS:
        app.include_router(router)
    return app


# --- generation helpers ---------------------------------------------------------------------------


@dataclass
class _Result:
    text: str
    num_tokens: int
    finish_reason: str


async def _run(
    handle: RequestHandle, p: _Prepared, served: ServedModel
) -> AsyncIterator[tuple[str, _Result | None]]:
    """Text deltas of one request; the last item carries the result (finish reason, token count)."""
    detok = IncrementalDetokenizer(served.tokenizer, p.stops)
    n_tokens = 0
    async for item in handle.items():
        n_tokens += len(item.new_token_ids)
        delta = detok.update(item.new_token_ids, finished=item.finished)
        if detok.stopped:
            handle.abort("stop")  # no-op if the engine finished it in this very step
            yield delta, _Result(detok.text, detok.num_tokens_at_stop or n_tokens, "stop")
            return
        if item.finished:
            yield delta, _Result(detok.text, n_tokens, item.finish_reason or "stop")
            return
        if delta:
            yield delta, None


async def _completion_body(handle: RequestHandle, p: _Prepared, served: ServedModel) -> CompletionResponse:
    result: _Result | None = None
    async for _, res in _run(handle, p, served):
        result = res or result
    assert result is not None
    return CompletionResponse(
        id=p.request_id,
        created=now_s(),
        model=served.name,
        choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
        usage=UsageInfo.of(len(p.prompt_ids), result.num_tokens),
    )


async def _chat_body(handle: RequestHandle, p: _Prepared, served: ServedModel) -> ChatCompletionResponse:
    result: _Result | None = None
    async for _, res in _run(handle, p, served):
        result = res or result
    assert result is not None
    return ChatCompletionResponse(
        id=p.request_id,
        created=now_s(),
        model=served.name,
        choices=[
            ChatChoice(message=ChatResponseMessage(content=result.text), finish_reason=result.finish_reason)
        ],
        usage=UsageInfo.of(len(p.prompt_ids), result.num_tokens),
    )


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _chunk_dict(model: Any, include_usage: bool) -> dict[str, Any]:
    d = model.model_dump()
    if not include_usage:
        d.pop("usage", None)
    return d


def _usage_event(
    body: type[CompletionResponse] | type[ChatCompletionChunk],
    p: _Prepared,
    served: ServedModel,
    created: int,
    result: _Result,
) -> str:
    """The closing chunk of a stream that asked for usage: no choices, the request's token counts."""
    usage = UsageInfo.of(len(p.prompt_ids), result.num_tokens)
    return _event(
        body(id=p.request_id, created=created, model=served.name, choices=[], usage=usage).model_dump()
    )


async def _completion_events(
    handle: RequestHandle, p: _Prepared, served: ServedModel, include_usage: bool
) -> AsyncIterator[str]:
    created = now_s()

    def chunk(text: str, finish: str | None) -> str:
        body = CompletionResponse(
            id=p.request_id,
            created=created,
            model=served.name,
            choices=[CompletionChoice(text=text, finish_reason=finish)],
        )
        return _event(_chunk_dict(body, include_usage))

    result: _Result | None = None
    async for delta, res in _run(handle, p, served):
        result = res
        yield chunk(delta, res.finish_reason if res else None)
    if include_usage and result is not None:
        yield _usage_event(CompletionResponse, p, served, created, result)


async def _chat_events(
    handle: RequestHandle, p: _Prepared, served: ServedModel, include_usage: bool
) -> AsyncIterator[str]:
    created = now_s()

    def chunk(delta: DeltaMessage, finish: str | None) -> str:
        body = ChatCompletionChunk(
            id=p.request_id,
            created=created,
            model=served.name,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish)],
        )
        return _event(_chunk_dict(body, include_usage))

    yield chunk(DeltaMessage(role="assistant", content=""), None)
    result: _Result | None = None
    async for delta, res in _run(handle, p, served):
        result = res
        if delta:
            yield chunk(DeltaMessage(content=delta), None)
        if res is not None:
            yield chunk(DeltaMessage(), res.finish_reason)
    if include_usage and result is not None:
        yield _usage_event(ChatCompletionChunk, p, served, created, result)


def _sse(events: AsyncIterator[str], handle: RequestHandle) -> StreamingResponse:
    """Frame events as SSE; an engine failure mid-stream becomes an error event, then [DONE]."""

    async def body() -> AsyncIterator[str]:
        try:
            async for ev in events:
                yield ev
        except EngineDeadError as exc:
            yield _event(error_body(str(exc), status=503))
        finally:
            handle.close()  # client gone (cancelled) or done: abort unless finished
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _wait_for_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def _until_disconnect(raw: Request, handle: RequestHandle, work: Awaitable[Any]) -> Response:
    """Run a non-streaming request, aborting it the moment the client disconnects."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_for_disconnect(raw))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            try:
                body = task.result()
            except EngineDeadError as exc:
                raise APIError(str(exc), status=503) from exc
            return JSONResponse(body.model_dump())
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return Response(status_code=499)  # nobody is listening; the request was aborted
    finally:
        watch.cancel()
        handle.close()


def served_model_for(engine: Any, name: str, aliases: tuple[str, ...] = ()) -> ServedModel:
    """Describe an ``LLMEngine`` for the HTTP layer (context length and vocabulary from its model)."""
    tokenizer = engine.tokenizer
    max_len = getattr(engine, "max_model_len", None)
    if max_len is None:
        max_len = engine.config.max_position_embeddings
    vocab = getattr(tokenizer, "vocab_size", None) or engine.config.vocab_size
    return ServedModel(
        name=name, tokenizer=tokenizer, max_model_len=int(max_len), vocab_size=int(vocab), aliases=aliases
    )


def app_for_engine(
    engine: Any, name: str, *, aliases: tuple[str, ...] = (), num_spec_tokens: int = 0
) -> FastAPI:
    """The whole server for an ``LLMEngine``: metrics registry, engine thread and routes."""
    served = served_model_for(engine, name, aliases)
    metrics = ServeMetrics(name, max_model_len=served.max_model_len, num_spec_tokens=num_spec_tokens)
    return build_app(AsyncEngine(engine, metrics), served, metrics)
