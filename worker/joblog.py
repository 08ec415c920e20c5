"""An attempt's log file: ``logs/attempt-N.log`` in the job's folder (``service.logs``).

While an attempt runs, its process writes there, line by line, so that
``GET /v1/jobs/{id}/logs`` (and ``ldreg logs -f``) sees each line within a second:

* every log record at INFO and above (the runner's, the sink's epoch and step lines,
  the heartbeat's), formatted ``time LEVEL logger: message``; a ``FileHandler``
  flushes after each record;
* everything the process writes to its stdout and stderr (file descriptors 1 and 2:
  ``print``, warnings, C libraries), copied there by a thread that reads them from
  pipes. What it reads still reaches the original stdout and stderr as before.

The worker's JSON log lines (``service.logging``) go to the real stderr as before, not
through the pipe: they would repeat the file's formatted records.

Nothing here is shared between attempts: each opens its own file, so a zombie attempt
can only ever write to its own log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from service.logs import attempt_log_path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A line still without its newline after this long is written as it is (a progress
# bar redrawn with carriage returns would otherwise never show).
PARTIAL_LINE_SECONDS = 1.0
# After the attempt, how long the copying thread may keep draining (a grandchild
# process that still holds the pipe's write end must not hold up the job's end).
DRAIN_SECONDS = 2.0


class AttemptLog:
    """The open log of one attempt (see :func:`attempt_log`)."""

    def __init__(self, path: Path, handler: logging.FileHandler) -> None:
        self.path = path
        self.handler = handler

    def write_record(
        self,
        level: int,
        message: str,
        *,
        name: str = "worker.runner",
        exc: BaseException | None = None,
    ) -> None:
        """One record in this file only (not in the worker's JSON log, which the runner
        writes itself): how the attempt ended."""
        record = logging.LogRecord(
            name,
            level,
            __file__,
            0,
            message,
            None,
            (type(exc), exc, exc.__traceback__) if exc is not None else None,
        )
        self.handler.handle(record)


@contextlib.contextmanager
def attempt_log(
    run_dir: Path, attempt: int, *, capture_output: bool = True
) -> Iterator[AttemptLog]:
    """Write this attempt's log lines (and, with ``capture_output``, its stdout and
    stderr) to ``run_dir/logs/attempt-N.log`` while the block runs."""
    path = attempt_log_path(run_dir, attempt)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    tee = OutputTee(path) if capture_output else None
    try:
        if tee is not None:
            tee.start()
        yield AttemptLog(path, handler)
    finally:
        if tee is not None:
            tee.stop()
        root.removeHandler(handler)
        handler.close()


class OutputTee:
    """File descriptors 1 and 2 into pipes; a thread copies what comes out of them to
    the original descriptors and, whole lines at a time, to the end of ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved: dict[int, int] = {}  # fd -> a duplicate of the original
        self._pipes: dict[int, int] = {}  # read end -> the fd it stands in for
        self._swapped: list[tuple[logging.StreamHandler, object, object]] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._out = -1

    def start(self) -> None:
        _flush_python_streams()
        # O_APPEND: each write lands at the end, after the FileHandler's records, even
        # though the two write through different descriptors.
        self._out = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        for fd in (1, 2):
            self._saved[fd] = os.dup(fd)
        for fd in (1, 2):
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            os.dup2(write_end, fd)
            os.close(write_end)
            self._pipes[read_end] = fd
        self._redirect_console_handlers()
        self._thread = threading.Thread(target=self._copy, name="attempt-log-output", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        _flush_python_streams()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # closes the pipes' write ends held at 1 and 2
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=DRAIN_SECONDS + 1)
        for handler, old, replacement in self._swapped:
            handler.setStream(old)
            with contextlib.suppress(Exception):
                replacement.close()  # type: ignore[attr-defined]
        self._swapped.clear()
        for fd in [*self._pipes, *self._saved.values(), self._out]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pipes.clear()
        self._saved.clear()

    def _redirect_console_handlers(self) -> None:
        """Log handlers that write to fd 1 or 2 (the JSON lines on stderr) keep
        writing to the real descriptors, not into the pipe."""
        loggers = [logging.getLogger()] + [
            lg
            for lg in logging.Logger.manager.loggerDict.values()
            if isinstance(lg, logging.Logger)
        ]
        seen: set[int] = set()
        for lg in loggers:
            for handler in lg.handlers:
                if id(handler) in seen or type(handler) is logging.FileHandler:
                    continue
                seen.add(id(handler))
                if not isinstance(handler, logging.StreamHandler):
                    continue
                try:
                    fd = handler.stream.fileno()
                except (AttributeError, OSError, ValueError):
                    continue
                if fd not in self._saved:
                    continue
                replacement = open(  # noqa: SIM115 (closed in stop())
                    self._saved[fd],
                    "w",
                    buffering=1,
                    encoding=getattr(handler.stream, "encoding", None) or "utf-8",
                    errors="backslashreplace",
                    closefd=False,
                )
                old = handler.setStream(replacement)
                self._swapped.append((handler, old, replacement))

    def _copy(self) -> None:
        pending = {r: b"" for r in self._pipes}
        waiting_since: dict[int, float] = {}
        open_ends = set(self._pipes)
        stop_deadline: float | None = None
        while open_ends:
            try:
                readable, _, _ = select.select(list(open_ends), [], [], 0.2)
            except (OSError, ValueError):
                break
            for r in readable:
                try:
                    data = os.read(r, 1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # every write end is closed
                    open_ends.discard(r)
                    continue
                self._forward(self._pipes[r], data)
                head, newline, rest = (pending[r] + data).rpartition(b"\n")
                if newline:
                    self._write(head + newline)
                pending[r] = rest
                if rest:
                    waiting_since.setdefault(r, time.monotonic())
                else:
                    waiting_since.pop(r, None)
            now = time.monotonic()
            for r, since in list(waiting_since.items()):
                if now - since >= PARTIAL_LINE_SECONDS:
                    self._write(pending[r] + b"\n")
                    pending[r] = b""
                    del waiting_since[r]
            if self._stopping.is_set():
                stop_deadline = stop_deadline or now + DRAIN_SECONDS
                if not readable or now > stop_deadline:
                    break
        for rest in pending.values():
            if rest:
                self._write(rest + b"\n")

    def _forward(self, fd: int, data: bytes) -> None:
        with contextlib.suppress(OSError):
            view = memoryview(data)
            while view:
                view = view[os.write(self._saved[fd], view) :]

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(self._out, data)


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
