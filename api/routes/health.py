"""``GET /healthz`` and ``GET /metrics``: is the server up, what it serves, and its Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel

from api.state import Server

router = APIRouter()


class Health(BaseModel):
    status: str
    profiles: int
    profile_load_errors: dict[str, str]
    correction: str
    default_profile: str | None = None
    default_profile_reason: str | None = None


@router.get("/healthz", response_model=Health)
def healthz(state: Server) -> Health:
    stale = [pid for pid, d in state.daemons.items() if d.state.stale]
    chosen = state.default_profile()
    return Health(
        default_profile=chosen.id if chosen else None,
        default_profile_reason=chosen.reason if chosen else None,
        status="ok",
        profiles=len(state.store.ids()),
        profile_load_errors=state.store.load_errors,
        correction="off" if not state.daemons else ("stale: " + ",".join(stale) if stale else "live"),
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def get_metrics(state: Server) -> Response:
    state.metrics.profiles.set(len(state.store.ids()))
    state.metrics.update_daemons(state.daemons)
    return Response(state.metrics.exposition(), media_type=state.metrics.content_type)
