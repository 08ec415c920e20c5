"""The worker-side data layer against a real PostgreSQL (and the SQLite default).

These are the guarantees crash safety rests on: a claim is exclusive, a stale attempt
can write nothing, replayed epochs upsert, and the sweeper recovers dead workers and
lost messages without ever running a job twice.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.db import migrate, session_scope
from service.execution import (
    MetricRow,
    add_artifact,
    claim_job,
    finish_job,
    heartbeat,
    record_metrics,
    requeue_for_retry,
    return_running_job,
    return_unstarted_job,
    sweep,
)
from service.models import Artifact, Job, JobEvent, JobState, Metric, Team, utcnow
from tests.conftest import fresh_postgres_database


@pytest.fixture(scope="module")
def pg_db() -> Iterator[str]:
    with fresh_postgres_database("ldreg_exec") as url:
        yield url


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('exec') / 'ldreg.sqlite'}"
    migrate(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("pg_db" if request.param == "postgresql" else "sqlite_db")


def new_job(url: str, **fields) -> str:
    with session_scope(url) as s:
        team = Team(name=f"t-{uuid.uuid4().hex[:8]}")
        s.add(team)
        s.flush()
        job = Job(team_id=team.id, kind="pretrain", spec={}, enqueued_at=utcnow(), **fields)
        s.add(job)
        s.flush()
        return job.id


def get_job(url: str, job_id: str) -> Job:
    with session_scope(url) as s:
        return s.get(Job, job_id)


def events(url: str, job_id: str) -> list[tuple[str | None, str, int]]:
    with session_scope(url) as s:
        rows = s.execute(
            select(JobEvent.from_state, JobEvent.to_state, JobEvent.attempt)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        )
        return [tuple(r) for r in rows]


def claim(url: str, job_id: str, worker: str = "w1") -> int | None:
    with session_scope(url) as s:
        return claim_job(session=s, job_id=job_id, worker=worker)


def test_claim_is_exclusive_under_concurrency(pg_db: str) -> None:
    job_id = new_job(pg_db)
    barrier = threading.Barrier(8)
    results: list[int | None] = []

    def racer(i: int) -> None:
        barrier.wait()
        results.append(claim(pg_db, job_id, worker=f"w{i}"))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(results, key=lambda r: r or 0) == [None] * 7 + [1]
    job = get_job(pg_db, job_id)
    assert (job.state, job.attempt) == ("running", 1)
    assert job.started_at is not None and job.heartbeat_at is not None
    assert events(pg_db, job_id) == [("queued", "running", 1)]


def test_claim_refuses_cancelled_and_finished_jobs(db: str) -> None:
    cancelled = new_job(db, cancel_requested=True)
    assert claim(db, cancelled) is None
    done = new_job(db)
    attempt = claim(db, done)
    with session_scope(db) as s:
        assert finish_job(session=s, job_id=done, attempt=attempt, state=JobState.SUCCEEDED)
    assert claim(db, done) is None  # a duplicate message after the job finished
    assert get_job(db, done).attempt == 1


def test_stale_attempt_cannot_write(db: str) -> None:
    job_id = new_job(db)
    first = claim(db, job_id, "w1")
    # The sweeper declares attempt 1 dead and a new worker takes the job.
    with session_scope(db) as s:
        sweep(
            session=s,
            now=utcnow() + timedelta(minutes=5),
            stale_after=timedelta(seconds=30),
            requeue_after=timedelta(hours=1),
        )
    second = claim(db, job_id, "w2")
    assert (first, second) == (1, 2)

    row = [MetricRow("loss", 1, 10, 9.9)]
    with session_scope(db) as s:
        assert heartbeat(session=s, job_id=job_id, attempt=first).alive is False
        assert record_metrics(session=s, job_id=job_id, attempt=first, rows=row) is False
        assert (
            add_artifact(session=s, job_id=job_id, attempt=first, name="x", path="/x", size=1)
            is False
        )
        assert finish_job(session=s, job_id=job_id, attempt=first, state=JobState.FAILED) is False
        assert requeue_for_retry(session=s, job_id=job_id, attempt=first, cause="oom") is None
    with session_scope(db) as s:
        assert (
            s.scalar(select(func.count()).select_from(Metric).where(Metric.job_id == job_id)) == 0
        )
        assert (
            s.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
            == 0
        )
        hb = heartbeat(session=s, job_id=job_id, attempt=second, progress_fraction=0.5)
        assert hb.alive and not hb.cancel_requested
    job = get_job(db, job_id)
    assert (job.state, job.attempt, job.worker, job.progress_fraction) == ("running", 2, "w2", 0.5)


def test_metrics_upsert_on_replayed_step(db: str) -> None:
    job_id = new_job(db)
    a1 = claim(db, job_id)
    with session_scope(db) as s:
        assert record_metrics(
            session=s,
            job_id=job_id,
            attempt=a1,
            rows=[MetricRow("loss", 1, 10, 3.0), MetricRow("knn_acc", 1, 10, 0.5)],
            progress_epoch=1,
            progress_epochs=3,
        )
    # The worker dies, the job resumes from epoch 1's checkpoint and replays epoch 2.
    with session_scope(db) as s:
        assert record_metrics(
            session=s, job_id=job_id, attempt=a1, rows=[MetricRow("loss", 2, 20, 2.5)]
        )
    with session_scope(db) as s:
        assert requeue_for_retry(session=s, job_id=job_id, attempt=a1, cause="oom") == "queued"
    a2 = claim(db, job_id)
    with session_scope(db) as s:
        assert record_metrics(
            session=s,
            job_id=job_id,
            attempt=a2,
            rows=[
                MetricRow("loss", 2, 20, 2.0),
                MetricRow("loss", 2, 20, 1.9),  # the same step twice in one batch
                MetricRow("ssl_loss", 2, 20, float("nan")),  # dropped: not representable
            ],
            progress_epoch=2,
        )
    with session_scope(db) as s:
        rows = s.execute(
            select(Metric.name, Metric.epoch, Metric.step, Metric.value, Metric.attempt)
            .where(Metric.job_id == job_id)
            .order_by(Metric.name, Metric.step)
        ).all()
    assert [tuple(r) for r in rows] == [
        ("knn_acc", 1, 10, 0.5, 1),
        ("loss", 1, 10, 3.0, 1),
        ("loss", 2, 20, 1.9, 2),
    ]
    job = get_job(db, job_id)
    assert (job.progress_epoch, job.progress_epochs) == (2, 3)


def test_artifact_upsert_and_finish(db: str, tmp_path: Path) -> None:
    job_id = new_job(db)
    a = claim(db, job_id)
    with session_scope(db) as s:
        assert add_artifact(session=s, job_id=job_id, attempt=a, name="ckpt", path="/a", size=1)
    with session_scope(db) as s:
        assert add_artifact(session=s, job_id=job_id, attempt=a, name="ckpt", path="/b", size=2)
        assert finish_job(
            session=s, job_id=job_id, attempt=a, state=JobState.SUCCEEDED, summary={"knn_acc": 0.9}
        )
    with session_scope(db) as s:
        arts = s.execute(
            select(Artifact.name, Artifact.path, Artifact.size).where(Artifact.job_id == job_id)
        ).all()
    assert [tuple(r) for r in arts] == [("ckpt", "/b", 2)]
    job = get_job(db, job_id)
    assert (job.state, job.summary, job.progress_fraction) == ("succeeded", {"knn_acc": 0.9}, 1.0)
    assert job.finished_at is not None
    assert events(db, job_id) == [("queued", "running", 1), ("running", "succeeded", 1)]


def test_a_cancel_that_comes_too_late_leaves_the_job_succeeded_and_says_so(db: str) -> None:
    job_id = new_job(db)
    a = claim(db, job_id)
    with session_scope(db) as s:
        job = s.get(Job, job_id)
        job.cancel_requested = True
        job.transition(JobState.CANCELLING, "cancel requested by user")
    # The worker was past its last cancellation check: training finished anyway.
    with session_scope(db) as s:
        assert finish_job(session=s, job_id=job_id, attempt=a, state=JobState.SUCCEEDED)
    assert get_job(db, job_id).state == "succeeded"
    with session_scope(db) as s:
        last = (
            s.execute(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
            )
            .scalars()
            .first()
        )
        assert (last.from_state, last.to_state) == ("cancelling", "succeeded")
        assert last.reason == "finished before the cancellation took effect"


def test_sweep_requeues_stale_then_fails_after_max_attempts(db: str) -> None:
    job_id = new_job(db, max_attempts=2)
    stale = timedelta(seconds=30)
    later = timedelta(hours=1)

    def run_sweep(now):
        with session_scope(db) as s:
            return sweep(session=s, now=now, stale_after=stale, requeue_after=later)

    claim(db, job_id)
    # A fresh heartbeat is not stale: nothing happens.
    # (Other tests' jobs share this database: look only at ours.)
    assert (job_id, "cpu") not in run_sweep(utcnow()).requeued
    result = run_sweep(utcnow() + timedelta(minutes=1))
    assert (job_id, "cpu") in result.requeued
    assert (job_id, "cpu") in result.to_publish
    job = get_job(db, job_id)
    assert (job.state, job.attempt) == ("queued", 1)
    # A second sweeper right after finds nothing left to do (no double re-queue).
    assert (job_id, "cpu") not in run_sweep(utcnow() + timedelta(minutes=1)).to_publish

    assert claim(db, job_id) == 2
    result = run_sweep(utcnow() + timedelta(minutes=1))
    assert job_id in result.failed
    job = get_job(db, job_id)
    assert job.state == "failed" and job.error_code == "worker_lost"
    assert "2 of 2 attempts" in job.error_message
    evs = events(db, job_id)
    assert evs == [
        ("queued", "running", 1),
        ("running", "queued", 1),
        ("queued", "running", 2),
        ("running", "failed", 2),
    ]
    with session_scope(db) as s:
        reasons = s.scalars(
            select(JobEvent.reason).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()
    assert "heartbeat stale" in reasons[1]


def test_sweep_cancels_stale_job_that_was_being_cancelled(db: str) -> None:
    job_id = new_job(db)
    claim(db, job_id)
    with session_scope(db) as s:
        job = s.get(Job, job_id)
        job.cancel_requested = True
        job.transition(JobState.CANCELLING, "cancel requested")
    with session_scope(db) as s:
        r = sweep(
            session=s,
            now=utcnow() + timedelta(minutes=1),
            stale_after=timedelta(seconds=30),
            requeue_after=timedelta(hours=1),
        )
    assert job_id in r.cancelled
    assert job_id not in [jid for jid, _ in r.to_publish]
    assert get_job(db, job_id).state == "cancelled"


def test_sweep_republishes_old_queued_jobs_once(db: str) -> None:
    old = new_job(db)
    fresh = new_job(db)
    now = utcnow()
    with session_scope(db) as s:
        s.get(Job, old).enqueued_at = now - timedelta(minutes=20)
    with session_scope(db) as s:
        r = sweep(
            session=s,
            now=now,
            stale_after=timedelta(seconds=30),
            requeue_after=timedelta(minutes=10),
        )
    republished = [jid for jid, _ in r.republish]
    assert old in republished and fresh not in republished
    # enqueued_at was reset: the next sweep does not publish it again.
    with session_scope(db) as s:
        r2 = sweep(
            session=s,
            now=now,
            stale_after=timedelta(seconds=30),
            requeue_after=timedelta(minutes=10),
        )
    assert old not in [jid for jid, _ in r2.republish]
    assert get_job(db, old).state == "queued"


def test_requeue_for_retry_counts_attempts(db: str) -> None:
    job_id = new_job(db, max_attempts=2)
    a1 = claim(db, job_id)
    with session_scope(db) as s:
        assert (
            requeue_for_retry(session=s, job_id=job_id, attempt=a1, cause="out of memory")
            == "queued"
        )
    a2 = claim(db, job_id)
    with session_scope(db) as s:
        assert (
            requeue_for_retry(
                session=s, job_id=job_id, attempt=a2, cause="out of memory", code="out_of_memory"
            )
            == "failed"
        )
    job = get_job(db, job_id)
    assert job.error_code == "out_of_memory"
    assert "out of memory" in job.error_message and "2 of 2" in job.error_message


def test_release_on_shutdown_keeps_the_attempt_budget_and_next_sweep_publishes(db: str) -> None:
    job_id = new_job(db, max_attempts=3)
    a = claim(db, job_id)
    with session_scope(db) as s:
        state = return_running_job(
            session=s, job_id=job_id, attempt=a, reason="worker shutting down"
        )
    assert state == "queued"
    job = get_job(db, job_id)
    assert (job.state, job.max_attempts) == ("queued", 4)
    with session_scope(db) as s:
        r = sweep(session=s, stale_after=timedelta(seconds=30), requeue_after=timedelta(hours=1))
    assert (job_id, "cpu") in r.republish
    # A stale attempt cannot release what it no longer owns.
    assert claim(db, job_id) == 2
    with session_scope(db) as s:
        assert return_running_job(session=s, job_id=job_id, attempt=a, reason="late") is None


def test_hand_back_only_touches_queued_jobs(db: str) -> None:
    queued = new_job(db)
    running = new_job(db)
    claim(db, running)
    with session_scope(db) as s:
        assert return_unstarted_job(session=s, job_id=queued) is True
        assert return_unstarted_job(session=s, job_id=running) is False
    with session_scope(db) as s:
        r = sweep(session=s, stale_after=timedelta(seconds=30), requeue_after=timedelta(hours=1))
    published = [jid for jid, _ in r.republish]
    assert queued in published and running not in published


def test_sweeper_sees_messages_waiting_on_the_filesystem_broker(tmp_path: Path) -> None:
    from service.queue import enqueue_job
    from service.settings import Settings
    from worker.sweeper import waiting_in_broker

    settings = Settings(home=tmp_path, database_url="sqlite://", broker_url="filesystem://")
    waiting, lost = uuid.uuid4().hex, uuid.uuid4().hex
    enqueue_job(settings, waiting, "cpu")
    assert waiting_in_broker(settings, waiting, "cpu")
    assert not waiting_in_broker(settings, waiting, "gpu")
    assert not waiting_in_broker(settings, lost, "cpu")
