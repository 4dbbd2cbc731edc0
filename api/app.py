"""FastAPI app behind ``planner serve``: plans, profiles, capacity, correction state, metrics, dashboard.

Every user error is a 4xx naming the field: pydantic/FastAPI validation gives 422 with the query field in
``loc``; a plan input the planner rejects (``PlanInputError``) is turned into the same 422 shape; an
unknown profile is 404. Plans are memoised per (profile, inputs) as ready JSON bytes, which is what keeps
``GET /plan`` fast under load.
"""

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from api.fastpath import PlanFastPath, PlanResponseCache
from api.metrics import ApiMetrics
from api.store import ID_PATTERN, ProfileStore, ProfileSummary, summarize
from planner.daemon import CorrectionDaemon, DaemonConfig, make_connector
from planner.daemon.runner import CorrectionState
from planner.plan import PlanInputError, Planner, PlanResult
from planner.profile import Profile

log = logging.getLogger("api")

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


class CorrectionAnswer(BaseModel):
    enabled: bool
    detail: str | None = None
    profiles: dict[str, CorrectionState] = {}


def _field_error(field: str, value: object, msg: str, where: str = "query") -> JSONResponse:
    body = {"detail": [{"loc": [where, field], "msg": msg, "type": "value_error", "input": value}]}
    return JSONResponse(status_code=422, content=jsonable_encoder(body))


def create_app(
    profiles_dir: str | Path,
    *,
    daemon: DaemonConfig | None = None,
    daemon_profile: str | None = None,
    connector: str = "log",
) -> FastAPI:
    store = ProfileStore(profiles_dir)
    metrics = ApiMetrics()
    responses = PlanResponseCache()
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
    )
    app.state.store = store
    app.state.daemons = holder
    app.state.metrics = metrics

    @app.exception_handler(PlanInputError)
    async def _plan_input(_: Request, exc: PlanInputError) -> JSONResponse:
        return _field_error(exc.field, exc.value, exc.reason)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", ""),
             "input": e.get("input")}
            for e in exc.errors()
        ]  # fmt: skip
        return JSONResponse(status_code=422, content=jsonable_encoder({"detail": detail}))

    def planner_for(profile: str | None) -> tuple[str, Planner]:
        ids = store.ids()
        if profile is None:
            if len(ids) == 1:
                return ids[0], store.planners[ids[0]]
            if not ids:
                raise HTTPException(404, "no profiles are loaded; POST /profiles to add one")
            raise PlanInputError("profile", None, f"required when several profiles are loaded: {ids}")
        if profile not in store.planners:
            raise HTTPException(404, f"profile {profile!r} not found; loaded: {ids}")
        return profile, store.planners[profile]

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
        profile: Annotated[str | None, Query(max_length=100)] = None,
        corrected: Annotated[bool, Query(description="apply the live correction daemon's factor")] = False,
    ) -> Response:
        t0 = time.perf_counter()
        pid, planner = planner_for(profile)
        kwargs = dict(
            itl_ms=itl_ms, ttft_ms=ttft_ms, isl=isl, osl=osl, request_rate=request_rate,
            max_gpus=max_gpus, acceptance=acceptance, draft_coverage=draft_coverage,
        )  # fmt: skip
        if corrected:
            d = holder.get(pid)
            if d is None:
                raise HTTPException(409, f"corrected=true: no correction daemon runs for profile {pid!r}")
            if acceptance is None:
                kwargs["acceptance"] = d.live_override()
            body = planner.plan(**kwargs, itl_correction=d.state.factor).model_dump_json().encode()
        else:
            params = tuple(kwargs.values())
            body = store.cached_plan(pid, params, lambda: planner.plan(**kwargs).model_dump_json().encode())
            responses.put(request.scope["query_string"], body)
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
        },
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
        responses.clear()  # cached answers may name or depend on the replaced profile set
        metrics.profiles.set(len(store.ids()))
        return summarize(id, profile)

    @app.get("/capacity", response_model=CapacityAnswer, responses=ERRORS)
    def get_capacity(
        tp: Annotated[int, Query(ge=1, le=1024)],
        context: Annotated[int, Query(ge=0, le=10_000_000, description="tokens per sequence")],
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
        return Health(
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

    @app.get("/", response_class=HTMLResponse, responses=ERRORS)
    def dashboard(
        itl_ms: Annotated[float, Query(**Pos)] = 30.0,
        isl: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
        osl: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
        profile: Annotated[str | None, Query(max_length=100)] = None,
    ) -> HTMLResponse:
        from api.page import render_page

        if not store.ids():
            return HTMLResponse("<h1>specplan planner</h1><p>No profiles loaded.</p>")
        pid, planner = planner_for(profile)
        return HTMLResponse(render_page(pid, planner, store.ids(), itl_ms=itl_ms, isl=isl, osl=osl))

    metrics.profiles.set(len(store.ids()))
    app.add_middleware(PlanFastPath, cache=responses, observe=metrics.plan_seconds.observe)
    return app
