"""A response cache in front of the app for repeated ``GET /plan`` queries.

Plans are pure functions of (profiles, query), so a 200 answer to a given raw query string can be
replayed byte for byte until a profile changes. Serving it from a plain ASGI layer skips routing,
dependency solving and validation, which dominate the cost of a cached plan; a query seen for the
first time (or a corrected plan, which depends on live state) goes through the full app.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

_HEADERS_JSON = [(b"content-type", b"application/json")]


class PlanResponseCache:
    """Raw query string -> JSON body of a 200 ``/plan`` answer (LRU, bounded)."""

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self.hits = 0

    def get(self, query: bytes) -> bytes | None:
        body = self._items.get(query)
        if body is not None:
            self._items.move_to_end(query)
            self.hits += 1
        return body

    def put(self, query: bytes, body: bytes) -> None:
        self._items[query] = body
        if len(self._items) > self.size:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

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
