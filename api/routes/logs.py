"""GET /v1/jobs/{id}/logs: an attempt's log, read from an offset or followed live.

The worker writes one file per attempt (``service.logs``); this route reads it from the
job's folder while it grows. A plain read returns the text after ``since`` (whole lines
only while the attempt runs) and says in its headers where the next read starts.
``follow=true`` keeps the response open and streams new lines as they are written,
until the job reaches a final state (or, for an explicit ``attempt``, until that
attempt is over).

A follower holds no database connection and no worker thread between reads: it polls
the file every ``FOLLOW_POLL_SECONDS`` and the job's state every
``FOLLOW_STATE_SECONDS`` through the poll's own read on the event loop (``api.reads``),
which also ends the stream as soon as the key is revoked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTeam, SessionDep, SettingsDep, bearer_token, get_reads
from api.schemas import JOB_ROUTE_ERRORS
from service import jobs
from service.errors import NotFound
from service.execution import RUNNING_STATES  # still writing their attempt's log
from service.logs import LogChunk, attempt_log_path, read_chunk, tail_offset
from service.models import Team

router = APIRouter(
    prefix="/jobs",
    tags=["jobs"],
    responses=JOB_ROUTE_ERRORS,
)

FOLLOW_POLL_SECONDS = 0.25
FOLLOW_STATE_SECONDS = 1.0

FINAL = frozenset({"succeeded", "failed", "cancelled"})
TEXT = "text/plain; charset=utf-8"

LOG_HEADERS: dict[str, Any] = {
    "X-Log-Attempt": {
        "description": "the attempt whose log this is; 0 while no attempt has started",
        "schema": {"type": "integer"},
    },
    "X-Log-Offset": {
        "description": "byte offset after the returned text: pass it as since= to go on"
        " (absent when following)",
        "schema": {"type": "integer"},
    },
    "X-Log-Size": {
        "description": "the log's size in bytes when it was read (absent when following)",
        "schema": {"type": "integer"},
    },
    "X-Log-Complete": {
        "description": "true once this attempt's log will not grow any more (the job has"
        " finished or gone back to the queue, or a later attempt began)",
        "schema": {"type": "boolean"},
    },
}


def _job_state(session: Any, team: Team, job_id: str) -> tuple[str, str, int]:
    """(id, state, attempt) of the team's job (a full id or a unique prefix)."""
    try:
        job = jobs.require_job(session=session, team=team, job_id=job_id)
        return job.id, job.state, job.attempt
    finally:
        session.close()  # a follower keeps no connection


def _complete(state: str, latest: int, attempt: int) -> bool:
    """Whether ``attempt``'s log is finished: nobody is writing it any more."""
    return attempt < latest or (attempt > 0 and state not in RUNNING_STATES)


@router.get(
    "/{job_id}/logs",
    response_class=Response,
    responses={
        200: {
            "description": "the log's text (UTF-8): everything after `since`, or the"
            " live stream with `follow=true`",
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "headers": LOG_HEADERS,
        }
    },
)
async def get_job_logs(
    request: Request,
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    team: CurrentTeam,
    attempt: Annotated[
        int | None,
        Query(ge=1, le=2**31 - 1, description="which attempt's log; default: the latest"),
    ] = None,
    since: Annotated[
        int,
        Query(ge=0, le=2**53, description="byte offset to start at (X-Log-Offset of a read)"),
    ] = 0,
    tail: Annotated[
        int | None,
        Query(ge=0, le=100_000, description="only the last this many lines (after `since`)"),
    ] = None,
    follow: Annotated[
        bool,
        Query(description="keep streaming new lines until the job has finished"),
    ] = False,
) -> Response:
    """An attempt's log (the worker's log lines for the job and its stdout and
    stderr): the text after byte offset ``since``, whole lines only while the attempt
    runs, at most 1 MiB at a time (``X-Log-Offset`` < ``X-Log-Size``: read on); with
    ``follow=true`` a ``text/plain`` stream of new lines until the job has finished."""
    full_id, state, latest = await run_in_threadpool(_job_state, session, team, job_id)
    if attempt is not None and attempt > latest:
        raise NotFound(
            f"job {full_id} has no attempt {attempt} (it has had {latest})", field="attempt"
        )
    shown = attempt or latest
    job_dir = settings.job_dir(full_id)

    def path_of(n: int) -> Path | None:
        return attempt_log_path(job_dir, n) if n > 0 else None

    complete = _complete(state, latest, shown)
    start = since
    if tail is not None and shown > 0:
        path = attempt_log_path(job_dir, shown)
        start = await run_in_threadpool(lambda: tail_offset(path, tail, since, complete=complete))
    headers = {
        "X-Log-Attempt": str(shown),
        "X-Log-Complete": "true" if complete else "false",
        "Cache-Control": "no-store",
    }
    if follow:
        headers["X-Accel-Buffering"] = "no"  # a proxy in front must not buffer the stream
        stream = _follow(request, full_id, path_of, shown, start, explicit=attempt is not None)
        return StreamingResponse(stream, media_type=TEXT, headers=headers)
    chunk = await _read(path_of(shown), start, complete)
    headers.update({"X-Log-Offset": str(chunk.offset), "X-Log-Size": str(chunk.size)})
    return Response(chunk.data, media_type=TEXT, headers=headers)


async def _read(path: Path | None, offset: int, complete: bool) -> LogChunk:
    if path is None:
        return LogChunk(b"", offset, 0)
    return await run_in_threadpool(read_chunk, path, offset, complete=complete)


async def _follow(
    request: Request,
    job_id: str,
    path_of: Any,
    attempt: int,
    offset: int,
    *,
    explicit: bool,
) -> AsyncIterator[bytes]:
    """New lines of ``attempt``'s log as they come; following the latest attempt (not
    ``explicit``), on to the next one when the job is re-queued and claimed again."""
    reads = await get_reads(request)
    token = bearer_token(request)
    checked = 0.0
    state, latest = "", attempt
    # Whether the stream so far ends a line: a log whose last line never got its newline
    # gets one, so the next attempt's marker (or a client reading lines) starts afresh.
    line_ended = True
    while True:
        if await request.is_disconnected():
            return
        final = False
        if time.monotonic() - checked >= FOLLOW_STATE_SECONDS:
            # The state first, then the file: the runner writes an attempt's last line
            # before its outcome, so a finished job's log is read to its end below.
            found = await reads.job_for_key(token, job_id)
            if found.job is None:
                return  # the key was revoked (or the job removed)
            state, latest = found.job.state, found.job.attempt
            checked = time.monotonic()
            final = state in FINAL
        complete = _complete(state, latest, attempt)
        while True:
            chunk = await _read(path_of(attempt), offset, complete)
            if not chunk.data:
                break
            offset = chunk.offset
            line_ended = chunk.data.endswith(b"\n")
            yield chunk.data
        if complete and not line_ended:
            line_ended = True
            yield b"\n"
        if not explicit and latest > attempt:
            if attempt > 0:
                yield f"==> attempt {latest} <==\n".encode()
            attempt, offset, checked = latest, 0, 0.0
            continue
        if final or (explicit and complete):
            return
        await asyncio.sleep(FOLLOW_POLL_SECONDS)
