"""The scheduler in the database: the worker registry, the claim by policy, preemption
and the visible queue. The decisions are service/scheduling.py's (pure); this module
reads their inputs from the database, in one transaction, and writes what they say.

* :func:`claim_next`: a worker slot woken by any broker message takes the job the
  policy picks for its worker (the message's own job is only a hint), with the
  fenced claim of service/execution.py, and the device indices it will use. Claims
  are serialised (``pg_advisory_xact_lock`` on PostgreSQL; on SQLite a no-op UPDATE
  takes the database's write lock first), so two slots never decide on one snapshot.
* Runs are charged to their team's usage (``team_usage``, :class:`Usage`) once they
  have ended, in the next claim's transaction (:func:`settle_ended_runs`): a job whose
  ``run_started_at`` is set but which no longer runs has ended its run (at
  ``finished_at``, or at its last heartbeat when it went back to the queue).
* :func:`request_preemptions`: run by every worker's sweeper process; flags the
  running jobs of a :class:`PreemptionPlan` (``preempt_requested``); their worker's
  heartbeat reads it and hands them back to the queue (worker/runner.py).
* :func:`queue_view` / :func:`workers_view`: what ``GET /v1/queue`` and
  ``GET /v1/workers`` show a team.

A worker not in the registry (``run_job`` called directly, as some tests do) claims
its message's job as before: first come, first served.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, false, select, text, update
from sqlalchemy.orm import Session

from service.errors import InvalidInput
from service.execution import RUNNING_STATES, claim_job
from service.models import SWEEP_KIND, Job, JobState, Team, TeamUsage, Worker, utcnow
from service.scheduling import (
    DEFAULT_POLICY,
    JobRequest,
    PreemptionPlan,
    QueueEntry,
    RunningJob,
    SchedulingPolicy,
    Usage,
    WorkerCapacity,
    decay_factor,
    explain_queue,
    fits_anywhere,
    next_job,
    next_preemption,
)
from service.settings import Settings

# pg_advisory_xact_lock's key for "one claim decision at a time" (any fixed bigint).
CLAIM_LOCK_KEY = 0x4C445245_47534348 & 0x7FFFFFFFFFFFFFFF


def worker_id_of(job_worker: str | None) -> str | None:
    """A job's ``worker`` column is ``{worker id}:{pid}``; the registry's id."""
    if not job_worker:
        return None
    return job_worker.rsplit(":", 1)[0] if ":" in job_worker else job_worker


def _ts(value: datetime | None) -> float:
    return (value or utcnow()).timestamp()


# ------------------------------------------------------------------ registry


def register_worker(
    *,
    session: Session,
    worker_id: str,
    queues: Sequence[str],
    gpus: int,
    memory_gb: float | None = None,
    hostname: str | None = None,
    now: datetime | None = None,
) -> None:
    """Insert or refresh this worker's row (at start)."""
    now = now or utcnow()
    row = session.get(Worker, worker_id)
    if row is None:
        row = Worker(id=worker_id, started_at=now)
        session.add(row)
    row.hostname = hostname or socket.gethostname()
    row.queues = list(queues)
    row.gpus = int(gpus)
    row.memory_gb = memory_gb
    row.started_at = now
    row.heartbeat_at = now
    session.flush()


def beat_worker(*, session: Session, worker_id: str, now: datetime | None = None) -> bool:
    """Renew the registration; False if the row is gone (then register again)."""
    rows = session.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(heartbeat_at=now or utcnow())
        .returning(Worker.id)
        .execution_options(synchronize_session=False)
    ).all()
    return bool(rows)


def deregister_worker(*, session: Session, worker_id: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker_id))


def live_workers(session: Session, *, now: datetime, stale_after: float) -> list[Worker]:
    cutoff = now - timedelta(seconds=stale_after)
    return list(
        session.scalars(select(Worker).where(Worker.heartbeat_at >= cutoff).order_by(Worker.id))
    )


def capacity_of(worker: Worker) -> WorkerCapacity:
    return WorkerCapacity(worker.id, worker.gpus, worker.memory_gb, tuple(worker.queues or ()))


# ------------------------------------------------------------------ inputs


def request_of(job: Job) -> JobRequest:
    return JobRequest(
        id=job.id,
        team=job.team_id,
        gpus=job.gpus or 1,
        memory_gb=job.memory_gb,
        priority=job.priority or 0,
        preemptible=bool(job.preemptible),
        submitted_at=_ts(job.created_at),
        queue=job.queue,
    )


