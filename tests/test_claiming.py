"""service/claiming.py against both databases, without processes: the claim follows the
policy (fair share, fit, device indices), runs are charged to the team's usage once
they end, preemption flags the right job and the heartbeat reports it, and the views
never name another team's jobs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import delete, select, update

from service import auth
from service.claiming import (
    claim_next,
    fit_error,
    queue_view,
    register_worker,
    request_preemptions,
    workers_view,
)
from service.db import migrate, session_scope
from service.execution import finish_job, heartbeat
from service.models import Job, JobState, TeamUsage, Worker, utcnow
from tests.conftest import fresh_postgres_database

STALE = 45.0


@pytest.fixture(scope="module")
def pg_db() -> Iterator[str]:
    with fresh_postgres_database("ldreg_claim") as url:
        yield url


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('claim') / 'ldreg.sqlite'}"
    migrate(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest) -> Iterator[str]:
    url = request.getfixturevalue("pg_db" if request.param == "postgresql" else "sqlite_db")
    yield url
    with session_scope(url) as s:  # each test sees only its own jobs and workers
        s.execute(delete(Worker))
        s.execute(update(Job).where(Job.state != "succeeded").values(state="cancelled"))


def team(url: str) -> str:
    with session_scope(url) as s:
        t, _ = auth.create_team(session=s, name=f"t-{uuid.uuid4().hex[:8]}")
        return t.id


def job(url: str, team_id: str, gpus: int = 1, **resources) -> str:
    spec = {"method": "simclr", "devices": gpus, "resources": {"gpus": gpus, **resources}}
    with session_scope(url) as s:
        j = Job(team_id=team_id, kind="pretrain", spec=spec, queue="cpu", attempt=0, max_attempts=3)
        j.transition(JobState.QUEUED, "submitted")
        s.add(j)
        s.flush()
        return j.id


def worker(url: str, name: str, gpus: int) -> str:
    wid = f"{name}-{uuid.uuid4().hex[:6]}@host"
    with session_scope(url) as s:
        register_worker(session=s, worker_id=wid, queues=["cpu"], gpus=gpus)
    return wid


def claim(url: str, wid: str, hint: str = "none"):
    with session_scope(url) as s:
        return claim_next(
            session=s, worker_id=wid, worker_name=f"{wid}:1", hint=hint, stale_after=STALE
        )


def finish(url: str, c) -> None:
    with session_scope(url) as s:
        assert finish_job(session=s, job_id=c.job_id, attempt=c.attempt, state=JobState.SUCCEEDED)


def test_claims_alternate_between_teams_and_charge_usage(db: str) -> None:
    a, b = team(db), team(db)
    jobs = {job(db, a): a, job(db, a): a, job(db, b): b, job(db, b): b}
    w = worker(db, "one", 1)
    order = []
    for _ in range(4):
        c = claim(db, w, hint=next(iter(jobs)))
        assert c is not None and c.devices == (0,)
        assert claim(db, w) is None  # its only GPU is busy
        order.append(jobs[c.job_id])
        finish(db, c)
    # Each team once, then each again (which first in a round: the least usage so far);
    # first come, first served would be a, a, b, b.
    assert order[0] == a and sorted(order[:2]) == sorted(order[2:]) == sorted([a, b])
    claim(db, w)  # settles the last run
    with session_scope(db) as s:
        usage = {r.team_id: r.value for r in s.scalars(select(TeamUsage))}
        assert usage[a] > 0 and usage[b] > 0
        assert all(j.run_started_at is None for j in s.scalars(select(Job)) if j.id in jobs)


def test_a_multi_gpu_job_gets_distinct_devices_and_only_where_it_fits(db: str) -> None:
    t = team(db)
    small_worker, big_worker = worker(db, "small", 1), worker(db, "big", 3)
    one = job(db, t)
    two = job(db, t, gpus=2)
    assert claim(db, small_worker, hint=two).job_id == one  # the 2-GPU job never fits here
    assert claim(db, small_worker, hint=two) is None
    c = claim(db, big_worker)
    assert (c.job_id, c.devices) == (two, (0, 1))
    with session_scope(db) as s:
        assert s.get(Job, two).devices == "0,1"
        assert fit_error(s, gpus=3, memory_gb=None, queue="cpu", stale_after=STALE) is None
        message = fit_error(s, gpus=4, memory_gb=None, queue="cpu", stale_after=STALE)
        assert message and big_worker in message and "has 3 GPUs" in message
    third = job(db, t)
    c3 = claim(db, big_worker)
    assert (c3.job_id, c3.devices) == (third, (2,))


def test_preemption_flags_the_preemptible_job_and_the_heartbeat_says_so(db: str) -> None:
    low_team, high_team = team(db), team(db)
    w = worker(db, "one", 1)
    low = job(db, low_team, preemptible=True)
    c = claim(db, w)
    assert c.job_id == low
    urgent = job(db, high_team, priority=5)
    with session_scope(db) as s:
        plan = request_preemptions(session=s, stale_after=STALE)
    assert plan is not None and plan.preempt == (low,) and plan.job_id == urgent
    with session_scope(db) as s:
        beat = heartbeat(session=s, job_id=low, attempt=c.attempt)
        assert beat.alive and beat.preempt_requested and not beat.cancel_requested
        assert s.get(Job, low).preempted_for == urgent


def test_a_job_of_equal_priority_or_not_preemptible_is_never_preempted(db: str) -> None:
    t, u = team(db), team(db)
    w = worker(db, "one", 1)
    running = job(db, t)  # not preemptible
    assert claim(db, w).job_id == running
    job(db, u, priority=5)
    with session_scope(db) as s:
        assert request_preemptions(session=s, stale_after=STALE) is None


def test_views_name_only_the_teams_own_jobs(db: str) -> None:
    mine, theirs = team(db), team(db)
    w = worker(db, "one", 2)
    their_job = job(db, theirs)
    my_job = job(db, mine)
    claim(db, w)
    claim(db, w)
    my_queued = job(db, mine)
    their_queued = job(db, theirs)
    with session_scope(db) as s:
        rows = workers_view(s, team_id=mine, stale_after=STALE)
        row = next(r for r in rows if r["id"] == w)
        assert row["state"] == "busy" and row["free_gpus"] == 0
        assert [j["id"] for j in row["jobs"]] == [my_job] and row["other_jobs"] == 1
        view = queue_view(s, team_id=mine, stale_after=STALE)
    assert their_job not in str(rows) and their_queued not in str(view)
    assert [j["id"] for j in view["jobs"]] == [my_queued]
    assert view["queued_other_teams"] == 1 and view["jobs"][0]["reason"]


def test_a_stale_worker_is_not_live(db: str) -> None:
    t = team(db)
    w = worker(db, "old", 1)
    with session_scope(db) as s:
        s.execute(
            update(Worker).where(Worker.id == w).values(heartbeat_at=utcnow() - timedelta(hours=1))
        )
    j = job(db, t)
    # Not registered as far as the scheduler knows: the message's job is claimed (FIFO).
    assert claim(db, w, hint=j).job_id == j
    with session_scope(db) as s:
        assert workers_view(s, team_id=t, stale_after=STALE) == []
        assert fit_error(s, gpus=64, memory_gb=None, queue="cpu", stale_after=STALE) is None
