"""A response cache in front of the app for repeated ``GET /plan`` queries.

Plans are pure functions of (profiles, query), so a 200 answer to a given raw query string can be
replayed byte for byte until a profile changes (the profile revision moves on). Serving it from a
plain ASGI layer skips routing, dependency solving and validation, which dominate the cost of a cached
plan; a query seen for the first time (or a corrected plan, which depends on live state) goes through
the full app.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

_HEADERS_JSON = [(b"content-type", b"application/json")]


class PlanResponseCache:
    """Raw query string -> JSON body of a 200 ``/plan`` answer (LRU, bounded by entries and bytes).

    Each body is tagged with the profile revision it was computed at (read before the planner) and is
    replayed only while that is still the current revision: an answer computed from a profile that was
    replaced meanwhile is never served after the replacement's 201.
    """

    def __init__(
        self, current_revision: Callable[[], int], size: int = 8192, max_bytes: int = 32 * 2**20
    ) -> None:
        self.current_revision = current_revision
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, tuple[int, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, query: bytes) -> bytes | None:
        with self._lock:
            item = self._items.get(query)
            if item is None:
                return None
            if item[0] != self.current_revision():
                self._drop(query)
                return None
            self._items.move_to_end(query)
            self.hits += 1
            return item[1]

    def put(self, query: bytes, body: bytes, revision: int) -> None:
        with self._lock:
            if revision != self.current_revision():
                return
            if query in self._items:
                self._drop(query)
            self._items[query] = (revision, body)
            self.bytes += len(query) + len(body)
            while self._items and (len(self._items) > self.size or self.bytes > self.max_bytes):
                self._drop(next(iter(self._items)))

    def _drop(self, query: bytes) -> None:
        _, body = self._items.pop(query)
        self.bytes -= len(query) + len(body)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


class PlanFastPath:
    """ASGI wrapper: answers a cached ``GET /plan?...`` itself, passes everything else to ``app``."""

    def __init__(self, app: ASGIApp, cache: PlanResponseCache, observe: Callable[[float], None]) -> None:
        self.app = app
        self.cache = cache
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/plan":
            t0 = time.perf_counter()
            body = self.cache.get(scope["query_string"])
            if body is not None:
                headers = [*_HEADERS_JSON, (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                self.observe(time.perf_counter() - t0)
                return
        await self.app(scope, receive, send)
