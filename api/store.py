"""Profiles a server answers from: loaded from a directory, planners built once, uploads atomic.

Every upload bumps ``revision`` and is the one place plan caches are invalidated: the store's own, and
every cache registered with ``on_change`` (the app's response cache). A planner's memo of step curves
goes with its planner, which an upload replaces.

A cached plan is stored under the revision it was computed at, read before the planner it was computed
with, so a plan that was being computed while its profile was replaced is never served afterwards (it
sits under an old revision that no reader asks for).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel

from planner.plan import Planner
from planner.profile import Profile, ProfileError, atomic_write_text, dump_profile, load_profile

log = logging.getLogger("api.store")

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class ProfileSummary(BaseModel):
    id: str
    model: str
    hardware: str
    gpu_count: int
    engine: str
    backend: str
    weights: str
    source: str
    created_at: datetime
    decode_points: int
    prefill_points: int
    configs: list[str]
    acceptance: list[str]


def summarize(pid: str, prof: Profile) -> ProfileSummary:
    m = prof.metadata
    return ProfileSummary(
        id=pid,
        model=m.model.name,
        hardware=m.hardware.gpu_name,
        gpu_count=m.hardware.gpu_count,
        engine=f"{m.engine.name} {m.engine.version}",
        backend=m.backend,
        weights=m.weights,
        source=m.source,
        created_at=m.created_at,
        decode_points=len(prof.decode),
        prefill_points=len(prof.prefill),
        configs=sorted({f"tp={p.tp} {p.method} k={p.k}" for p in prof.decode}),
        acceptance=[f"{a.method} k={a.k} ({a.source.kind})" for a in prof.acceptance],
    )


class ProfileStore:
    """Profiles by id (file stem). A file that does not load is logged and skipped, not fatal."""

    def __init__(self, directory: str | Path, cache_size: int = 4096) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ProfileError(f"{self.dir}: profiles directory does not exist")
        self.planners: dict[str, Planner] = {}
        self.load_errors: dict[str, str] = {}
        self.revision = 0
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # held briefly: reads of the served set and the plan cache
        self._write_lock = threading.Lock()  # one upload at a time, held across the disk write
        self._on_change: list[Callable[[], None]] = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                self.planners[path.stem] = Planner(load_profile(path), path.stem)
            except Exception as exc:  # one bad file must not keep the others from being served
                msg = str(exc) if isinstance(exc, ProfileError) else f"{path}: {type(exc).__name__}: {exc}"
                self.load_errors[path.stem] = msg
                log.warning("skipping %s", msg)

    def ids(self) -> list[str]:
        with self._lock:  # an upload may add an id meanwhile
            return sorted(self.planners)

    def snapshot(self) -> tuple[dict[str, Planner], int]:
        """The profiles being served and their revision, read together."""
        with self._lock:
            return dict(self.planners), self.revision

    def add(self, pid: str, prof: Profile, *, overwrite: bool) -> Planner:
        """Validate that the profile can be planned from, then write it atomically and serve it.

        The file is written before the profile is served, so an OSError (disk full) leaves both the
        file and the served profile as they were.
        """
        planner = Planner(prof, pid)  # raises ValueError when it has nothing to plan from
        with self._write_lock:
            if pid in self.planners and not overwrite:
                raise FileExistsError(pid)
            atomic_write_text(self.dir / f"{pid}.json", dump_profile(prof))
            with self._lock:
                self.planners[pid] = planner
                self.load_errors.pop(pid, None)
                self.revision += 1
                self._cache.clear()  # entries of older revisions are never read again
            for clear in self._on_change:
                clear()
        return planner

    def on_change(self, clear: Callable[[], None]) -> None:
        """Call ``clear`` after every change of the served profiles (e.g. to drop cached answers)."""
        self._on_change.append(clear)

    def cached_plan(self, pid: str, revision: int, params: tuple, compute: Callable[[], bytes]) -> bytes:
        """Plans are pure functions of (profile, inputs): memoise the most recent ones per revision."""
        key = (revision, pid, params)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        res = compute()
        with self._lock:
            self._cache[key] = res
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return res
