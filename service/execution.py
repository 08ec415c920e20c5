"""The worker side of the data layer: claim, heartbeat, fenced writes, finish, sweep.

Every function is keyword-only and does its work in the caller's transaction; call
each in a fresh one (``with session_scope(url) as s: ...``). The database is the
truth about a job, and these functions are what keeps it true when processes die:

* ``claim_job`` is one conditional UPDATE (queued → running, attempt + 1). Two
  deliveries of the same message race on it and exactly one wins.
* Every later write is *fenced* by that attempt: it first runs an UPDATE whose WHERE
  says "this attempt still owns the job" and gives up if no row matched. A zombie
  worker (its job re-queued after its heartbeat went stale) therefore cannot write a
  metric, an artifact or a final state.
* That fencing UPDATE is also the first statement of the transaction, so it takes the
  row lock (PostgreSQL) or the write lock (SQLite) before anything is read: the later
  read-modify-write through ``Job.transition`` cannot race, and SQLite never has to
  upgrade a read snapshot to a write (which fails with SQLITE_BUSY_SNAPSHOT).
* ``sweep`` finds jobs whose worker stopped heartbeating and queues them again
  (resuming from their last checkpoint) or fails them after ``max_attempts``; and it
  re-publishes queued jobs whose broker message may have been lost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, and_, delete, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from service import sweep_jobs
from service.models import (
    SWEEP_KIND,
    Artifact,
    Job,
    JobEvent,
    JobState,
    Metric,
    UTCDateTime,
    new_id,
    utcnow,
)

RUNNING_STATES = (JobState.RUNNING.value, JobState.CANCELLING.value)
# ``enqueued_at`` value meaning "publish at the next sweep": a job handed back by a
# worker that is shutting down must not be published while that worker still consumes.
PUBLISH_ASAP = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class HeartbeatResult:
    alive: bool  # False: this attempt no longer owns the job; stop at once, write nothing
    cancel_requested: bool = False
    # The scheduler wants these GPUs for a higher-priority job (service/claiming.py):
    # stop and hand the job back to the queue, without counting the attempt.
    preempt_requested: bool = False


@dataclass(frozen=True)
class StepProgress:
    """A training run's step-level progress, as the heartbeat carries it to the job's
    row: global steps done and in the whole run, the recent throughput, and the
    estimated seconds left (None until measured)."""

    step: int
    steps: int
    images_per_second: float | None = None
    eta_seconds: float | None = None


@dataclass(frozen=True)
class MetricRow:
    name: str
    epoch: int
    step: int
    value: float


@dataclass(frozen=True)
class ArtifactFile:
    name: str  # relative to the job's directory, e.g. "checkpoints/epoch_0003.pt"
    path: str
    size: int
    sha256: str | None = None
    media_type: str = "application/octet-stream"


@dataclass
class SweepResult:
    requeued: list[tuple[str, str]] = field(default_factory=list)  # (job id, queue): publish
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    republish: list[tuple[str, str]] = field(default_factory=list)  # queued, message lost?

    @property
    def to_publish(self) -> list[tuple[str, str]]:
        return self.requeued + self.republish


def _lock(session: Session, where: ColumnElement[bool], **values: Any) -> list[Job]:
    """Lock the jobs matching ``where`` with an UPDATE and return them, fresh.

    The UPDATE re-evaluates ``where`` on rows changed concurrently (PostgreSQL) and
    holds the lock until commit, so what we return is exactly what we own.
    """
    values = values or {"state": Job.state}  # a no-op SET that still takes the lock
    ids = (
        session.execute(
            update(Job)
            .where(where)
            .values(**values)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
        .scalars()
        .all()
    )
    if not ids:
        return []
    return list(
        session.scalars(
            select(Job)
            .where(Job.id.in_(ids))
            .order_by(Job.id)
            .execution_options(populate_existing=True)
        )
    )


def _fence(job_id: str, attempt: int) -> ColumnElement[bool]:
    return and_(Job.id == job_id, Job.attempt == attempt, Job.state.in_(RUNNING_STATES))


def claim_job(
    *, session: Session, job_id: str, worker: str, now: datetime | None = None
) -> int | None:
    """Take a queued job: returns the new attempt number, or None if it was not ours
    to take (already running elsewhere, finished, cancelled, or unknown)."""
    now = now or utcnow()
    attempt = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.state == JobState.QUEUED.value,
            ~Job.cancel_requested,
            Job.kind != SWEEP_KIND,  # a sweep runs as its children, never itself
        )
        .values(
            state=JobState.RUNNING.value,
            attempt=Job.attempt + 1,
            worker=worker,
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, literal(now, UTCDateTime())),
            progress_fraction=None,
            # Measured afresh by this attempt (worker/sink.py).
            progress_images_per_second=None,
            progress_eta_seconds=None,
        )
        .returning(Job.attempt)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if attempt is None:
        return None
    # The claim is a single UPDATE (the exclusive step), so its event is written here
    # rather than through Job.transition; same fields, same transaction.
    session.add(
        JobEvent(
            job_id=job_id,
            at=now,
            from_state=JobState.QUEUED.value,
            to_state=JobState.RUNNING.value,
            attempt=attempt,
            reason=f"claimed by worker {worker}",
        )
    )
    session.flush()
    sweep_jobs.follow_parent_of(session, job_id, now=now)  # a sweep's child: the sweep runs
    return attempt


def heartbeat(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    progress_fraction: float | None = None,
    step_progress: StepProgress | None = None,
    now: datetime | None = None,
) -> HeartbeatResult:
    """Prove this attempt is alive; learn whether it still owns the job and whether
    the user asked to cancel. The same UPDATE carries the progress reported since the
    last beat, so progress costs no write of its own."""
    now = now or utcnow()
    values: dict[str, Any] = {"heartbeat_at": now}
    if progress_fraction is not None:
        values["progress_fraction"] = min(max(float(progress_fraction), 0.0), 1.0)
        values["progress_updated_at"] = now
    if step_progress is not None:
        values.update(
            progress_step=int(step_progress.step),
            progress_steps=int(step_progress.steps),
            progress_images_per_second=_finite_or_none(step_progress.images_per_second),
            progress_eta_seconds=_finite_or_none(step_progress.eta_seconds),
            progress_updated_at=now,
        )
    row = session.execute(
        update(Job)
        .where(_fence(job_id, attempt))
        .values(**values)
        .returning(Job.cancel_requested, Job.preempt_requested)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return HeartbeatResult(alive=False)
    return HeartbeatResult(
        alive=True, cancel_requested=bool(row[0]), preempt_requested=bool(row[1])
    )


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(float(value)) or value < 0:
        return None
    return float(value)


def _insert_for(session: Session):
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def record_metrics(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    rows: Sequence[MetricRow],
    progress_epoch: int | None = None,
    progress_epochs: int | None = None,
    now: datetime | None = None,
) -> bool:
    """Write one batch of metric rows (and the epoch progress), fenced.

    Upserts on (job, name, step): an epoch replayed after a resume overwrites its
    earlier value instead of adding a duplicate point. Non-finite values are dropped
    (JSON cannot carry them; a NaN loss fails the job with its own error anyway).
    Returns False if this attempt no longer owns the job (nothing written).
    """
    values: dict[str, Any] = {"heartbeat_at": now or utcnow()}
    if progress_epoch is not None:
        values["progress_epoch"] = progress_epoch
    if progress_epochs is not None:
        values["progress_epochs"] = progress_epochs
    if not _lock(session, _fence(job_id, attempt), **values):
        return False
    # One row per (name, step), the last one wins: PostgreSQL refuses an upsert that
    # touches the same row twice in one statement.
    latest = {
        (r.name, int(r.step)): {
            "job_id": job_id,
            "name": r.name,
            "epoch": int(r.epoch),
            "step": int(r.step),
            "value": float(r.value),
            "attempt": attempt,
        }
        for r in rows
        if math.isfinite(float(r.value))
    }
    payload = list(latest.values())
    if payload:
        insert = _insert_for(session)
        stmt = insert(Metric).values(payload)
        stmt = stmt.on_conflict_do_update(
            index_elements=[Metric.job_id, Metric.name, Metric.step],
            set_={
                "value": stmt.excluded.value,
                "epoch": stmt.excluded.epoch,
                "attempt": stmt.excluded.attempt,
            },
        )
        session.execute(stmt)
    return True


def add_artifact(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    name: str,
    path: str,
    size: int,
    sha256: str | None = None,
    media_type: str = "application/octet-stream",
) -> bool:
    """Register (or update) a file the job produced, fenced. False if not ours."""
    if not _lock(session, _fence(job_id, attempt)):
        return False
    _upsert_artifact(
        session,
        job_id,
        ArtifactFile(name=name, path=path, size=size, sha256=sha256, media_type=media_type),
    )
    return True


def _upsert_artifact(session: Session, job_id: str, f: ArtifactFile) -> None:
    insert = _insert_for(session)
    stmt = insert(Artifact).values(
        id=new_id(),
        job_id=job_id,
        name=f.name,
        path=f.path,
        size=f.size,
        sha256=f.sha256,
        media_type=f.media_type,
        created_at=utcnow(),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[Artifact.job_id, Artifact.name],
        set_={
            "path": stmt.excluded.path,
            "size": stmt.excluded.size,
            "sha256": stmt.excluded.sha256,
            "media_type": stmt.excluded.media_type,
            "created_at": stmt.excluded.created_at,
        },
    )
    session.execute(stmt)


def sync_artifacts(
    *, session: Session, job_id: str, attempt: int, files: Sequence[ArtifactFile]
) -> bool:
    """Make the job's artifact list exactly ``files`` (upserted by name; rows for files
    that are gone, e.g. rotated-out checkpoints, removed), fenced. False if not ours."""
    if not _lock(session, _fence(job_id, attempt)):
        return False
    names = [f.name for f in files]
    session.execute(
        delete(Artifact)
        .where(Artifact.job_id == job_id, Artifact.name.not_in(names))
        .execution_options(synchronize_session=False)
    )
    for f in files:
        _upsert_artifact(session, job_id, f)
    return True


def finish_job(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    state: JobState,
    summary: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
    reason: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Set the final state (succeeded / failed / cancelled), fenced. False if not ours."""
    state = JobState(state)
    if state not in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        raise ValueError(f"{state} is not a final state")
    now = now or utcnow()
    jobs = _lock(session, _fence(job_id, attempt), heartbeat_at=now)
    if not jobs:
        return False
    job = jobs[0]
    if summary is not None:
        job.summary = summary
    if error is not None:
        job.error_code, job.error_message = error
    if state is JobState.SUCCEEDED:
        job.progress_fraction = 1.0
        job.error_code = job.error_message = None
    default_reason = {
        # Cancellation is checked every few steps and at epoch ends, but not after the
        # last epoch: a request that arrives while the final evaluation runs is too late.
        JobState.SUCCEEDED: (
            "finished before the cancellation took effect" if job.cancel_requested else "finished"
        ),
        JobState.FAILED: f"failed: {error[1]}" if error else "failed",
        JobState.CANCELLED: "cancelled by request",
    }[state]
    job.transition(state, reason or default_reason, at=now)
    sweep_jobs.follow_parent(session, job, now=now)
    session.flush()
    return True


