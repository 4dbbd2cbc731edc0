"""``GET /plan``: the best configuration for an SLA, as JSON.

Plans are memoised per (profile revision, inputs) as ready JSON bytes and recorded in the response cache
that answers a repeated query before routing (api.plan_response_cache); a new plan is computed on a
worker thread, never on the event loop. A corrected plan depends on live state and is never cached.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.errors import ERRORS
from api.routes import Pos
from api.state import Server
from planner.plan import PlanResult

router = APIRouter()


@router.get("/plan", response_model=PlanResult, responses={**ERRORS, 409: {"description": "no daemon"}})
async def get_plan(
    request: Request,
    state: Server,
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
    pid, planner, revision = state.planner_at(profile)
    kwargs = dict(
        itl_ms=itl_ms, ttft_ms=ttft_ms, isl=isl, osl=osl, request_rate=request_rate,
        max_gpus=max_gpus, acceptance=acceptance, draft_coverage=draft_coverage,
        workload=workload, prior_model=prior_model,
    )  # fmt: skip
    if corrected:
        d = state.daemons.get(pid)
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
            state.store.cached_plan,
            pid,
            revision,
            params,
            lambda: planner.plan(**kwargs).model_dump_json().encode(),
        )
        state.responses.put(request.scope["query_string"], body, revision)
    state.metrics.plan_seconds.observe(time.perf_counter() - t0)
    return Response(content=body, media_type="application/json")
