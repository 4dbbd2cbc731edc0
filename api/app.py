"""FastAPI app behind ``planner serve``: plans, profiles, capacity, correction state, metrics, dashboard.

Every user error is a 4xx naming the field: pydantic/FastAPI validation gives 422 with the query field in
``loc``; a plan input the planner rejects (``PlanInputError``) is turned into the same 422 shape; an
unknown profile is 404. Plans are memoised per (profile revision, inputs) as ready JSON bytes, which is
what keeps ``GET /plan`` fast under load; a new plan is computed on a worker thread, never on the event
loop. Writes can be locked (``api.guard``); a full disk is a 507 that leaves every file as it was.
"""

import asyncio
import contextlib
import errno
import logging
import math
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, Field
from starlette.concurrency import run_in_threadpool

from api.default_profile import DefaultProfile, host_gpu_names, pick_default
from api.fastpath import PlanFastPath, PlanResponseCache
from api.guard import DEFAULT_MAX_BODY_BYTES, BodySizeLimit, WriteGuard
from api.metrics import ApiMetrics
from api.store import ID_PATTERN, ProfileStore, ProfileSummary, summarize
from planner.daemon import CorrectionDaemon, DaemonConfig, make_connector
from planner.daemon.runner import CorrectionState
from planner.plan import PlanInputError, Planner, PlanResult
from planner.profile import Profile

log = logging.getLogger("api")

# The dashboard's form sends its empty fields as empty strings: an empty field means "not given".
Blank = BeforeValidator(lambda v: None if v == "" else v)
# A positive, finite query number (FastAPI passes these straight to pydantic).
Pos: dict[str, Any] = dict(gt=0, le=1e9, allow_inf_nan=False)

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown profile"},
    422: {"description": "invalid parameter; detail[].loc names the field"},
}


class CapacityAnswer(BaseModel):
    profile: str
    tp: int
    k: int
    context: int
    block_size: int
    blocks_per_replica: int
    blocks_per_sequence: int
    max_concurrency: int


class Health(BaseModel):
    status: str
    profiles: int
    profile_load_errors: dict[str, str]
    correction: str
    default_profile: str | None = None
    default_profile_reason: str | None = None


class CorrectionAnswer(BaseModel):
    enabled: bool
    detail: str | None = None
    profiles: dict[str, CorrectionState] = {}


WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "the server has an API token and the request did not carry it"},
    403: {"description": "the server is read-only"},
    413: {"description": "request body over the server's limit"},
    507: {"description": "no space left to write the profile (nothing was changed)"},
}
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _json_safe(value: object) -> object:
    """An echoed input JSON can carry: non-finite numbers as text, documents left out, text cut short."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "..."
    if isinstance(value, dict | list | tuple | set | bytes):
        return None
    return value


def _error(loc: list, msg: str, type_: str, value: object) -> dict[str, Any]:
    out: dict[str, Any] = {"loc": loc, "msg": msg, "type": type_}
    safe = _json_safe(value)
    if safe is not None:
        out["input"] = safe
    return out


def _field_error(field: str, value: object, msg: str, where: str = "query") -> JSONResponse:
    body = {"detail": [_error([where, field], msg, "value_error", value)]}
    return JSONResponse(status_code=422, content=jsonable_encoder(body))


def create_app(
    profiles_dir: str | Path,
    *,
    daemon: DaemonConfig | None = None,
    daemon_profile: str | None = None,
    connector: str = "log",
    api_key: str | None = None,
    read_only: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    default_profile: str | None = None,
) -> FastAPI:
    """``api_key``: token required for writes (None: writes are open); ``read_only``: refuse writes."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes}: must be >= 1")
    store = ProfileStore(profiles_dir)
    if default_profile is not None and default_profile not in store.planners:
        raise ValueError(
            f"default_profile={default_profile!r}: name one of the loaded profiles {store.ids()}"
        )
    host_gpus = host_gpu_names()

    def default() -> DefaultProfile | None:
        profiles = {pid: pl.profile for pid, pl in store.planners.items()}
        return pick_default(profiles, host_gpus, default_profile)

    metrics = ApiMetrics()
    responses = PlanResponseCache(lambda: store.revision)
    store.on_change(responses.clear)  # cached answers may name or depend on the replaced profile set
    can_write = WriteGuard(api_key, read_only)
    holder: dict[str, CorrectionDaemon] = {}

    if daemon is not None:
        pid = daemon_profile or (store.ids()[0] if len(store.ids()) == 1 else None)
        if pid is None or pid not in store.planners:
            raise ValueError(
                f"daemon_profile={daemon_profile!r}: name one of the loaded profiles {store.ids()}"
            )
        holder[pid] = CorrectionDaemon(store.planners[pid], daemon, make_connector(connector))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        stop = asyncio.Event()
        tasks = [asyncio.create_task(d.run(stop)) for d in holder.values()]
        try:
            yield
        finally:
            stop.set()
            for t in tasks:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(t, timeout=5)

    app = FastAPI(
        title="specplan planner",
        version="0.1.0",
        description="SLA-driven capacity planning for LLM decoding with speculative decoding.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load from a CDN: blank offline; /docs is served below
        redoc_url=None,
    )
    app.state.store = store
    app.state.daemons = holder
    app.state.metrics = metrics
    app.state.default_profile = default

    @app.exception_handler(PlanInputError)
    async def _plan_input(_: Request, exc: PlanInputError) -> JSONResponse:
        return _field_error(exc.field, exc.value, exc.reason)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            _error(list(e.get("loc", ())), e.get("msg", ""), e.get("type", ""), e.get("input"))
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content=jsonable_encoder({"detail": detail}))

    def planner_at(profile: str | None) -> tuple[str, Planner, int]:
        """The profile's planner and the revision it belongs to (read together)."""
        planners, revision = store.snapshot()
        ids = sorted(planners)
        if profile is None:
            if not ids:
                raise HTTPException(404, "no profiles are loaded; POST /profiles to add one")
            chosen = default()
            if chosen is None:
                raise PlanInputError(
                    "profile", None, f"required: no measured profile to default to among {ids}"
                )
            return chosen.id, planners[chosen.id], revision
        if profile not in planners:
            raise HTTPException(404, f"profile {profile!r} not found; loaded: {ids}")
        return profile, planners[profile], revision

    def planner_for(profile: str | None) -> tuple[str, Planner]:
        pid, planner, _ = planner_at(profile)
        return pid, planner

    @app.get("/plan", response_model=PlanResult, responses={**ERRORS, 409: {"description": "no daemon"}})
    async def get_plan(
        request: Request,
        itl_ms: Annotated[float, Query(description="ITL SLA (ms)", **Pos)],
        ttft_ms: Annotated[float | None, Query(description="TTFT SLA (ms)", **Pos)] = None,
        isl: Annotated[int | None, Query(ge=1, le=10_000_000, description="input length (tokens)")] = None,
        osl: Annotated[int | None, Query(ge=1, le=10_000_000, description="output length (tokens)")] = None,
        request_rate: Annotated[float | None, Query(description="requests/s to size for", **Pos)] = None,
        max_gpus: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
        acceptance: Annotated[
            float | None, Query(ge=0, le=1, allow_inf_nan=False, description="given per-position rate")
        ] = None,
        draft_coverage: Annotated[float | None, Query(ge=0, le=1, allow_inf_nan=False)] = None,
        profile: Annotated[
            str | None, Query(max_length=100, description="profile id (default: see GET /healthz)")
        ] = None,
        corrected: Annotated[bool, Query(description="apply the live correction daemon's factor")] = False,
        workload: Annotated[
            str | None,
            Query(max_length=40, description="Spec-Bench category of the acceptance (default: mix)"),
        ] = None,
        prior_model: Annotated[
            str | None, Query(max_length=100, description="apply this model's literature prior, labelled")
        ] = None,
    ) -> Response:
        t0 = time.perf_counter()
        pid, planner, revision = planner_at(profile)
        kwargs = dict(
            itl_ms=itl_ms, ttft_ms=ttft_ms, isl=isl, osl=osl, request_rate=request_rate,
            max_gpus=max_gpus, acceptance=acceptance, draft_coverage=draft_coverage,
            workload=workload, prior_model=prior_model,
        )  # fmt: skip
        if corrected:
            d = holder.get(pid)
            if d is None:
                raise HTTPException(409, f"corrected=true: no correction daemon runs for profile {pid!r}")
            if acceptance is None:
                kwargs["acceptance"] = d.live_override()
            factor = d.state.factor
            body = await run_in_threadpool(
                lambda: planner.plan(**kwargs, itl_correction=factor).model_dump_json().encode()
            )
        else:
            params = tuple(kwargs.values())
            body = await run_in_threadpool(
                store.cached_plan,
                pid,
                revision,
                params,
                lambda: planner.plan(**kwargs).model_dump_json().encode(),
            )
            responses.put(request.scope["query_string"], body, revision)
        metrics.plan_seconds.observe(time.perf_counter() - t0)
        return Response(content=body, media_type="application/json")

    @app.get("/profiles", response_model=list[ProfileSummary])
    def list_profiles() -> list[ProfileSummary]:
        return [summarize(pid, store.planners[pid].profile) for pid in store.ids()]

    @app.get("/profiles/{profile_id}", response_model=Profile, responses=ERRORS)
    def get_profile(profile_id: Annotated[str, PathParam(max_length=100)]) -> Response:
        _, planner = planner_for(profile_id)
        return Response(planner.profile.model_dump_json(exclude_none=True), media_type="application/json")

    @app.post(
        "/profiles",
        status_code=201,
        response_model=ProfileSummary,
        responses={
            400: {"description": "the body is not JSON"},
            409: {"description": "a profile with this id exists (pass overwrite=true)"},
            **ERRORS,
            **WRITE_ERRORS,
        },
        dependencies=[Depends(can_write)],
    )
    def post_profile(
        profile: Annotated[Profile, Body(description="a profile document (planner.profile schema)")],
        id: Annotated[str, Query(pattern=ID_PATTERN, description="id to store it under (file stem)")],
        overwrite: bool = False,
    ) -> ProfileSummary:
        try:
            store.add(id, profile, overwrite=overwrite)
        except FileExistsError:
            raise HTTPException(409, f"profile {id!r} exists; pass overwrite=true to replace it") from None
        except ValueError as exc:  # schema-valid but nothing to plan from (e.g. no successful decode point)
            detail = [{"loc": ["body", "decode"], "msg": str(exc), "type": "value_error"}]
            raise HTTPException(422, detail) from None
        except OSError as exc:  # the atomic write failed: the old file and the served profile are unchanged
            reason = f"profile {id!r} not written: {exc.strerror or exc}; nothing was changed"
            log.error("%s", reason)
            raise HTTPException(507 if exc.errno in _NO_SPACE else 500, reason) from None
        metrics.profiles.set(len(store.ids()))
        return summarize(id, profile)

    @app.get("/capacity", response_model=CapacityAnswer, responses=ERRORS)
    def get_capacity(
        tp: Annotated[int, Query(ge=1, le=1024)],
        context: Annotated[int, Query(ge=1, le=10_000_000, description="tokens per sequence at its peak")],
        k: Annotated[int, Query(ge=0, le=64, description="lookahead (speculative) slots")] = 0,
        profile: Annotated[str | None, Query(max_length=100)] = None,
    ) -> CapacityAnswer:
        pid, planner = planner_for(profile)
        kv = planner.kv_bound(tp, k, context)
        return CapacityAnswer(
            profile=pid,
            tp=tp,
            k=k,
            context=context,
            block_size=kv.block_size,
            blocks_per_replica=kv.blocks_per_replica,
            blocks_per_sequence=kv.blocks_per_sequence,
            max_concurrency=kv.max_concurrency,
        )

    @app.get("/correction", response_model=CorrectionAnswer)
    def get_correction() -> CorrectionAnswer:
        if not holder:
            return CorrectionAnswer(enabled=False, detail="no correction daemon (serve with --metrics-url)")
        return CorrectionAnswer(enabled=True, profiles={pid: d.state for pid, d in holder.items()})

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        stale = [pid for pid, d in holder.items() if d.state.stale]
        chosen = default()
        return Health(
            default_profile=chosen.id if chosen else None,
            default_profile_reason=chosen.reason if chosen else None,
            status="ok",
            profiles=len(store.ids()),
            profile_load_errors=store.load_errors,
            correction="off" if not holder else ("stale: " + ",".join(stale) if stale else "live"),
        )

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    )
    def get_metrics() -> Response:
        metrics.profiles.set(len(store.ids()))
        metrics.update_daemons(holder)
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        from api.docs_page import render_docs

        return HTMLResponse(render_docs(app.openapi()))

    @app.get("/", response_class=HTMLResponse, responses=ERRORS)
    def dashboard(
        itl_ms: Annotated[float, Query(**Pos)] = 30.0,
        isl: Annotated[Annotated[int, Field(ge=1, le=1_000_000)] | None, Blank, Query()] = None,
        osl: Annotated[Annotated[int, Field(ge=1, le=1_000_000)] | None, Blank, Query()] = None,
        acceptance: Annotated[Annotated[float, Field(ge=0, le=1)] | None, Blank, Query()] = None,
        draft_coverage: Annotated[Annotated[float, Field(ge=0, le=1)] | None, Blank, Query()] = None,
        profile: Annotated[str | None, Query(max_length=100)] = None,
        workload: Annotated[str | None, Blank, Query(max_length=40)] = None,
    ) -> HTMLResponse:
        from api.page import PageQuery, render_page

        if not store.ids():
            return HTMLResponse("<h1>specplan planner</h1><p>No profiles loaded.</p>")
        pid, _ = planner_for(profile)
        chosen = default()
        query = PageQuery(itl_ms, isl, osl, acceptance, draft_coverage, workload)
        page = render_page(
            pid, dict(store.planners), query,
            default=chosen.id if chosen else None, default_reason=chosen.reason if chosen else None,
        )  # fmt: skip
        return HTMLResponse(page)

    metrics.profiles.set(len(store.ids()))
    app.add_middleware(PlanFastPath, cache=responses, observe=metrics.plan_seconds.observe)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    return app
