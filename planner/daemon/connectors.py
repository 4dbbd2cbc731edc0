"""Where scaling decisions go: a log line, a JSON file (written atomically), or an HTTP POST callback."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

import httpx

from planner.profile import atomic_write_text

log = logging.getLogger("planner.daemon")


class Connector(Protocol):
    name: str

    async def emit(self, decision: dict) -> None:
        """Deliver one decision; raise on failure (the daemon records it and keeps running)."""
        ...


class LogConnector:
    name = "log"

    async def emit(self, decision: dict) -> None:
        log.info("scaling decision %s", json.dumps(decision, sort_keys=True))


class FileConnector:
    """Keeps ``path`` holding the latest decision, so an operator or a script can poll one file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = f"file:{self.path}"

    async def emit(self, decision: dict) -> None:
        atomic_write_text(self.path, json.dumps(decision, indent=1, sort_keys=True) + "\n")


class HttpConnector:
    """POSTs each decision as JSON to ``url`` (an autoscaler webhook); non-2xx is a failure."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url
        self.name = f"http:{url}"
        self.timeout_s = timeout_s

    async def emit(self, decision: dict) -> None:
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            resp = await client.post(self.url, json=decision)
            resp.raise_for_status()


def make_connector(spec: str) -> Connector:
    """``log``, ``file:PATH`` or an ``http://`` / ``https://`` URL."""
    if spec == "log":
        return LogConnector()
    if spec.startswith("file:") and len(spec) > 5:
        return FileConnector(spec[5:])
    if spec.startswith(("http://", "https://")):
        return HttpConnector(spec)
    raise ValueError(f"connector={spec!r}: expected 'log', 'file:PATH' or an http(s):// URL")
