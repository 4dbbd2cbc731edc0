"""``/profiles``: list, read and upload the profiles the server plans from.

An upload is written atomically before it is served, so a full disk (507) or any other write failure
leaves both the file and the served profile as they were; it needs write access (api.guard).
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import Response

from api.errors import ERRORS, NO_SPACE, WRITE_ERRORS
from api.state import Server, can_write
from api.store import ID_PATTERN, ProfileSummary, summarize
from planner.profile import Profile

log = logging.getLogger("api")

router = APIRouter()


@router.get("/profiles", response_model=list[ProfileSummary])
def list_profiles(state: Server) -> list[ProfileSummary]:
    return [summarize(pid, state.store.planners[pid].profile) for pid in state.store.ids()]


@router.get("/profiles/{profile_id}", response_model=Profile, responses=ERRORS)
def get_profile(state: Server, profile_id: Annotated[str, PathParam(max_length=100)]) -> Response:
    _, planner = state.planner_for(profile_id)
    return Response(planner.profile.model_dump_json(exclude_none=True), media_type="application/json")


@router.post(
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
    state: Server,
    profile: Annotated[Profile, Body(description="a profile document (planner.profile schema)")],
    id: Annotated[str, Query(pattern=ID_PATTERN, description="id to store it under (file stem)")],
    overwrite: bool = False,
) -> ProfileSummary:
    try:
        state.store.add(id, profile, overwrite=overwrite)
    except FileExistsError:
        raise HTTPException(409, f"profile {id!r} exists; pass overwrite=true to replace it") from None
    except ValueError as exc:  # schema-valid but nothing to plan from (e.g. no successful decode point)
        detail = [{"loc": ["body", "decode"], "msg": str(exc), "type": "value_error"}]
        raise HTTPException(422, detail) from None
    except OSError as exc:  # the atomic write failed: the old file and the served profile are unchanged
        reason = f"profile {id!r} not written: {exc.strerror or exc}; nothing was changed"
        log.error("%s", reason)
        raise HTTPException(507 if exc.errno in NO_SPACE else 500, reason) from None
    state.metrics.profiles.set(len(state.store.ids()))
    return summarize(id, profile)