def running_of(job: Job) -> RunningJob:
    return RunningJob(
        id=job.id,
        team=job.team_id,
        gpus=job.gpus or 1,
        priority=job.priority or 0,
        preemptible=bool(job.preemptible),
        started_at=_ts(job.run_started_at or job.started_at),
        worker=worker_id_of(job.worker) or "",
        memory_gb=job.memory_gb,
        expected_remaining_seconds=job.progress_eta_seconds,
    )


@dataclass
class Snapshot:
    """The policy's inputs, read in one transaction."""

    queued: list[Job]
    running: list[Job]
    workers: list[Worker]
    usage: Usage
    weights: dict[str, float]
    now: float

    @property
    def requests(self) -> list[JobRequest]:
        return [request_of(j) for j in self.queued]

    @property
    def runs(self) -> list[RunningJob]:
        return [running_of(j) for j in self.running]

    @property
    def capacities(self) -> list[WorkerCapacity]:
        return [capacity_of(w) for w in self.workers]


def _schedulable_jobs():
    return select(Job).where(Job.kind != SWEEP_KIND)


def load_usage(session: Session, now: datetime, policy: SchedulingPolicy, *, write: bool) -> Usage:
    """Every team's stored usage, plus the runs that ended and are not charged yet
    (stored, with their ``run_started_at`` cleared, when ``write``)."""
    rows = list(session.scalars(select(TeamUsage)))
    usage = policy.new_usage(as_of=now.timestamp())
    for r in rows:
        usage.settled[r.team_id] = r.value * decay_factor(
            now.timestamp() - _ts(r.as_of), policy.half_life_seconds
        )
    ended = list(
        session.scalars(
            _schedulable_jobs().where(
                Job.run_started_at.is_not(None), Job.state.not_in(RUNNING_STATES)
            )
        )
    )
    for job in ended:
        # The run's last sign of life: its final write or last heartbeat (a job handed
        # back, then cancelled while queued, did not run until its cancellation).
        ends = [t for t in (job.finished_at, job.heartbeat_at) if t is not None]
        end = min(ends) if ends else now
        start = job.run_started_at or end
        usage.add_interval(job.team_id, job.gpus or 1, _ts(start), min(_ts(end), now.timestamp()))
        if write:
            job.run_started_at = None
    usage.advance(now.timestamp())
    if write and ended:
        stored = {r.team_id: r for r in rows}
        for team, value in usage.settled.items():
            row = stored.get(team)
            if row is None:
                session.add(TeamUsage(team_id=team, value=value, as_of=now))
            else:
                row.value, row.as_of = value, now
        session.flush()
    return usage


def snapshot(
    session: Session,
    *,
    now: datetime,
    stale_after: float,
    policy: SchedulingPolicy = DEFAULT_POLICY,
    write: bool = False,
) -> Snapshot:
    queued = list(
        session.scalars(
            _schedulable_jobs()
            .where(Job.state == JobState.QUEUED.value, ~Job.cancel_requested)
            .order_by(Job.created_at, Job.id)
        )
    )
    running = list(
        session.scalars(_schedulable_jobs().where(Job.state.in_(RUNNING_STATES)).order_by(Job.id))
    )
    workers = live_workers(session, now=now, stale_after=stale_after)
    weights = {t.id: float(t.weight or 1.0) for t in session.scalars(select(Team))}
    usage = load_usage(session, now, policy, write=write)
    return Snapshot(queued, running, workers, usage, weights, now.timestamp())


