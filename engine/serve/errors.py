"""OpenAI-style error objects, and the handlers that map bad input to 400 instead of 422 or 500.

The body is ``{"error": {"message", "type", "param", "code"}}``, the shape the official ``openai``
client parses into ``BadRequestError`` (its ``.message`` and ``.body`` carry our text).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import RequestError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error to return to the client with a status and an OpenAI error object."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


def error_body(
    message: str, *, status: int, param: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": kind or ("invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": status,
        }
    }


def error_response(exc: APIError) -> JSONResponse:
    body = error_body(exc.message, status=exc.status, param=exc.param, kind=exc.kind)
    return JSONResponse(body, status_code=exc.status)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence per pydantic error: the field path, what is wrong, the value given."""
    parts: list[str] = []
    first_param: str | None = None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc)
        if err.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        if err.get("type") == "missing":
            parts.append(f"field {field!r} is required")
        else:
            value = err.get("input")
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            shown = repr(value)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            parts.append(f"{field or 'body'}: {msg} (got {shown})" if field else msg)
        first_param = first_param or (loc[0] if loc else None)
    return "; ".join(parts) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    """Every failure leaves as an OpenAI error object; nothing reaches the client as a bare 500 page."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(APIError(str(exc), status=400))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return error_response(APIError(message, status=400, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = (
            HTTPStatus(exc.status_code).phrase if exc.status_code in HTTPStatus._value2member_map_ else ""
        )
        return error_response(APIError(str(exc.detail or phrase), status=exc.status_code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error while serving a request")
        return error_response(APIError(f"internal error: {type(exc).__name__}: {exc}", status=500))
