"""What every route of the planner API shares, kept on ``app.state.server`` and handed to routes as a
dependency: the profiles, the correction daemons, the metrics, the plan response cache, and which profile
answers a query that names none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials

from api.default_profile import DefaultProfile, pick_default
from api.guard import WriteGuard, bearer
from api.metrics import ApiMetrics
from api.plan_response_cache import PlanResponseCache
from api.store import ProfileStore
from planner.daemon import CorrectionDaemon
from planner.plan import PlanInputError, Planner


@dataclass
class ServerState:
    store: ProfileStore
    daemons: dict[str, CorrectionDaemon]
    metrics: ApiMetrics
    responses: PlanResponseCache
    write_guard: WriteGuard
    host_gpus: list[str]
    configured_default: str | None = None  # planner serve --default-profile

    def default_profile(self) -> DefaultProfile | None:
        """The profile for queries without ``profile=`` (api.default_profile's rule), with its reason."""
        profiles = {pid: pl.profile for pid, pl in self.store.planners.items()}
        return pick_default(profiles, self.host_gpus, self.configured_default)

    def planner_at(self, profile: str | None) -> tuple[str, Planner, int]:
        """The profile's planner and the revision it belongs to (read together)."""
        planners, revision = self.store.snapshot()
        ids = sorted(planners)
        if profile is None:
            if not ids:
                raise HTTPException(404, "no profiles are loaded; POST /profiles to add one")
            chosen = self.default_profile()
            if chosen is None:
                raise PlanInputError(
                    "profile", None, f"required: no measured profile to default to among {ids}"
                )
            return chosen.id, planners[chosen.id], revision
        if profile not in planners:
            raise HTTPException(404, f"profile {profile!r} not found; loaded: {ids}")
        return profile, planners[profile], revision

    def planner_for(self, profile: str | None) -> tuple[str, Planner]:
        pid, planner, _ = self.planner_at(profile)
        return pid, planner


def server_state(request: Request) -> ServerState:
    return request.app.state.server


Server = Annotated[ServerState, Depends(server_state)]


def can_write(
    state: Server, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None
) -> None:
    """Dependency of write routes: the server's WriteGuard (read-only mode, API token) on this request."""
    state.write_guard(creds)