def _give_up_message(job: Job, cause: str) -> str:
    return (
        f"{cause}; gave up after {job.attempt} of {job.max_attempts} attempts"
        " (see the job's events for each attempt)"
    )


def _retry_or_fail(
    job: Job, *, now: datetime, cause: str, code: str
) -> tuple[JobState, tuple[str, str] | None]:
    """The one retry policy: cancelled if asked, queued while attempts remain, else failed."""
    if job.cancel_requested:
        job.transition(JobState.CANCELLED, f"cancelled by request ({cause})", at=now)
        return JobState.CANCELLED, None
    if job.attempt < job.max_attempts:
        job.enqueued_at = now
        job.transition(
            JobState.QUEUED,
            f"{cause}; will resume from the last checkpoint"
            f" (attempt {job.attempt + 1} of {job.max_attempts})",
            at=now,
        )
        return JobState.QUEUED, None
    error = (code, _give_up_message(job, cause))
    job.error_code, job.error_message = error
    job.transition(JobState.FAILED, error[1], at=now)
    return JobState.FAILED, error


def requeue_for_retry(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    cause: str,
    code: str = "infrastructure_error",
    now: datetime | None = None,
) -> JobState | None:
    """An infrastructure failure in this attempt (out of memory, a lost device, an
    unexpected error): queue the job again to resume from its checkpoint, or fail it
    when attempts are used up. Returns the new state (the caller publishes the job
    after commit when it is QUEUED), or None if this attempt no longer owns the job."""
    now = now or utcnow()
    jobs = _lock(session, _fence(job_id, attempt))
    if not jobs:
        return None
    state, _ = _retry_or_fail(jobs[0], now=now, cause=cause, code=code)
    sweep_jobs.follow_parent(session, jobs[0], now=now)
    session.flush()
    return state


