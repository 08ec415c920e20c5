"""Teams and their API keys.

A key is ``ldr_`` + 256 random bits (``secrets.token_urlsafe(32)``); only its SHA-256
is stored. A fast hash is enough because the key is random, not a password: there is
nothing to guess. Lookup is by hash through a unique index, so the plaintext never
needs comparing; the first characters (``prefix``) are kept to name a key in the
admin CLI without revealing it. The API checks keys on its event loop, with the same
hash (api/reads.py).
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import Conflict, InvalidInput, NotFound
from service.models import ApiKey, Team, utcnow

KEY_PREFIX = "ldr_"
# "ldr_" + 8 random characters: 48 bits, enough to tell a team's keys apart.
PREFIX_LENGTH = len(KEY_PREFIX) + 8


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(*, session: Session, team: Team) -> str:
    """Add a new key to ``team``; returns the plaintext, which is never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(team_id=team.id, prefix=key[:PREFIX_LENGTH], key_hash=hash_key(key)))
    session.commit()
    return key


def create_team(*, session: Session, name: str) -> tuple[Team, str]:
    """Create a team with its first key; returns the team and the plaintext key."""
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidInput("team name must be 1 to 200 characters", field="name")
    team = Team(name=name)
    session.add(team)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"a team named {name!r} already exists", field="name") from None
    return team, create_key(session=session, team=team)


def find_team(*, session: Session, name_or_id: str) -> Team | None:
    return session.scalars(
        select(Team).where((Team.name == name_or_id) | (Team.id == name_or_id))
    ).first()


def revoke_key(*, session: Session, key_or_prefix: str) -> ApiKey:
    """Revoke one key, named by its full value or by its printed prefix."""
    if len(key_or_prefix) > PREFIX_LENGTH:
        keys = list(
            session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(key_or_prefix)))
        )
    elif len(key_or_prefix) >= PREFIX_LENGTH:
        keys = list(session.scalars(select(ApiKey).where(ApiKey.prefix == key_or_prefix)))
    else:
        raise InvalidInput(
            f"give the whole key or its first {PREFIX_LENGTH} characters", field="key"
        )
    if not keys:
        raise NotFound("no such API key", field="key")
    if len(keys) > 1:
        raise Conflict("several keys share this prefix; give the whole key", field="key")
    key = keys[0]
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.commit()
    return key
