"""FastAPI app behind ``planner serve``: plans, profiles, capacity, correction state, metrics, dashboard.

Every user error is a 4xx naming the field (api.errors); an unknown profile is 404. A repeated
``GET /plan`` is answered from the response cache before routing (api.plan_response_cache). Writes can
be locked (api.guard); a full disk is a 507 that leaves every file as it was. The routes live in
api.routes, one router per concern, and share the server's state through ``app.state.server``.
"""

import asyncio
import contextlib
from pathlib import Path

from fastapi import FastAPI

from api.default_profile import host_gpu_names
from api.errors import add_error_handlers
from api.guard import DEFAULT_MAX_BODY_BYTES, BodySizeLimit, WriteGuard
from api.metrics import ApiMetrics
from api.plan_response_cache import PlanFastPath, PlanResponseCache
from api.routes import capacity, correction, dashboard, health, plan, profiles
from api.state import ServerState
from api.store import ProfileStore
from planner.daemon import CorrectionDaemon, DaemonConfig, make_connector

ROUTERS = (plan.router, profiles.router, capacity.router, correction.router, health.router, dashboard.router)


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
    state = _server_state(
        profiles_dir, daemon, daemon_profile, connector, api_key, read_only, max_body_bytes, default_profile
    )
    app = FastAPI(
        title="specplan planner",
        version="0.1.0",
        description="SLA-driven capacity planning for LLM decoding with speculative decoding.",
        lifespan=_run_daemons,
        docs_url=None,  # Swagger UI and ReDoc load from a CDN: blank offline; /docs is served by api.routes
        redoc_url=None,
    )
    app.state.server = state
    add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    state.metrics.profiles.set(len(state.store.ids()))
    app.add_middleware(PlanFastPath, cache=state.responses, observe=state.metrics.plan_seconds.observe)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    return app


def _server_state(
    profiles_dir: str | Path,
    daemon: DaemonConfig | None,
    daemon_profile: str | None,
    connector: str,
    api_key: str | None,
    read_only: bool,
    max_body_bytes: int,
    default_profile: str | None,
) -> ServerState:
    """Load the profiles and build what the routes share, refusing options that name nothing loaded."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes}: must be >= 1")
    store = ProfileStore(profiles_dir)
    if default_profile is not None and default_profile not in store.planners:
        raise ValueError(
            f"default_profile={default_profile!r}: name one of the loaded profiles {store.ids()}"
        )
    write_guard = WriteGuard(api_key, read_only)  # refuses an empty token
    daemons: dict[str, CorrectionDaemon] = {}
    if daemon is not None:
        pid = daemon_profile or (store.ids()[0] if len(store.ids()) == 1 else None)
        if pid is None or pid not in store.planners:
            raise ValueError(
                f"daemon_profile={daemon_profile!r}: name one of the loaded profiles {store.ids()}"
            )
        daemons[pid] = CorrectionDaemon(store.planners[pid], daemon, make_connector(connector))
    responses = PlanResponseCache(lambda: store.revision)
    store.on_change(responses.clear)  # cached answers may name or depend on the replaced profile set
    return ServerState(
        store=store,
        daemons=daemons,
        metrics=ApiMetrics(),
        responses=responses,
        write_guard=write_guard,
        host_gpus=host_gpu_names(),
        configured_default=default_profile,
    )


@contextlib.asynccontextmanager
async def _run_daemons(app: FastAPI):
    """Run the correction daemons while the app serves; stop them (5 s each at most) when it stops."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.run(stop)) for d in app.state.server.daemons.values()]
    try:
        yield
    finally:
        stop.set()
        for t in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(t, timeout=5)
