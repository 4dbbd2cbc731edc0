"""``GET /`` (the dashboard) and ``GET /docs`` (the API reference): HTML pages, drawn server-side."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BeforeValidator, Field

from api.errors import ERRORS
from api.routes import Pos
from api.state import Server

router = APIRouter()

# The dashboard's form sends its empty fields as empty strings: an empty field means "not given".
Blank = BeforeValidator(lambda v: None if v == "" else v)


@router.get("/docs", response_class=HTMLResponse, include_in_schema=False)
def docs(request: Request) -> HTMLResponse:
    from api.docs_page import render_docs

    return HTMLResponse(render_docs(request.app.openapi()))


@router.get("/", response_class=HTMLResponse, responses=ERRORS)
def dashboard(
    state: Server,
    itl_ms: Annotated[float, Query(**Pos)] = 30.0,
    isl: Annotated[Annotated[int, Field(ge=1, le=1_000_000)] | None, Blank, Query()] = None,
    osl: Annotated[Annotated[int, Field(ge=1, le=1_000_000)] | None, Blank, Query()] = None,
    acceptance: Annotated[Annotated[float, Field(ge=0, le=1)] | None, Blank, Query()] = None,
    draft_coverage: Annotated[Annotated[float, Field(ge=0, le=1)] | None, Blank, Query()] = None,
    profile: Annotated[str | None, Query(max_length=100)] = None,
    workload: Annotated[Annotated[str, Field(max_length=40)] | None, Blank, Query()] = None,
) -> HTMLResponse:
    from api.dashboard_page import PageQuery, render_page

    if not state.store.ids():
        return HTMLResponse("<h1>specplan planner</h1><p>No profiles loaded.</p>")
    pid, _ = state.planner_for(profile)
    chosen = state.default_profile()
    query = PageQuery(itl_ms, isl, osl, acceptance, draft_coverage, workload)
    page = render_page(
        pid, dict(state.store.planners), query,
        default=chosen.id if chosen else None, default_reason=chosen.reason if chosen else None,
    )  # fmt: skip
    return HTMLResponse(page)