def return_running_job(
    *, session: Session, job_id: str, attempt: int, reason: str, now: datetime | None = None
) -> JobState | None:
    """Hand a running job back because this worker is shutting down (SIGTERM), not
    because the job failed: the attempt does not count against ``max_attempts``.

    Not published by the caller (this worker may still be consuming): the next sweep
    of any live worker publishes it, and a starting worker sweeps at once. Returns the
    new state (QUEUED, or CANCELLED if that was requested meanwhile), or None if this
    attempt no longer owns the job."""
    now = now or utcnow()
    jobs = _lock(session, _fence(job_id, attempt))
    if not jobs:
        return None
    job = jobs[0]
    if job.cancel_requested:
        job.transition(JobState.CANCELLED, f"cancelled by request ({reason})", at=now)
        sweep_jobs.follow_parent(session, job, now=now)
        return JobState.CANCELLED
    job.max_attempts += 1
    job.enqueued_at = PUBLISH_ASAP
    job.transition(JobState.QUEUED, f"{reason}; will resume from the last checkpoint", at=now)
    sweep_jobs.follow_parent(session, job, now=now)
    session.flush()
    return JobState.QUEUED


def return_unstarted_job(*, session: Session, job_id: str) -> bool:
    """A message this worker accepted but will not run (it is shutting down): leave
    the job queued and have the next sweep publish it again. True if it was queued."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED.value)
        .values(enqueued_at=PUBLISH_ASAP)
        .execution_options(synchronize_session=False)
    )
    return cast(CursorResult[Any], result).rowcount == 1


def sweep(
    *,
    session: Session,
    now: datetime | None = None,
    stale_after: timedelta,
    requeue_after: timedelta,
) -> SweepResult:
    """Recover from dead workers and lost messages. Safe to run from many processes at
    once: every change is conditional and taken under the row's lock.

    * running / cancelling jobs whose heartbeat is older than ``stale_after``:
      cancelled if cancellation was requested; queued again (to resume from their
      checkpoint) while ``attempt < max_attempts``; else failed with ``worker_lost``.
    * queued jobs with ``cancel_requested``: cancelled.
    * queued jobs whose message was published longer than ``requeue_after`` ago: their
      ``enqueued_at`` is reset and they are returned for re-publishing (a duplicate
      message is harmless, the claim is conditional).

    The caller commits, then publishes ``result.to_publish``.
    """
    now = now or utcnow()
    result = SweepResult()
    stale_cutoff = now - stale_after
    stale = _lock(
        session,
        and_(
            Job.state.in_(RUNNING_STATES),
            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_cutoff),
            Job.kind != SWEEP_KIND,  # a sweep has no worker: it follows its children
        ),
    )
    for job in stale:
        since = job.heartbeat_at.isoformat() if job.heartbeat_at else "never"
        cause = (
            f"worker lost: heartbeat stale since {since}"
            f" (worker {job.worker}, attempt {job.attempt})"
        )
        state, _ = _retry_or_fail(job, now=now, cause=cause, code="worker_lost")
        if state is JobState.QUEUED:
            result.requeued.append((job.id, job.queue))
        elif state is JobState.FAILED:
            result.failed.append(job.id)
        else:
            result.cancelled.append(job.id)

    queued_cancelled = and_(
        Job.state == JobState.QUEUED.value, Job.cancel_requested, Job.kind != SWEEP_KIND
    )
    for job in _lock(session, queued_cancelled):
        job.transition(JobState.CANCELLED, "cancelled by request before it started", at=now)
        result.cancelled.append(job.id)

    republish_cutoff = now - requeue_after
    lost = _lock(
        session,
        and_(
            Job.state == JobState.QUEUED.value,
            ~Job.cancel_requested,
            func.coalesce(Job.enqueued_at, Job.created_at) < republish_cutoff,
            Job.kind != SWEEP_KIND,  # never published
        ),
        enqueued_at=now,
    )
    result.republish.extend((job.id, job.queue) for job in lost)
    # Last, after every child's lock (a child's row before its parent's): every sweep
    # not finished follows its children, those changed above and any changed by a path
    # that did not follow them.
    sweep_jobs.follow_unfinished(session, now=now)
    session.flush()
    return result
