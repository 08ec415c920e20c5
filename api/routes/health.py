"""Liveness and readiness, unauthenticated (for load balancers and orchestrators)."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SettingsDep
from api.schemas import Health, Readiness
from service.db import engine_for
from service.settings import Settings

router = APIRouter(tags=["health"])

# A dependency that does not answer within this is as good as down for readiness.
CHECK_TIMEOUT_S = 3.0


@router.get("/healthz")
async def healthz() -> Health:
    """The process is up (no dependencies checked). On the event loop, so a liveness
    probe is answered even while every worker thread is busy."""
    return Health(status="ok")


def check_database(settings: Settings) -> None:
    with engine_for(settings.database_url).connect() as conn:
        conn.execute(text("SELECT 1"))


def check_broker(settings: Settings) -> None:
    url = settings.broker_url
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(
            url, socket_connect_timeout=CHECK_TIMEOUT_S, socket_timeout=CHECK_TIMEOUT_S
        )
        try:
            client.ping()
        finally:
            client.close()
    elif url.startswith("filesystem://"):
        # The embedded broker is a folder shared with the worker on this machine.
        folder = Path(settings.broker_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise OSError(f"broker folder {folder} is not a directory")
    elif not url.startswith("memory://"):
        from kombu import Connection

        with Connection(url, connect_timeout=CHECK_TIMEOUT_S) as conn:
            conn.ensure_connection(max_retries=1)


async def _run_check(check, settings: Settings) -> str:
    try:
        with anyio.fail_after(CHECK_TIMEOUT_S + 1):
            # Abandoned on timeout: a hung connect must not hold the probe.
            await anyio.to_thread.run_sync(check, settings, abandon_on_cancel=True)
    except TimeoutError:
        return "timed out"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok"


@router.get(
    "/readyz",
    responses={503: {"model": Readiness, "description": "a dependency is not reachable"}},
)
async def readyz(settings: SettingsDep) -> Readiness:
    """Ready to serve: the database answers ``SELECT 1`` and the broker is reachable."""
    checks = {
        "database": await _run_check(check_database, settings),
        "broker": await _run_check(check_broker, settings),
    }
    ready = all(v == "ok" for v in checks.values())
    body = Readiness(status="ready" if ready else "unavailable", checks=checks)
    if not ready:
        return JSONResponse(body.model_dump(), status_code=503)  # type: ignore[return-value]
    return body
