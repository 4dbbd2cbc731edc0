"""Profiles a server answers from: loaded from a directory, planners built once, uploads atomic."""

from __future__ import annotations

import logging
import re
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
_ID_RE = re.compile(ID_PATTERN)


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
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        for path in sorted(self.dir.glob("*.json")):
            try:
                self.planners[path.stem] = Planner(load_profile(path), path.stem)
            except (ProfileError, ValueError) as exc:
                self.load_errors[path.stem] = str(exc)
                log.warning("skipping %s", exc)

    @staticmethod
    def valid_id(pid: str) -> bool:
        return bool(_ID_RE.match(pid))

    def ids(self) -> list[str]:
        return sorted(self.planners)

    def add(self, pid: str, prof: Profile, *, overwrite: bool) -> Planner:
        """Validate that the profile can be planned from, then write it atomically and serve it."""
        planner = Planner(prof, pid)  # raises ValueError when it has nothing to plan from
        with self._lock:
            if pid in self.planners and not overwrite:
                raise FileExistsError(pid)
            atomic_write_text(self.dir / f"{pid}.json", dump_profile(prof))
            self.planners[pid] = planner
            self._cache = OrderedDict((k, v) for k, v in self._cache.items() if k[0] != pid)
        return planner

    def cached_plan(self, pid: str, params: tuple, compute: Callable[[], bytes]) -> bytes:
        """Plans are pure functions of (profile, inputs): memoise the most recent ones."""
        key = (pid, params)
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
