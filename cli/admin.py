"""``ldreg admin``: migrations, teams and API keys, straight against the database.

Plain-text output; where a command creates a key, the key is the **last line**, so
scripts can take it with ``tail -n 1``. Service modules are imported inside the
commands, keeping ``ldreg --help`` fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from cli.common import fail


@contextmanager
def _session() -> Iterator:
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from service.db import session_scope
    from service.errors import ServiceError
    from service.settings import get_settings

    try:
        with session_scope(get_settings().database_url) as session:
            yield session
    except ServiceError as exc:
        fail(exc.message)
    except (OperationalError, ProgrammingError) as exc:
        fail(
            f"database not reachable or not migrated ({type(exc.orig).__name__});"
            " check LDREG_DATABASE_URL and run `ldreg admin migrate`"
        )


def migrate() -> None:
    """Apply the database migrations (Alembic) up to the latest schema."""
    from service.db import migrate as apply_migrations
    from service.db import wait_for_database
    from service.settings import get_settings

    url = get_settings().database_url
    wait_for_database(url)
    apply_migrations(url)
    typer.echo("database schema is up to date")


def create_team(name: str = typer.Argument(..., help="the team's unique name")) -> None:
    """Create a team; its first API key is the last line printed."""
    from service import auth

    with _session() as session:
        team, key = auth.create_team(session=session, name=name)
        typer.echo(f"created team {team.name!r} (id {team.id})")
        typer.echo(
            f"API key (shown once, stored only as a hash; prefix {key[: auth.PREFIX_LENGTH]}):"
        )
        typer.echo(key)


def create_key(team: str = typer.Argument(..., help="team name or id")) -> None:
    """Add an API key to a team; the key is the last line printed."""
    from service import auth

    with _session() as session:
        found = auth.find_team(session=session, name_or_id=team)
        if found is None:
            fail(f"no team {team!r}")
        key = auth.create_key(session=session, team=found)
        typer.echo(f"new API key for team {found.name!r} (prefix {key[: auth.PREFIX_LENGTH]}):")
        typer.echo(key)


def revoke_key(
    key_or_prefix: str = typer.Argument(..., help="the key, or its printed prefix (ldr_xxxxxxxx)"),
) -> None:
    """Revoke an API key; requests with it get 401 from then on."""
    from service import auth

    with _session() as session:
        key = auth.revoke_key(session=session, key_or_prefix=key_or_prefix)
        typer.echo(f"revoked key {key.prefix}… (revoked at {key.revoked_at:%Y-%m-%d %H:%M:%S} UTC)")


def team_weight(
    team: str = typer.Argument(..., help="team name or id"),
    weight: float = typer.Argument(..., min=0.01, max=1000.0, help="its share (default 1)"),
) -> None:
    """Set a team's fair-share weight: under contention teams get GPUs in proportion
    to their weights (docs/operations.md, "Scheduling")."""
    from service import auth

    with _session() as session:
        found = auth.find_team(session=session, name_or_id=team)
        if found is None:
            fail(f"no team {team!r}")
        found.weight = weight
        typer.echo(f"team {found.name!r} now has weight {weight:g}")
