"""Typed dependencies: a route's signature says everything it needs.

def list_jobs(session: SessionDep, team: CurrentTeam) -> JobList: ...

The key check runs on the event loop (api/reads.py); only routes that take a
``SessionDep`` use a worker thread and an ORM session, its connection held within the
route's own thread hop (why: docs/architecture.md, "The API's request path").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.reads import Reads, reads_for
from service.db import session_factory
from service.models import Team
from service.settings import Settings


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    session = session_factory(settings.database_url)()
    try:
        yield session
    finally:
        session.close()


# scope="function": closed before the response is sent (docs/architecture.md, "The
# API's request path").
SessionDep = Annotated[Session, Depends(get_db, scope="function")]

# auto_error=False: a missing key is answered in our error shape, not FastAPI's 403.
bearer_scheme = HTTPBearer(auto_error=False, description="a team API key (ldr_...)")


async def get_reads(request: Request) -> Reads:
    state = request.app.state
    return await reads_for(state, state.settings.database_url)


ReadsDep = Annotated[Reads, Depends(get_reads)]

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def api_key(token: str | None) -> str:
    if not token:
        raise ApiError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="ldreg"'},
        )
    return token


def invalid_key() -> ApiError:
    return ApiError(
        401,
        "invalid or revoked API key",
        headers={"WWW-Authenticate": 'Bearer realm="ldreg", error="invalid_token"'},
    )


# RFC 6750, Sec. 2.1: credentials = "Bearer" 1*SP b64token, the scheme case-insensitive
# (RFC 9110, Sec. 11.1); b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" )
# *"=".
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)")


def parse_bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None. The one parser
    of every route, so no route accepts a header another refuses."""
    if not authorization:
        return None
    match = _BEARER.fullmatch(authorization.strip(" \t"))
    return match.group(1) if match else None


def bearer_token(request: Request) -> str:
    """The request's bearer token (401 without one)."""
    return api_key(parse_bearer(request.headers.get("authorization")))


async def current_team(request: Request, reads: ReadsDep, _scheme: Credentials) -> Team:
    # ``_scheme`` declares the Bearer scheme in OpenAPI; the header is parsed here, by
    # the same function as the poll route's.
    team = await reads.team_for_key(bearer_token(request))
    if team is None:
        raise invalid_key()
    return team


CurrentTeam = Annotated[Team, Depends(current_team)]
