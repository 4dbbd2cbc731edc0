"""Error answers of the planner API: every user error is a 422 whose ``detail[].loc`` names the field.

FastAPI's own validation errors and the planner's ``PlanInputError`` get the same shape; an echoed input
is made JSON-safe (non-finite numbers as text, long text cut short, documents left out).
"""

from __future__ import annotations

import errno
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from planner.plan import PlanInputError

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown profile"},
    422: {"description": "invalid parameter; detail[].loc names the field"},
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "the server has an API token and the request did not carry it"},
    403: {"description": "the server is read-only"},
    413: {"description": "request body over the server's limit"},
    507: {"description": "no space left to write the profile (nothing was changed)"},
}
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _json_safe(value: object) -> object:
    """An echoed input JSON can carry: non-finite numbers as text, documents left out, text cut short."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "..."
    if isinstance(value, dict | list | tuple | set | bytes):
        return None
    return value


def _error(loc: list, msg: str, type_: str, value: object) -> dict[str, Any]:
    out: dict[str, Any] = {"loc": loc, "msg": msg, "type": type_}
    safe = _json_safe(value)
    if safe is not None:
        out["input"] = safe
    return out


async def _plan_input(_: Request, exc: PlanInputError) -> JSONResponse:
    body = {"detail": [_error(["query", exc.field], exc.reason, "value_error", exc.value)]}
    return JSONResponse(status_code=422, content=jsonable_encoder(body))


async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    detail = [
        _error(list(e.get("loc", ())), e.get("msg", ""), e.get("type", ""), e.get("input"))
        for e in exc.errors()
    ]
    return JSONResponse(status_code=422, content=jsonable_encoder({"detail": detail}))


def add_error_handlers(app: FastAPI) -> None:
    """Answer a rejected plan input and a failed validation with the same 422 shape."""
    app.add_exception_handler(PlanInputError, _plan_input)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
