"""Checks at the edge, before routing: text the database cannot store, and ``Allow``.

- A NUL character in the path (``/v1/jobs/ab%00c``) answers 404: no id holds one. In a
  query parameter it answers 422 naming the parameter. Either way the request never
  reaches a query, where PostgreSQL would refuse it with an error, and never joins a
  coalesced batch (api/reads.py) whose other members it could fail.
- ``OPTIONS`` on a path answers 204 with every method that path serves
  (:func:`allowed_methods`; a 405 names them too, in api/errors.py). Starlette names
  only the methods of the first route that matched the path, and ``/v1/jobs`` has two
  routes (GET lists, POST submits).
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_body

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(scope: Scope) -> list[str]:
    """Every method some route of the app serves at this path.

    Asked method by method of the app's routes (FastAPI nests included routers, so the
    routes are not a flat list to read ``methods`` from)."""
    routes = scope["app"].router.routes
    methods = [
        method
        for method in _METHODS
        if any(route.matches({**scope, "method": method})[0] is Match.FULL for route in routes)
    ]
    return [*methods, "OPTIONS"] if methods else []


def _nul_query_parameter(query_string: bytes) -> str | None:
    if b"%00" not in query_string and b"\x00" not in query_string:
        return None
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            return name.replace("\x00", "\\0")
    return None


class EdgeChecks:
    """Pure ASGI middleware (no request object built for the common case)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response: Response | None = None
        if "\x00" in scope["path"]:
            response = JSONResponse(
                error_body("not_found", "no such resource: the path holds a NUL character"),
                status_code=404,
            )
        elif (name := _nul_query_parameter(scope.get("query_string", b""))) is not None:
            response = JSONResponse(
                error_body("invalid_input", f"{name}: must not contain NUL characters", field=name),
                status_code=422,
            )
        elif scope["method"] == "OPTIONS":
            methods = allowed_methods(scope)
            if methods:
                response = Response(status_code=204, headers={"Allow": ", ".join(methods)})
        if response is not None:
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
