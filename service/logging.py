"""Structured JSON logs for the api and the worker (structlog).

``configure_logging("api")`` (or ``"worker"``) makes every line one JSON object on
stderr with ``timestamp``, ``level``, ``service``, ``logger`` and ``event``, for
structlog loggers and for the standard library's (uvicorn, celery, sqlalchemy)
alike. Context bound with ``bind_job`` is merged into every line the current
context logs, so all lines of one job attempt carry ``job_id`` and ``attempt``:

    from service.logging import bind_job, get_logger

    bind_job(job_id=job.id, attempt=job.attempt)   # once, right after the claim
    get_logger(__name__).info("epoch_finished", epoch=3)
    # {"job_id": "…", "attempt": 2, "event": "epoch_finished", "epoch": 3, ...}

``LDREG_LOG_LEVEL`` (default INFO) and ``LDREG_LOG_FORMAT`` (``json``, or ``console``
for people reading a terminal) tune it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

JOB_KEYS = ("job_id", "attempt")
# Loggers that install their own handlers; routed to the root handler instead so
# their lines are JSON too.
_OWN_HANDLER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task")


def configure_logging(service: str, *, level: str | int | None = None) -> None:
    """Route structlog and stdlib logging to one JSON-per-line handler on stderr.

    Safe to call more than once (the last call wins), e.g. by Celery's
    ``setup_logging`` signal in every worker process.
    """
    level = level or os.environ.get("LDREG_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.INFO
    fmt = os.environ.get("LDREG_LOG_FORMAT", "json")

    def add_service(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("service", service)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_service,
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # A plain traceback string: dict tracebacks would log frame locals (keys).
            structlog.processors.format_exc_info if fmt != "console" else _keep,
            renderer,
        ],
    )
    # The process's real stderr: Celery replaces sys.stderr with a proxy that logs what
    # is written to it, which would swallow (or loop) our own lines.
    handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
    handler.setFormatter(formatter)
    handler._ldreg_json = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    # Replace our previous handler and plain console ones (logging.basicConfig's), but
    # keep any other (a job's log file, pytest's capture): they format lines their way.
    for old in list(root.handlers):
        if getattr(old, "_ldreg_json", False) or type(old) is logging.StreamHandler:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _OWN_HANDLER_LOGGERS:
        own = logging.getLogger(name)
        own.handlers[:] = []
        own.propagate = True


def _keep(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return event


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)


def bind_job(*, job_id: str, attempt: int, **extra: Any) -> None:
    """Bind ``job_id`` and ``attempt`` (and ``extra``) to every later line of this
    context, replacing the previous job's (a worker process runs many jobs)."""
    structlog.contextvars.unbind_contextvars(*JOB_KEYS, *extra)
    structlog.contextvars.bind_contextvars(job_id=job_id, attempt=attempt, **extra)


def unbind_job() -> None:
    structlog.contextvars.unbind_contextvars(*JOB_KEYS)


@contextmanager
def job_context(*, job_id: str, attempt: int, **extra: Any) -> Iterator[None]:
    """``bind_job`` for the duration of a block, restoring what was bound before."""
    with structlog.contextvars.bound_contextvars(job_id=job_id, attempt=attempt, **extra):
        yield
