"""The FastAPI application: ``uvicorn --factory api.app:create_app``.

Kept light on purpose: nothing here imports torch or Celery, and creating the app
touches neither the database nor the broker, so the API process starts in well
under a second (tests/test_api_import.py holds it to that).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from api.edge import EdgeChecks
from api.errors import install_error_handlers
from api.observability import install_observability
from api.reads import close_reads
from api.routes import compare, dashboard, health, jobs, logs, scheduling, uploads
from service.logging import configure_logging
from service.settings import Settings, get_settings

API_VERSION = "1"

log = logging.getLogger(__name__)


def operation_id(route: APIRoute) -> str:
    """Stable OpenAPI operation ids: the route function's name (``submit_job``), so
    generated clients keep their method names across releases."""
    return route.name


def _warm_up(settings: Settings) -> None:
    """Once the server is up, in the background: import and configure Celery (a good
    part of a second, better not in the first submit's request), then freeze what the
    process holds so far out of the garbage collector's reach.

    The app's long-lived objects (modules, SQLAlchemy and pydantic models, Celery) are
    about a hundred thousand; every full collection walked all of them with the event
    loop stopped, which showed as the p99 latency under load
    (benchmarks/README.md, "Service"). Frozen, they are never scanned; what requests
    allocate is collected as usual.
    """
    try:
        from service.queue import celery_app

        celery_app(settings)
    finally:
        gc.collect()
        gc.freeze()
        log.info(
            "api warmed up: %d objects frozen out of the garbage collector", gc.get_freeze_count()
        )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    threading.Thread(
        target=_warm_up, args=(app.state.settings,), name="warm-up", daemon=True
    ).start()
    yield
    await close_reads(app.state)


def create_app(settings: Settings | None = None) -> FastAPI:
    configure_logging("api")
    app = FastAPI(
        title="LDReg service",
        version=API_VERSION,
        description="Submit SSL pretraining and LID diagnosis jobs; follow their metrics.",
        generate_unique_id_function=operation_id,
        lifespan=_lifespan,
    )
    app.state.settings = settings or get_settings()
    install_error_handlers(app)
    app.add_middleware(EdgeChecks)  # inside the metrics middleware: its answers count too
    install_observability(app)
    jobs.add_poll_route(app, "/v1")  # the hot route, ahead of the routers (see there)
    app.include_router(health.router)
    # Included flat with the version prefix: a nested /v1 router makes FastAPI rebuild
    # every route once more at start-up.
    for router in (jobs.router, logs.router, uploads.router, compare.router, scheduling.router):
        app.include_router(router, prefix="/v1")
    dashboard.install_dashboard(app)
    return app