def serialise_claims(session: Session) -> None:
    """One scheduling decision at a time, until this transaction ends."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK_KEY})
    else:  # SQLite: take the write lock now (a write that changes nothing)
        session.execute(
            update(Worker)
            .where(false())
            .values(id=Worker.id)
            .execution_options(synchronize_session=False)
        )


# ------------------------------------------------------------------ claim


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    devices: tuple[int, ...]


def claim_next(
    *,
    session: Session,
    worker_id: str,
    worker_name: str,
    hint: str,
    stale_after: float,
    policy: SchedulingPolicy = DEFAULT_POLICY,
    now: datetime | None = None,
) -> Claim | None:
    """The job this worker slot should run now, claimed (fenced, attempt + 1), or None.

    ``worker_id``: the registry's id of this worker; ``worker_name``: this slot's name
    (``{worker_id}:{pid}``, stored on the job). ``hint``: the job of the message that
    woke the slot; claimed as before (FIFO) when this worker is not registered.
    """
    now = now or utcnow()
    serialise_claims(session)
    snap = snapshot(session, now=now, stale_after=stale_after, policy=policy, write=True)
    me = next((w for w in snap.workers if w.id == worker_id), None)
    if me is None:
        chosen: str | None = hint
        held: set[int] = set()
        total = 1
    else:
        caps = snap.capacities
        mine = next(c for c in caps if c.id == worker_id)
        pick = next_job(
            mine, snap.requests, snap.runs, snap.usage, snap.weights, snap.now, policy, workers=caps
        )
        chosen = pick.id if pick is not None else None
        total = me.gpus
        held = {
            int(d)
            for j in snap.running
            if worker_id_of(j.worker) == worker_id and j.devices
            for d in j.devices.split(",")
        }
    if chosen is None:
        return None
    attempt = claim_job(session=session, job_id=chosen, worker=worker_name, now=now)
    if attempt is None:
        return None
    job = session.get(Job, chosen)
    assert job is not None
    free = [i for i in range(max(total, job.gpus or 1)) if i not in held]
    devices = tuple(free[: job.gpus or 1])
    session.execute(
        update(Job)
        .where(Job.id == chosen)
        .values(
            run_started_at=now,
            devices=",".join(str(d) for d in devices),
            preempt_requested=False,
            preempted_for=None,
        )
        .execution_options(synchronize_session=False)
    )
    return Claim(chosen, attempt, devices)


def retry_hint_soon(*, session: Session, job_id: str, requeue_after: float, delay: float) -> None:
    """A slot woke for ``job_id`` but the policy gave it nothing: the message is used
    up, so have the sweeper publish the job again in about ``delay`` seconds (unless a
    message for it is still in the broker)."""
    at = utcnow() - timedelta(seconds=max(requeue_after - delay, 0.0))
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED.value)
        .values(enqueued_at=at)
        .execution_options(synchronize_session=False)
    )


# ------------------------------------------------------------------ preemption


def request_preemptions(
    *,
    session: Session,
    stale_after: float,
    policy: SchedulingPolicy = DEFAULT_POLICY,
    now: datetime | None = None,
) -> PreemptionPlan | None:
    """Flag the running jobs the policy would stop for the best-ranked queued job that
    fits nowhere now; their workers hand them back at the next heartbeat."""
    now = now or utcnow()
    serialise_claims(session)
    snap = snapshot(session, now=now, stale_after=stale_after, policy=policy, write=False)
    if not snap.workers or not snap.running:
        return None
    # Runs already asked to stop count as gone (their GPUs are about to free).
    stopping = {j.id for j in snap.running if j.preempt_requested}
    runs = [r for r in snap.runs if r.id not in stopping]
    plan = next_preemption(
        snap.requests, runs, snap.capacities, snap.usage, snap.weights, snap.now, policy
    )
    if plan is None:
        return None
    session.execute(
        update(Job)
        .where(Job.id.in_(plan.preempt), Job.state.in_(RUNNING_STATES), Job.preemptible)
        .values(preempt_requested=True, preempted_for=plan.job_id)
        .execution_options(synchronize_session=False)
    )
    return plan


# ------------------------------------------------------------------ views


def _worker_hint(workers: Sequence[Worker]) -> str:
    return "" if workers else "no live worker is registered yet; it starts when one is"


def fit_error(
    session: Session, *, gpus: int, memory_gb: float | None, queue: str, stale_after: float
) -> str | None:
    """The message to refuse a job with, when live workers exist and none can hold
    it; None when one can, or when no worker is registered (accepted then)."""
    workers = live_workers(session, now=utcnow(), stale_after=stale_after)
    if not workers:
        return None
    check = fits_anywhere(
        JobRequest("new", "", gpus, memory_gb, queue=queue), [capacity_of(w) for w in workers]
    )
    return None if check else check.message


def check_fits(*, session: Session, settings: Settings, spec: Any) -> None:
    """Refuse (422 on ``spec.resources.gpus``) a job no live worker can hold."""
    resources = getattr(spec, "resources", None)
    if resources is None:
        return
    message = fit_error(
        session,
        gpus=resources.gpus or 1,
        memory_gb=resources.memory_gb,
        queue=settings.default_queue,
        stale_after=settings.stale_after_seconds,
    )
    if message:
        raise InvalidInput(message, field="spec.resources.gpus", code="does_not_fit")


def queue_entries(
    session: Session, *, stale_after: float, policy: SchedulingPolicy = DEFAULT_POLICY
) -> tuple[Snapshot, dict[str, QueueEntry]]:
    snap = snapshot(session, now=utcnow(), stale_after=stale_after, policy=policy)
    if not snap.workers:
        return snap, {}
    entries = explain_queue(
        snap.requests, snap.runs, snap.capacities, snap.usage, snap.weights, snap.now, policy
    )
    return snap, {e.id: e for e in entries}


def queue_view(
    session: Session,
    *,
    team_id: str,
    stale_after: float,
    policy: SchedulingPolicy = DEFAULT_POLICY,
) -> dict[str, Any]:
    """The whole queue in the scheduler's order; this team's jobs in full, other
    teams' jobs only counted."""
    snap, entries = queue_entries(session, stale_after=stale_after, policy=policy)
    ahead_others = 0
    jobs: list[dict[str, Any]] = []
    order = sorted(
        snap.queued,
        key=lambda j: (
            entries[j.id].position is None if j.id in entries else False,
            (entries[j.id].position or 0) if j.id in entries else 0,
            _ts(j.created_at),
            j.id,
        ),
    )
    for position, job in enumerate(order, start=1):
        entry = entries.get(job.id)
        if job.team_id != team_id:
            ahead_others += 1
            continue
        jobs.append(
            {
                "id": job.id,
                "name": job.name,
                "position": entry.position if entry else position,
                "reason": entry.reason if entry else _worker_hint(snap.workers),
                "code": entry.code if entry else "no_worker",
                "estimated_start_seconds": entry.estimated_start_seconds if entry else None,
                "others_ahead": ahead_others,
                "gpus": job.gpus,
                "priority": job.priority,
                "preemptible": job.preemptible,
                "queue": job.queue,
            }
        )
    return {
        "jobs": jobs,
        "queued_total": len(snap.queued),
        "queued_other_teams": sum(1 for j in snap.queued if j.team_id != team_id),
        "running_total": len(snap.running),
        "live_workers": len(snap.workers),
    }


