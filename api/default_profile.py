"""Which loaded profile answers a query that names none.

The rule (documented in README and docs/DESIGN.md): a profile named by ``planner serve --default-profile``;
else the only loaded profile; else the newest measured profile whose GPU is this host's GPU; else the
newest measured profile. A synthetic profile is never picked among several: it would answer with invented
numbers where a measurement exists. The host GPU comes from ``nvidia-smi`` (no torch on a planner host) or
``SPECPLAN_HOST_GPU``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from planner.profile import Profile

HOST_GPU_ENV = "SPECPLAN_HOST_GPU"


@dataclass(frozen=True)
class DefaultProfile:
    id: str
    reason: str


def host_gpu_names() -> list[str]:
    """Names of this host's GPUs (``SPECPLAN_HOST_GPU`` wins; empty when there is none)."""
    forced = os.environ.get(HOST_GPU_ENV)
    if forced is not None:
        return [n.strip() for n in forced.split(",") if n.strip()]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})


def pick_default(
    profiles: Mapping[str, Profile], host_gpus: list[str], configured: str | None = None
) -> DefaultProfile | None:
    """The profile for queries without ``profile=``, with the reason; None when no rule applies."""
    if configured is not None and configured in profiles:
        return DefaultProfile(configured, "set by --default-profile")
    if len(profiles) == 1:
        only = next(iter(profiles))
        return DefaultProfile(only, "the only loaded profile")
    measured = {pid: p for pid, p in profiles.items() if p.metadata.source != "synthetic"}
    if not measured:
        return None

    def newest(ids: list[str]) -> str:
        return max(ids, key=lambda pid: (measured[pid].metadata.created_at, pid))

    wanted = {g.lower() for g in host_gpus}
    on_host = [pid for pid, p in measured.items() if p.metadata.hardware.gpu_name.lower() in wanted]
    if on_host:
        pid = newest(on_host)
        return DefaultProfile(
            pid, f"newest measured profile for this host's GPU ({measured[pid].metadata.hardware.gpu_name})"
        )
    pid = newest(list(measured))
    where = f"this host's GPU {', '.join(host_gpus)} has no profile" if host_gpus else "no GPU on this host"
    return DefaultProfile(pid, f"newest measured profile ({where})")
