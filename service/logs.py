"""Job logs: one file per attempt, ``logs/attempt-N.log`` in the job's folder.

The worker's child process that runs an attempt writes the file line by line (its log
records and everything it writes to stdout and stderr, ``worker.runner``); the API
reads it while it grows (``GET /v1/jobs/{id}/logs``). Each attempt has a file of its
own, so an attempt that lost its job (a zombie the fence keeps out of the database)
can only ever add lines to its own log, never to its successor's. At the end of an
attempt that finishes the job the files are listed with the job's artifacts
(``logs/attempt-N.log``).

Offsets are byte offsets into one attempt's file. A read returns whole lines only (up
to the last newline), so a reader that passes the offset it got back never sees half
a line, and at most ``MAX_CHUNK_BYTES`` at a time; once an attempt is over its last
line is returned even without a newline.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG_FOLDER = "logs"
MAX_CHUNK_BYTES = 1 << 20
# Longest line returned whole; a longer one is returned in pieces of this size.
MAX_LINE_BYTES = 64 * 1024


def attempt_log_name(attempt: int) -> str:
    """The artifact name of an attempt's log."""
    return f"{LOG_FOLDER}/attempt-{attempt}.log"


def attempt_log_path(job_dir: Path, attempt: int) -> Path:
    return job_dir / attempt_log_name(attempt)


@dataclass(frozen=True)
class LogChunk:
    data: bytes
    offset: int  # where the next read starts (pass as ``since``)
    size: int  # the file's size when it was read


def read_chunk(path: Path, since: int, *, complete: bool, limit: int = MAX_CHUNK_BYTES) -> LogChunk:
    """The bytes of ``path`` from ``since`` on: whole lines only unless ``complete``
    (the attempt is over, nothing more will be written), at most ``limit`` bytes. A
    missing file is an empty log (the attempt has not opened it yet)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return LogChunk(b"", since, 0)
    with f:
        size = os.fstat(f.fileno()).st_size
        if since >= size:
            return LogChunk(b"", since, size)
        f.seek(since)
        data = f.read(min(limit, size - since))
    truncated = since + len(data) < size
    if truncated or not complete:
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) >= min(limit, MAX_LINE_BYTES):
            cut = len(data)  # a line longer than a chunk: hand it over in pieces
        data = data[:cut]
    return LogChunk(data, since + len(data), size)


def tail_offset(path: Path, lines: int, since: int = 0, *, complete: bool = True) -> int:
    """The offset of the last ``lines`` lines of ``path`` (not before ``since``): where
    a reader that wants only the end of a long log starts. Unless ``complete``, a last
    line still without its newline does not count (it is not returned yet)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return since
    with f:
        size = os.fstat(f.fileno()).st_size
        newlines = _newlines_before(f, size, since)
        end = size
        if not complete:
            last = next(newlines, None)
            if last is None:
                return since  # not one whole line yet
            end = last + 1
        elif size > since and _ends_with_newline(f, size):
            next(newlines, None)  # it ends the last line; no line starts after it
        if lines <= 0:
            return max(since, end)
        for found, at in enumerate(newlines, start=1):
            if found == lines:
                return at + 1
        return since


def _ends_with_newline(f: Any, end: int) -> bool:
    f.seek(end - 1)
    return f.read(1) == b"\n"


def _newlines_before(f: Any, end: int, since: int) -> Iterator[int]:
    """Offsets of the newlines in ``f[since:end]``, last first."""
    block = 64 * 1024
    pos = end
    while pos > since:
        start = max(since, pos - block)
        f.seek(start)
        data = f.read(pos - start)
        i = len(data)
        while (i := data.rfind(b"\n", 0, i)) >= 0:
            yield start + i
        pos = start
