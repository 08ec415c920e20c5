"""Typed dependencies: a route's signature says everything it needs.

def get_job(job_id: str, session: SessionDep, team: CurrentTeam) -> JobOut: ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import ApiError
from service import auth
from service.db import session_factory
from service.models import Team
from service.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    session = session_factory(settings.database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]

# auto_error=False: a missing key is answered in our error shape, not FastAPI's 403.
bearer_scheme = HTTPBearer(auto_error=False, description="a team API key (ldr_...)")


def current_team(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Team:
    if credentials is None:
        raise ApiError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="ldreg"'},
        )
    team = auth.authenticate(session=session, token=credentials.credentials)
    if team is None:
        raise ApiError(
            401,
            "invalid or revoked API key",
            headers={"WWW-Authenticate": 'Bearer realm="ldreg", error="invalid_token"'},
        )
    return team


CurrentTeam = Annotated[Team, Depends(current_team)]