def queued_reasons(session: Session, *, stale_after: float) -> dict[str, str]:
    """Every queued job's reason in words (the job list's ``queue_reason``)."""
    snap, entries = queue_entries(session, stale_after=stale_after)
    hint = _worker_hint(snap.workers)
    return {j.id: entries[j.id].reason if j.id in entries else hint for j in snap.queued}


def queued_reason(session: Session, *, job_id: str, stale_after: float) -> dict[str, Any] | None:
    """One queued job's position, reason and estimated start (the job JSON's
    ``queue`` field)."""
    snap, entries = queue_entries(session, stale_after=stale_after)
    entry = entries.get(job_id)
    if entry is None:
        if any(j.id == job_id for j in snap.queued):
            return {
                "position": None,
                "reason": _worker_hint(snap.workers) or "waiting",
                "code": "no_worker",
                "estimated_start_seconds": None,
            }
        return None
    return {
        "position": entry.position,
        "reason": entry.reason,
        "code": entry.code,
        "estimated_start_seconds": entry.estimated_start_seconds,
    }


def workers_view(
    session: Session, *, team_id: str, stale_after: float, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Live workers, their capacity and what they run: this team's jobs by id, other
    teams' jobs only as busy GPUs."""
    now = now or utcnow()
    workers = live_workers(session, now=now, stale_after=stale_after)
    running = list(
        session.scalars(_schedulable_jobs().where(Job.state.in_(RUNNING_STATES)).order_by(Job.id))
    )
    out = []
    for w in workers:
        here = [j for j in running if worker_id_of(j.worker) == w.id]
        busy = sum(j.gpus or 1 for j in here)
        out.append(
            {
                "id": w.id,
                "hostname": w.hostname,
                "queues": list(w.queues or ()),
                "gpus": w.gpus,
                "memory_gb": w.memory_gb,
                "busy_gpus": min(busy, w.gpus),
                "free_gpus": max(w.gpus - busy, 0),
                "state": "busy" if busy else "idle",
                "started_at": w.started_at.astimezone(UTC).isoformat(),
                "heartbeat_at": w.heartbeat_at.astimezone(UTC).isoformat(),
                "jobs": [
                    {"id": j.id, "name": j.name, "gpus": j.gpus, "devices": j.devices}
                    for j in here
                    if j.team_id == team_id
                ],
                "other_jobs": sum(1 for j in here if j.team_id != team_id),
            }
        )
    return out
