"""``GET /correction``: the live correction daemons' state (ITL factor, live acceptance, staleness)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from api.state import Server
from planner.daemon.runner import CorrectionState

router = APIRouter()


class CorrectionAnswer(BaseModel):
    enabled: bool
    detail: str | None = None
    profiles: dict[str, CorrectionState] = {}


@router.get("/correction", response_model=CorrectionAnswer)
def get_correction(state: Server) -> CorrectionAnswer:
    if not state.daemons:
        return CorrectionAnswer(enabled=False, detail="no correction daemon (serve with --metrics-url)")
    return CorrectionAnswer(enabled=True, profiles={pid: d.state for pid, d in state.daemons.items()})
