"""Sweeps in the database (service/sweep_jobs.py), in process: submit through the API
(TestClient on a migrated SQLite database), then the worker's data layer called as a
worker calls it, on PostgreSQL and SQLite. The same with real processes and training:
tests/service/test_sweeps_service.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.app import create_app
from service import jobs
from service.auth import create_team
from service.db import migrate, session_scope
from service.execution import claim_job, finish_job, requeue_for_retry, sweep
from service.models import Job, JobEvent, JobState, Team, utcnow
from service.settings import Settings
from service.sweeps import SweepSpec, report
from tests.conftest import fresh_postgres_database

BASE = {
    "method": "simclr",
    "width": 4,
    "batch_size": 32,
    "epochs": 1,
    "dataset": {"name": "digits", "image_size": 8},
    "ldreg": {"k": 8},
}
# baseline + one LDReg arm, two seeds: four children.
SPEC = {
    "base": BASE,
    "grid": {"ldreg.alpha": [0.1]},
    "seeds": [0, 1],
    "control": False,
    "metrics": ["knn_acc", "linear_probe_acc"],
}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(home=tmp_path)
    migrate(settings.database_url)
    return settings


@pytest.fixture
def app(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_a_sweep_is_validated_counted_and_stored_as_its_children(
    app: TestClient, settings: Settings
) -> None:
    with session_scope(settings.database_url) as s:
        _, key = create_team(session=s, name="mine")
        _, other = create_team(session=s, name="theirs")
    h = auth(key)

    r = app.post("/v1/jobs?dry_run=true", json={"kind": "sweep", "spec": SPEC}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["children"] == 4 and r.json()["spec"]["seeds"] == [0, 1]
    # Field-precise refusals: the sweep's own checks, then each arm's admission.
    bad = {**SPEC, "grid": {"ldreg.alpah": [0.1]}}
    r = app.post("/v1/jobs?dry_run=true", json={"kind": "sweep", "spec": bad}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"] == "spec.grid.ldreg.alpah"
    huge = {**SPEC, "base": {**BASE, "width": 64, "dataset": {"name": "digits", "image_size": 64}}}
    huge["grid"] = {"batch_size": [32, 60000]}
    r = app.post("/v1/jobs", json={"kind": "sweep", "spec": huge}, headers=h)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "job_too_large" and error["field"] == "spec.grid.batch_size.1"
    assert error["message"].startswith("arm 'batch_size=60000': this job needs an estimated")
    # Every child counts against the team's limit (8 by default): 9 can never run.
    nine = {**SPEC, "grid": {"ldreg.alpha": [0.1, 0.2]}, "seeds": [0, 1, 2]}
    r = app.post("/v1/jobs?dry_run=true", json={"kind": "sweep", "spec": nine}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_children"
    assert r.json()["error"]["field"] == "spec.grid"

    r = app.post("/v1/jobs", json={"kind": "sweep", "name": "s", "spec": SPEC}, headers=h)
    assert r.status_code == 201, r.text
    parent = r.json()
    assert parent["kind"] == "sweep" and parent["state"] == "queued"
    assert parent["children"] == 4 and parent["progress"]["epochs"] == 4
    assert parent["parent_id"] is None and parent["queue_position"] is None
    children = app.get(f"/v1/jobs?parent={parent['id'][:7]}", headers=h).json()["jobs"]
    assert sorted((c["sweep_arm"], c["sweep_seed"]) for c in children) == [
        ("baseline", 0),
        ("baseline", 1),
        ("ldreg.alpha=0.1", 0),
        ("ldreg.alpha=0.1", 1),
    ]
    assert all(c["parent_id"] == parent["id"] and c["kind"] == "pretrain" for c in children)
    assert {c["name"] for c in children} >= {"s: baseline seed=0", "s: ldreg.alpha=0.1 seed=1"}
    # Queued seed by seed, so that the report can pair the first seeds early.
    positions = {(c["sweep_arm"], c["sweep_seed"]): c["queue_position"] for c in children}
    assert positions == {
        ("baseline", 0): 1,
        ("ldreg.alpha=0.1", 0): 2,
        ("baseline", 1): 3,
        ("ldreg.alpha=0.1", 1): 4,
    }
    assert [c["spec"]["ldreg"] for c in children if c["sweep_arm"] == "baseline"] == [None, None]
    # The sweep itself is never queued on the broker, nor counted: 4 + 4 = 8 fit.
    listed = app.get("/v1/jobs", headers=h).json()["jobs"]
    assert next(j for j in listed if j["id"] == parent["id"])["queue_position"] is None
    with session_scope(settings.database_url) as s:
        assert s.get(Job, parent["id"]).enqueued_at is None
    r = app.post("/v1/jobs", json={"kind": "sweep", "spec": SPEC}, headers=h)
    assert r.status_code == 201, r.text
    r = app.post("/v1/jobs", json={"kind": "sweep", "spec": SPEC}, headers=h)
    assert r.status_code == 429 and "4 children" in r.json()["error"]["message"]

    # The report while nothing ran: incomplete, nothing paired.
    r = app.get(f"/v1/jobs/{parent['id'][:8]}/report", headers=h)
    assert r.status_code == 200 and r.json()["complete"] is False
    assert r.json()["children"]["by_state"] == {"queued": 4}
    assert app.get(f"/v1/jobs/{children[0]['id']}/report", headers=h).status_code == 409
    assert app.get(f"/v1/jobs/{parent['id']}/report", headers=auth(other)).status_code == 404
    assert app.get(f"/v1/jobs?parent={parent['id']}", headers=auth(other)).json()["jobs"] == []


@pytest.fixture(scope="module")
def pg_db() -> Iterator[str]:
    with fresh_postgres_database("ldreg_sweepjobs") as url:
        yield url


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sweeps') / 'ldreg.sqlite'}"
    migrate(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    url = request.getfixturevalue("pg_db" if request.param == "postgresql" else "sqlite_db")
    return Settings(home=tmp_path, database_url=url)


def new_sweep(settings: Settings, spec: dict | None = None) -> tuple[Team, str, dict[str, str]]:
    """A submitted sweep: (its team, its id, {"arm seed": child id})."""
    with session_scope(settings.database_url) as s:
        team, _ = create_team(session=s, name=f"t-{uuid.uuid4().hex[:8]}")
        parent, created = jobs.create_job(
            session=s, settings=settings, team=team, kind="sweep", spec=spec or SPEC
        )
        assert created
        kids = s.scalars(select(Job).where(Job.parent_id == parent.id)).all()
        return team, parent.id, {f"{k.sweep_arm} {k.sweep_seed}": k.id for k in kids}


def get(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.database_url) as s:
        return s.get(Job, job_id)


def claim(settings: Settings, job_id: str) -> int:
    with session_scope(settings.database_url) as s:
        attempt = claim_job(session=s, job_id=job_id, worker="w")
    assert attempt is not None
    return attempt


def finish(settings: Settings, job_id: str, attempt: int, state: JobState, **kw) -> None:
    with session_scope(settings.database_url) as s:
        assert finish_job(session=s, job_id=job_id, attempt=attempt, state=state, **kw)


def parent_events(settings: Settings, job_id: str) -> list[tuple[str | None, str]]:
    with session_scope(settings.database_url) as s:
        rows = s.execute(
            select(JobEvent.from_state, JobEvent.to_state)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        )
        return [tuple(r) for r in rows]


def summary(arm: str, seed: int) -> dict[str, float]:
    lift = 0.05 if arm != "baseline" else 0.0
    return {"knn_acc": 0.5 + 0.01 * seed + lift, "linear_probe_acc": 0.4 + 0.02 * seed + lift}


def test_the_sweep_follows_its_children_to_a_report(db: Settings) -> None:
    team, parent_id, kids = new_sweep(db)
    # A sweep is never claimed: it has no worker.
    with session_scope(db.database_url) as s:
        assert claim_job(session=s, job_id=parent_id, worker="w") is None
    attempts = {}
    for label, child_id in sorted(kids.items()):
        attempts[label] = claim(db, child_id)
        parent = get(db, parent_id)
        assert parent.state == "running" and parent.started_at is not None
        assert parent.worker is None and parent.attempt == 0
    for i, (label, child_id) in enumerate(sorted(kids.items())):
        arm, seed = label.rsplit(" ", 1)
        finish(db, child_id, attempts[label], JobState.SUCCEEDED, summary=summary(arm, int(seed)))
        parent = get(db, parent_id)
        assert (parent.progress_epoch, parent.progress_epochs) == (i + 1, 4)
        assert parent.state == ("succeeded" if i == 3 else "running")
        assert (parent.summary is None) == (i < 3)
    results = []
    for label, child_id in kids.items():
        arm, seed = label.rsplit(" ", 1)
        metrics = summary(arm, int(seed))
        results.append(
            {
                "arm": arm,
                "seed": int(seed),
                "state": "succeeded",
                "metrics": metrics,
                "job_id": child_id,
            }
        )
    expected = report(SweepSpec.model_validate(SPEC), results)
    assert parent.summary == expected and parent.summary["complete"]
    assert parent.error_code is None and parent.finished_at is not None
    assert parent_events(db, parent_id) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    with session_scope(db.database_url) as s:
        assert jobs.sweep_report(session=s, team=team, job_id=parent_id) == expected


def test_cancel_cascades_and_retry_reopens(db: Settings) -> None:
    team, parent_id, kids = new_sweep(db)
    running = kids["baseline 0"]
    attempt = claim(db, running)
    with session_scope(db.database_url) as s:
        parent = jobs.request_cancel(session=s, team=team, job_id=parent_id[:8])
        assert parent.state == "cancelling"
    states = {label: get(db, i).state for label, i in kids.items()}
    assert states == {
        "baseline 0": "cancelling",
        "baseline 1": "cancelled",
        "ldreg.alpha=0.1 0": "cancelled",
        "ldreg.alpha=0.1 1": "cancelled",
    }
    finish(db, running, attempt, JobState.CANCELLED)
    parent = get(db, parent_id)
    assert parent.state == "cancelled" and parent.summary["complete"]
    assert parent.summary["children"]["by_state"] == {"cancelled": 4}
    with session_scope(db.database_url) as s, pytest.raises(jobs.Conflict):
        jobs.request_cancel(session=s, team=team, job_id=parent_id)

    # Retry: every cancelled child queued again, the sweep re-opened (a child had run).
    with session_scope(db.database_url) as s:
        parent = jobs.retry_job(session=s, settings=db, team=team, job_id=parent_id)
        assert parent.state == "running" and not parent.cancel_requested
        assert parent.summary is None and parent.finished_at is None
        assert len(jobs.sweep_jobs.queued_children(s, parent_id)) == 4
    for label, child_id in kids.items():
        arm, seed = label.rsplit(" ", 1)
        finish(
            db, child_id, claim(db, child_id), JobState.SUCCEEDED, summary=summary(arm, int(seed))
        )
    parent = get(db, parent_id)
    assert parent.state == "succeeded" and parent.summary["children"]["by_state"] == {
        "succeeded": 4
    }
    with (
        session_scope(db.database_url) as s,
        pytest.raises(jobs.Conflict, match="nothing to retry"),
    ):
        jobs.retry_job(session=s, settings=db, team=team, job_id=parent_id)


def test_failed_children_are_reported_and_a_retried_child_updates_the_report(
    db: Settings,
) -> None:
    team, parent_id, kids = new_sweep(db)
    failed = kids["ldreg.alpha=0.1 1"]
    for label, child_id in kids.items():
        arm, seed = label.rsplit(" ", 1)
        attempt = claim(db, child_id)
        if child_id == failed:
            finish(db, child_id, attempt, JobState.FAILED, error=("loss_not_finite", "NaN"))
        else:
            finish(db, child_id, attempt, JobState.SUCCEEDED, summary=summary(arm, int(seed)))
    parent = get(db, parent_id)
    assert parent.state == "succeeded"  # the report lists the failed child
    arm = next(a for a in parent.summary["arms"] if a["name"] == "ldreg.alpha=0.1")
    assert arm["failed"] == [
        {
            "seed": 1,
            "state": "failed",
            "job_id": failed,
            "error": {"code": "loss_not_finite", "message": "NaN"},
        }
    ]
    assert arm["effects"]["knn_acc"]["n"] == 1

    # Retrying the child alone re-opens the sweep; its success completes the pairs.
    with session_scope(db.database_url) as s:
        jobs.retry_job(session=s, settings=db, team=team, job_id=failed)
    assert get(db, parent_id).state == "running"
    finish(db, failed, claim(db, failed), JobState.SUCCEEDED, summary=summary("x", 1))
    parent = get(db, parent_id)
    assert parent.state == "succeeded"
    arm = next(a for a in parent.summary["arms"] if a["name"] == "ldreg.alpha=0.1")
    assert arm["failed"] == [] and arm["effects"]["knn_acc"]["n"] == 2


def test_a_sweep_fails_only_when_no_child_succeeds(db: Settings) -> None:
    _, parent_id, kids = new_sweep(db)
    for child_id in kids.values():
        finish(db, child_id, claim(db, child_id), JobState.FAILED, error=("out_of_memory", "big"))
    parent = get(db, parent_id)
    assert parent.state == "failed" and parent.error_code == "out_of_memory"
    assert parent.error_message.startswith("no child succeeded (4 failed)")
    assert parent.summary["children"]["by_state"] == {"failed": 4}


def test_the_sweeper_leaves_a_sweep_alone_and_brings_it_in_line(db: Settings) -> None:
    _, parent_id, kids = new_sweep(db)
    child = kids["baseline 0"]
    claim(db, child)
    later = utcnow() + timedelta(minutes=5)
    with session_scope(db.database_url) as s:
        result = sweep(
            session=s, now=later, stale_after=timedelta(seconds=45), requeue_after=timedelta(0)
        )
    # The running sweep has no heartbeat and was never published: neither stale nor
    # lost. Its stale child is queued again, the others (queued) re-published.
    assert result.requeued == [(child, "cpu")]
    assert sorted(i for i, _ in result.republish) == sorted(set(kids.values()) - {child})
    assert get(db, parent_id).state == "running"
    # A change that did not follow its sweep (a direct UPDATE) is caught up by a sweep.
    with session_scope(db.database_url) as s:
        s.execute(update(Job).where(Job.parent_id == parent_id).values(state="cancelled"))
    with session_scope(db.database_url) as s:
        sweep(session=s, stale_after=timedelta(seconds=45), requeue_after=timedelta(hours=1))
    parent = get(db, parent_id)
    assert parent.state == "cancelled" and parent.summary["children"]["by_state"] == {
        "cancelled": 4
    }


def test_an_infrastructure_requeue_keeps_the_sweep_running(db: Settings) -> None:
    _, parent_id, kids = new_sweep(db)
    child = kids["baseline 1"]
    attempt = claim(db, child)
    with session_scope(db.database_url) as s:
        assert requeue_for_retry(session=s, job_id=child, attempt=attempt, cause="boom")
    assert get(db, child).state == "queued"
    # A child has run: the sweep stays running while the child waits to resume.
    assert get(db, parent_id).state == "running"
