"""Who may write, and how much: an API token for writes, a read-only mode and a request body limit.

Reads stay open (plans, profiles, dashboard); a write (``POST /profiles``) needs ``Authorization:
Bearer <token>`` when the server was given a token, and is refused outright in read-only mode. The body
limit is enforced before the app reads the body, on the declared length and on the bytes received, so a
client cannot make the server hold or write more than ``max_bytes``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

API_KEY_ENV = "SPECPLAN_API_KEY"
DEFAULT_MAX_BODY_BYTES = 16 * 2**20  # a measured profile is tens to hundreds of KB

bearer = HTTPBearer(auto_error=False, description=f"the server's API token (--api-key or {API_KEY_ENV})")


class WriteGuard:
    """FastAPI dependency for write routes: read-only mode is a 403, a missing or wrong token a 401."""

    def __init__(self, api_key: str | None, read_only: bool) -> None:
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key: an empty token would let every client write; leave it unset instead")
        self._key = api_key.encode() if api_key is not None else None
        self.read_only = read_only

    def __call__(self, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None) -> None:
        if self.read_only:
            raise HTTPException(
                403, "this server is read-only (planner serve --read-only): writes are refused"
            )
        if self._key is None:
            return
        if creds is None or creds.scheme.lower() != "bearer":
            raise HTTPException(
                401, "writes need 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(creds.credentials.encode(), self._key):  # constant time
            raise HTTPException(401, "invalid API token", headers={"WWW-Authenticate": "Bearer"})


class BodySizeLimit:
    """ASGI wrapper: answers 413 to a request whose body is (or declares to be) over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send, int(declared))
            return
        # Read the body here (bounded), then hand it to the app as one message.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send, size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Callable, size: int) -> None:
        detail = f"request body of {size} bytes (or more) exceeds the limit of {self.max_bytes} bytes"
        payload = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
