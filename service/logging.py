"""Structured JSON logs for the api and the worker.

``configure_logging("api")`` (or ``"worker"``) makes every line one JSON object on
stderr with ``timestamp``, ``level``, ``service``, ``logger`` and ``event``, whether it
comes from the standard library's loggers (uvicorn, celery, sqlalchemy, ours) or from a
structlog logger (``get_logger``, key-value events). What ``bind_job`` binds is merged
into every line, so all lines of one job attempt carry ``job_id`` and ``attempt``:

    from service.logging import bind_job, get_logger

    bind_job(job_id=job.id, attempt=attempt)   # once, right after the claim
    get_logger(__name__).info("epoch_finished", epoch=3)
    # {"timestamp": "...", "level": "info", "service": "worker", "logger": "...",
    #  "event": "epoch_finished", "job_id": "…", "attempt": 2, "epoch": 3}

The formatter is plain ``logging`` and structlog is imported only when a structlog
logger is asked for, so configuring logs costs the API's start-up nothing.

``LDREG_LOG_LEVEL`` (default INFO) and ``LDREG_LOG_FORMAT`` (``json``, or ``console``
for people reading a terminal) tune it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

JOB_KEYS = ("job_id", "attempt")
# Loggers that install handlers of their own; routed to ours so their lines are JSON.
_OWN_HANDLER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task")
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    # uvicorn's copy of the message with terminal colour codes: the same text again.
    "color_message",
}

_context: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "ldreg_log_context", default=None
)
# The job bound in this process: a worker child runs one job, and its helper threads
# (the heartbeat) start with an empty context, so they fall back to this.
_process_context: dict[str, Any] = {}
_structlog_configured = False


class JsonFormatter(logging.Formatter):
    """One JSON object per record: the fixed keys, the bound context, ``extra`` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        out: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(_context.get() or _process_context)
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return out

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(self.fields(record), default=str, ensure_ascii=False)


class ConsoleFormatter(JsonFormatter):
    """``time level logger: event key=value ...`` for a person at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = self.fields(record)
        head = f"{fields.pop('timestamp')[11:23]} {fields.pop('level'):<7} {fields.pop('logger')}"
        event = fields.pop("event")
        exception = fields.pop("exception", None)
        fields.pop("service")
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{head}: {event}" + (f" [{tail}]" if tail else "")
        return f"{line}\n{exception}" if exception else line


def configure_logging(service: str, *, level: str | int | None = None) -> None:
    """Route all logging to one JSON-per-line handler on stderr.

    Safe to call more than once (the last call wins). Handlers others added on purpose
    (a job's log file, pytest's capture) are kept; only ours and plain console ones
    (``logging.basicConfig``'s) are replaced. Loggers silenced on purpose (no handlers,
    not propagating, as ``uvicorn --no-access-log`` leaves its access log) stay silent.
    """
    level = level or os.environ.get("LDREG_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.INFO
    formatter_class = (
        ConsoleFormatter if os.environ.get("LDREG_LOG_FORMAT") == "console" else JsonFormatter
    )
    # The process's real stderr: Celery replaces sys.stderr with a proxy that logs what
    # is written to it, which would swallow (or loop) our own lines.
    handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
    handler.setFormatter(formatter_class(service))
    handler._ldreg = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_ldreg", False) or type(old) is logging.StreamHandler:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _OWN_HANDLER_LOGGERS:
        own = logging.getLogger(name)
        if not own.handlers and not own.propagate:
            # Silenced on purpose: ``uvicorn --no-access-log`` leaves "uvicorn.access"
            # so, and uvicorn logs access lines only while the logger has a handler
            # somewhere up its chain. Routing it to ours would turn the log back on.
            continue
        own.handlers[:] = []
        own.propagate = True


def get_logger(name: str | None = None) -> Any:
    """A structlog logger whose key-value events become fields of the JSON line."""
    global _structlog_configured
    import structlog

    if not _structlog_configured:
        structlog.configure(
            processors=[
                structlog.stdlib.filter_by_level,
                structlog.stdlib.PositionalArgumentsFormatter(),
                # The event's keys travel as the record's ``extra``; JsonFormatter
                # renders them with the bound context, like any stdlib record.
                structlog.stdlib.render_to_log_kwargs,
            ],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=True,
        )
        _structlog_configured = True
    return structlog.stdlib.get_logger(name)


def bind_job(*, job_id: str, attempt: int, **extra: Any) -> None:
    """Bind ``job_id`` and ``attempt`` (and ``extra``) to every later line of this
    process, replacing the previous job's (a worker process may run several)."""
    bound = {"job_id": job_id, "attempt": attempt, **extra}
    _process_context.clear()
    _process_context.update(bound)
    _context.set(bound)


def unbind_job() -> None:
    _process_context.clear()
    _context.set(None)


@contextmanager
def job_context(*, job_id: str, attempt: int, **extra: Any) -> Iterator[None]:
    """Bind a job to the lines logged in this context for the duration of a block
    (e.g. one request handling a job), restoring what was bound before."""
    token = _context.set({**(_context.get() or {}), "job_id": job_id, "attempt": attempt, **extra})
    try:
        yield
    finally:
        _context.reset(token)
