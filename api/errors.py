"""One error shape for every failure: ``{"error": {"code", "message", "field"?}}``.

- Data-layer errors (service/errors.py) map to 404 / 409 / 413 / 422 / 429.
- Request validation errors become 422 naming the first bad field as a dotted path
  (``spec.ldreg.k``), with every problem listed under ``error.details``.
- An unreachable database is 503 with ``Retry-After``, never a 500: a client should
  wait and retry, and nothing about the failure leaks beyond "database unavailable".
- Anything unexpected is a 500 with a generic message; the traceback goes to the log.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from api.reads import DatabaseUnavailable
from ldreg.spec import error_message
from service.errors import (
    Conflict,
    InvalidInput,
    LimitExceeded,
    NotFound,
    PayloadTooLarge,
    ServiceError,
)

log = logging.getLogger("api")

STATUS_FOR = {
    InvalidInput: 422,
    NotFound: 404,
    Conflict: 409,
    LimitExceeded: 429,
    PayloadTooLarge: 413,
}

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "limit_exceeded",
    503: "unavailable",
}


def error_body(
    code: str, message: str, field: str | None = None, details: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    if details:
        error["details"] = details
    return {"error": error}


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    *,
    details: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(code, message, field, details), status_code=status, headers=headers
    )


class ApiError(StarletteHTTPException):
    """An HTTP error raised by the API layer itself (auth, headers)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code, message, headers)
        self.code = code or HTTP_CODES.get(status_code, "error")
        self.field = field


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        where = parts.pop(0)
        # A discriminated union puts the tag ("pretrain") in the path; it is noise.
        if where == "body" and parts and parts[0] in ("pretrain", "diagnose", "sweep"):
            parts.pop(0)
    return ".".join(str(p) for p in parts)


# A cross-field check (a model validator) reports at the model's path; its message
# starts with the field it blames ("ldreg.k (64) must be smaller than ..."), so point
# the error at that field.
_BLAMED_FIELD = re.compile(r"^([a-z_]+(?:\.[a-z_]+)*) \(")


def validation_details(exc: RequestValidationError) -> list[dict[str, str]]:
    details = []
    for err in exc.errors():
        field = _field_path(tuple(err.get("loc", ())))
        if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
            field = "kind"
        message = error_message(err)
        if err.get("type") == "json_invalid":
            # The location is a character offset, not a field.
            field, message = "", f"request body is not valid JSON ({message})"
        blamed = _BLAMED_FIELD.match(message) if err.get("type") == "value_error" else None
        if blamed:
            field = f"{field}.{blamed.group(1)}" if field else blamed.group(1)
        details.append({"field": field, "message": message})
    return details


# A limit (the team's queued jobs) frees up as jobs finish; how long to wait is a guess,
# but a client told nothing retries at once.
LIMIT_RETRY_AFTER_SECONDS = 30


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    status = next((s for cls, s in STATUS_FOR.items() if isinstance(exc, cls)), 400)
    headers = {"Retry-After": str(LIMIT_RETRY_AFTER_SECONDS)} if status == 429 else None
    return error_response(
        status, exc.code, exc.message, exc.field, details=exc.details, headers=headers
    )


async def _client_disconnected(request: Request, exc: ClientDisconnect) -> Response:
    # Not an error of ours: the client went away mid-request (an upload cancelled with
    # Ctrl-C). Whatever it had sent is already cleaned up; nobody reads this answer.
    log.info("client disconnected during %s %s", request.method, request.url.path)
    return Response(status_code=400)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = validation_details(exc)
    first = details[0] if details else {"field": "", "message": "invalid request"}
    message = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    return error_response(422, "invalid_input", message, first["field"] or None, details=details)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and not isinstance(exc, ApiError):
        # FastAPI's own 400, for a JSON body that is not even text (not UTF-8): the
        # same documented 422 as any other malformed JSON.
        message = "request body is not valid JSON (not UTF-8 text)"
        return error_response(
            422, "invalid_input", message, details=[{"field": "", "message": message}]
        )
    code = getattr(exc, "code", None) or HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 405:
        from api.edge import allowed_methods  # api.edge imports this module

        headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request.scope))}
    return error_response(
        exc.status_code,
        code,
        message,
        getattr(exc, "field", None),
        headers=headers,
    )


def _database_unavailable() -> JSONResponse:
    return error_response(
        503,
        "database_unavailable",
        "the database is unavailable; retry in a few seconds",
        headers={"Retry-After": "5"},
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    # Connection-level failures (refused, reset, timed out, pool exhausted) mean "down";
    # other DBAPI errors (a bad query, a constraint) are our bug: a logged 500.
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return _database_unavailable()
    return await _unexpected_error(request, exc)


def _is_psycopg_connection_error(exc: Exception) -> bool:
    # psycopg's own errors can surface unwrapped (e.g. raised outside a statement).
    # Looked up lazily: importing psycopg just for this would slow the API's start.
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(
        exc, psycopg.OperationalError | psycopg.InterfaceError
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    if _is_psycopg_connection_error(exc):
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return _database_unavailable()
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


async def _reads_unavailable(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    return _database_unavailable()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DatabaseUnavailable, _reads_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _client_disconnected)  # type: ignore[arg-type]
    app.add_exception_handler(ServiceError, _service_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeoutError, _database_error)
    app.add_exception_handler(Exception, _unexpected_error)
