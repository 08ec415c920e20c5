"""Sweeps in the database: a parent job of kind ``sweep`` and its children.

``service/sweeps.py`` is the pure core (the spec, its arms and children, the report);
this module stores a sweep as jobs and keeps the parent true to its children
(docs/sweeps.md, "How a sweep runs"):

* **Submit** (``service.jobs.create_job``): the parent (kind ``sweep``, its spec the
  normalised ``SweepSpec``) and one ordinary pretrain job per arm and seed, in one
  transaction (:func:`new_children`). A child records its sweep (``parent_id``), arm
  (``sweep_arm``) and seed (``sweep_seed``). The children are published; the parent
  never is, so it occupies no worker, and claims and the sweeper leave it alone.
* **Follow** (:func:`follow_parents`): every change of a child's state calls it in the
  same transaction: a claim, a finish, a re-queue or hand-back, the stale-job sweeper,
  a user's cancel or retry. It locks the parent's row, then reads every child's state
  (the committed ones, and this transaction's own) and derives the parent's state,
  progress, error and report (:func:`derive`). Concurrent changes of two children each
  wait for the parent's lock and then read the other's committed change, so whoever
  changes the last child writes the final state, in whatever order they commit. The
  worker's sweeper also follows every unfinished sweep each round
  (:func:`follow_unfinished`): a net under any path that changes a child without it.
* **Lock order**: a child's row before its parent's, everywhere. A worker's fenced
  write locks the child first, so cancelling or retrying a sweep locks its children
  before the parent (:func:`lock_family`), and no two transactions wait on each other.

No torch here (the API imports it); scipy only when a report is computed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.errors import Conflict
from service.models import (
    ACTIVE_STATES,
    FINISHED_STATES,
    SWEEP_KIND,
    Job,
    JobState,
    new_id,
    utcnow,
)
from service.sweeps import Child, ChildResult, SweepSpec, report

log = logging.getLogger(__name__)

_FINISHED = frozenset(s.value for s in FINISHED_STATES)
_RUNNING = frozenset({JobState.RUNNING.value, JobState.CANCELLING.value})
# The order states are listed in, in events and messages.
_ORDER = [s.value for s in JobState]


@dataclass(frozen=True)
class ChildRow:
    """What the parent needs of one child."""

    id: str
    arm: str
    seed: int
    state: str
    started_at: datetime | None
    summary: dict[str, Any] | None
    error_code: str | None
    error_message: str | None

    def result(self) -> ChildResult:
        error = None
        if self.error_code is not None or self.error_message is not None:
            error = {"code": self.error_code or "error", "message": self.error_message or ""}
        return ChildResult(
            arm=self.arm,
            seed=self.seed,
            state=self.state,
            metrics=self.summary,
            job_id=self.id,
            error=error,
        )


def child_name(parent_name: str | None, arm: str, seed: int) -> str:
    """A child's name: its sweep's name (if any), arm and seed, at most 200 characters
    (the column's size; the arm and seed are also columns of their own)."""
    name = f"{arm} seed={seed}"
    if parent_name:
        name = f"{parent_name}: {name}"
    return name if len(name) <= 200 else name[:199] + "…"


def new_children(
    *,
    parent: Job,
    children: Sequence[Child],
    queue: str,
    max_attempts: int,
    now: datetime | None = None,
) -> list[Job]:
    """The queued pretrain jobs of a new sweep ``parent`` (whose ``id`` is set), one per
    child of ``service.sweeps.expand``; the caller adds them in the parent's
    transaction and publishes them after it commits.

    They are queued seed by seed (every arm of the first seed, then of the next: a
    microsecond apart, so the queue and the broker keep that order), so that the
    seeds the report can pair come first."""
    now = now or utcnow()
    seeds = list(dict.fromkeys(c.seed for c in children))
    order = sorted(range(len(children)), key=lambda i: (seeds.index(children[i].seed), i))
    out = []
    for position, i in enumerate(order):
        child, at = children[i], now + timedelta(microseconds=position)
        job = Job(
            id=new_id(),
            team_id=parent.team_id,
            kind="pretrain",
            name=child_name(parent.name, child.arm, child.seed),
            spec=child.spec,
            queue=queue,
            attempt=0,
            max_attempts=max_attempts,
            progress_epoch=0,
            progress_epochs=int(child.spec["epochs"]),
            enqueued_at=now,
            created_at=at,
            parent_id=parent.id,
            sweep_arm=child.arm,
            sweep_seed=child.seed,
        )
        job.transition(JobState.QUEUED, f"submitted by sweep {parent.id}", at=at)
        out.append(job)
    return out


def children_rows(session: Session, parent_id: str) -> list[ChildRow]:
    """Every child of the sweep, as this transaction sees them now (autoflushed)."""
    rows = session.execute(
        select(
            Job.id,
            Job.sweep_arm,
            Job.sweep_seed,
            Job.state,
            Job.started_at,
            Job.summary,
            Job.error_code,
            Job.error_message,
        )
        .where(Job.parent_id == parent_id)
        .order_by(Job.created_at, Job.id)
    )
    return [
        ChildRow(
            id=r.id,
            arm=r.sweep_arm or "",
            seed=int(r.sweep_seed or 0),
            state=r.state,
            started_at=r.started_at,
            summary=r.summary,
            error_code=r.error_code,
            error_message=r.error_message,
        )
        for r in rows
    ]


def derive(cancel_requested: bool, states: Iterable[str], started: bool) -> JobState:
    """A sweep's state from its children's states (``started``: whether any child has
    ever run):

    * every child finished: ``cancelled`` if the sweep was cancelled; else
      ``succeeded`` if any child succeeded (the report lists the failed ones); else
      ``failed`` if any failed; else (all cancelled) ``cancelled``;
    * else ``cancelling`` if the sweep was cancelled (its running children stopping);
      ``running`` once any child has started; ``queued`` while none has.
    """
    counts = Counter(states)
    n = sum(counts.values())
    if n and sum(counts[s] for s in _FINISHED) == n:
        if cancel_requested:
            return JobState.CANCELLED
        if counts[JobState.SUCCEEDED.value]:
            return JobState.SUCCEEDED
        if counts[JobState.FAILED.value]:
            return JobState.FAILED
        return JobState.CANCELLED
    if cancel_requested:
        return JobState.CANCELLING
    if started or any(counts[s] for s in _RUNNING):
        return JobState.RUNNING
    return JobState.QUEUED


def count_text(states: Iterable[str]) -> str:
    """``2 succeeded, 1 running, 1 queued``, in the states' order."""
    counts = Counter(states)
    return ", ".join(f"{counts[s]} {s}" for s in sorted(counts, key=_ORDER.index))


def sweep_report(spec: dict[str, Any], rows: Sequence[ChildRow]) -> dict[str, Any]:
    """``service.sweeps.report`` over the children's states and final summaries."""
    return report(SweepSpec.model_validate(spec), [r.result() for r in rows])


def _failure(rows: Sequence[ChildRow]) -> tuple[str, str]:
    """The error of a sweep none of whose children succeeded: the children's most
    common error code, and a message naming the first failed child's error."""
    failed = [r for r in rows if r.state == JobState.FAILED.value]
    codes = Counter(r.error_code or "error" for r in failed)
    code = codes.most_common(1)[0][0] if codes else "children_failed"
    message = f"no child succeeded ({count_text(r.state for r in rows)})"
    if failed:
        first = failed[0]
        message += (
            f"; child {first.id} ({first.arm} seed={first.seed}):"
            f" {first.error_code or 'error'}: {first.error_message or ''}"
        )
    return code, message[:4000]


def _apply(parent: Job, rows: Sequence[ChildRow], *, now: datetime, reason: str | None) -> None:
    states = [r.state for r in rows]
    started_at = [r.started_at for r in rows if r.started_at is not None]
    target = derive(bool(parent.cancel_requested), states, bool(started_at))
    finished = sum(1 for s in states if s in _FINISHED)
    n = len(rows)
    final = target in FINISHED_STATES

    if parent.started_at is None and started_at:
        parent.started_at = min(started_at)
    progress = (finished, n, finished / n if n else None)
    if (parent.progress_epoch, parent.progress_epochs, parent.progress_fraction) != progress:
        parent.progress_epoch, parent.progress_epochs, parent.progress_fraction = progress
        parent.progress_updated_at = now

    summary: dict[str, Any] | None = None
    error: tuple[str, str] | None = None
    if final:
        try:
            summary = sweep_report(parent.spec, rows)
        except Exception as exc:  # a child's state change must never fail on the report
            log.exception("sweep %s: could not compute its report", parent.id)
            target = JobState.FAILED
            error = ("report_error", f"the report could not be computed: {exc}"[:4000])
        if target is JobState.FAILED and error is None:
            error = _failure(rows)
    parent.summary = summary
    parent.error_code, parent.error_message = error if error is not None else (None, None)

    if target.value != parent.state:
        if reason is None:
            counts = count_text(states)
            reason = (
                f"all {n} children finished ({counts})"
                + ("; report computed" if summary is not None else "")
                if final
                else f"children: {counts}"
            )
        parent.transition(target, reason, at=now)
    if not final:
        parent.finished_at = None


def _lock_parent(session: Session, parent_id: str) -> Job | None:
    return session.scalars(
        select(Job)
        .where(Job.id == parent_id, Job.kind == SWEEP_KIND)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()


def follow_parents(
    session: Session,
    parent_ids: Iterable[str | None],
    *,
    now: datetime | None = None,
    reason: str | None = None,
    reopen: bool = False,
) -> list[Job]:
    """Bring each sweep's state, progress, error and report in line with its children,
    in the caller's transaction (which the caller commits). ``reason`` is the event's,
    should the state change; ``reopen`` (a child retried by the user) lifts an earlier
    cancellation of the sweep. Parents are locked one by one, in id order."""
    now = now or utcnow()
    out = []
    for parent_id in sorted({p for p in parent_ids if p}):
        parent = _lock_parent(session, parent_id)
        if parent is None:
            continue
        if reopen:
            parent.cancel_requested = False
        _apply(parent, children_rows(session, parent_id), now=now, reason=reason)
        out.append(parent)
    session.flush()
    return out


def follow_parent(session: Session, job: Job, **kwargs: Any) -> None:
    """:func:`follow_parents` for ``job``'s sweep, if it is a sweep's child."""
    if job.parent_id is not None:
        follow_parents(session, [job.parent_id], **kwargs)


def follow_parent_of(session: Session, job_id: str, *, now: datetime | None = None) -> None:
    """:func:`follow_parents` for the sweep of the job with this id, if it has one."""
    parent_id = session.scalar(select(Job.parent_id).where(Job.id == job_id))
    if parent_id is not None:
        follow_parents(session, [parent_id], now=now)


def follow_unfinished(session: Session, *, now: datetime | None = None) -> int:
    """Follow every sweep that has not finished (the sweeper's net); returns how many
    changed state. Call it after any child's lock in the transaction (the lock order)."""
    rows = session.execute(
        select(Job.id, Job.state).where(
            Job.kind == SWEEP_KIND, Job.state.in_([s.value for s in ACTIVE_STATES])
        )
    ).all()
    before = {r.id: r.state for r in rows}
    parents = follow_parents(session, before, now=now)
    return sum(1 for p in parents if before.get(p.id) != p.state)


def lock_family(session: Session, parent_id: str) -> tuple[Job | None, list[Job]]:
    """Lock a sweep's children, then the sweep (the lock order of every writer), and
    return them fresh: ``(parent or None, children in creation order)``."""
    ids = (
        session.execute(
            update(Job)
            .where(Job.parent_id == parent_id)
            .values(state=Job.state)  # a no-op SET that takes the rows' locks
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
        .scalars()
        .all()
    )
    children = list(
        session.scalars(
            select(Job)
            .where(Job.id.in_(ids))
            .order_by(Job.created_at, Job.id)
            .execution_options(populate_existing=True)
        )
    )
    return _lock_parent(session, parent_id), children


def cancel_sweep(session: Session, parent_id: str, *, now: datetime | None = None) -> Job:
    """Cancel a sweep: its queued children at once, its running ones cooperatively (as
    for any job); the sweep is ``cancelling`` until they have stopped, then
    ``cancelled``, with the report of what did finish. 409 once it has finished."""
    now = now or utcnow()
    parent, children = lock_family(session, parent_id)
    assert parent is not None, parent_id  # the caller found it
    if parent.state in _FINISHED:
        session.rollback()
        raise Conflict(
            f"sweep {parent.id} already {parent.state}; nothing to cancel", field="state"
        )
    parent.cancel_requested = True
    cancelled = stopping = 0
    for child in children:
        if child.state in _FINISHED:
            continue
        child.cancel_requested = True
        if child.state == JobState.QUEUED.value:
            child.transition(
                JobState.CANCELLED,
                f"cancelled with its sweep {parent.id} before it started",
                at=now,
            )
            cancelled += 1
        else:
            if child.state == JobState.RUNNING.value:
                child.transition(
                    JobState.CANCELLING,
                    f"cancel of its sweep {parent.id} requested by user",
                    at=now,
                )
            stopping += 1
    follow_parents(
        session,
        [parent.id],
        now=now,
        reason=f"cancelled by user: {cancelled} queued children cancelled,"
        f" {stopping} running children stopping",
    )
    return parent


def retry_sweep(
    session: Session,
    parent_id: str,
    requeue: Callable[[Job, JobState], None],
    *,
    now: datetime | None = None,
) -> tuple[Job, list[Job]]:
    """Retry a finished sweep: each failed or cancelled child is queued again
    (``requeue``: what a retry of that job alone does) and the sweep re-opens. Returns
    the sweep and the children to publish. 409 while the sweep runs, or when every
    child succeeded."""
    now = now or utcnow()
    parent, children = lock_family(session, parent_id)
    assert parent is not None, parent_id
    if parent.state not in _FINISHED:
        session.rollback()
        raise Conflict(
            f"sweep {parent.id} is {parent.state}; retry it once every child has finished,"
            " or retry a failed child on its own",
            field="state",
        )
    again = [c for c in children if c.state in (JobState.FAILED.value, JobState.CANCELLED.value)]
    if not again:
        session.rollback()
        raise Conflict(
            f"every child of sweep {parent.id} succeeded; nothing to retry", field="state"
        )
    for child in again:
        requeue(child, JobState(child.state))
    parent.cancel_requested = False
    follow_parents(
        session,
        [parent.id],
        now=now,
        reason=f"retried by user: {len(again)} failed or cancelled children queued again",
    )
    return parent, again


def queued_children(session: Session, parent_id: str) -> list[tuple[str, str]]:
    """``(id, queue)`` of the sweep's queued children, to publish."""
    rows = session.execute(
        select(Job.id, Job.queue)
        .where(Job.parent_id == parent_id, Job.state == JobState.QUEUED.value)
        .order_by(Job.created_at, Job.id)
    )
    return [(r.id, r.queue) for r in rows]
