"""The API side of an ML engineer's daily loop, in process (TestClient on a migrated
SQLite database, the worker's data layer called as the worker calls it): short job-id
prefixes, queue positions and workers in the job list, step-level progress carried by
the heartbeat, and compare's spec diff and metrics. The same against PostgreSQL, real
processes and the ``ldreg`` command: tests/service/test_cli_client.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service.auth import create_team
from service.compare import spec_diff
from service.db import migrate, session_scope
from service.execution import (
    MetricRow,
    StepProgress,
    add_artifact,
    claim_job,
    finish_job,
    heartbeat,
    record_metrics,
)
from service.models import Job, JobState
from service.settings import Settings
from worker.sink import DatabaseSink, Lease

SMALL = {"method": "simclr", "width": 4, "batch_size": 16, "epochs": 2, "ldreg": {"k": 4}}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(home=tmp_path)
    migrate(settings.database_url)
    return settings


@pytest.fixture
def keys(settings: Settings) -> tuple[str, str]:
    with session_scope(settings.database_url) as s:
        _, mine = create_team(session=s, name="mine")
        _, theirs = create_team(session=s, name="theirs")
    return mine, theirs


@pytest.fixture
def app(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def add_job(settings: Settings, key_team: str, job_id: str, **fields) -> str:
    """A queued job with a chosen id (to make prefixes collide on purpose)."""
    from sqlalchemy import select

    from service.models import Team

    with session_scope(settings.database_url) as s:
        team = s.scalars(select(Team).where(Team.name == key_team)).one()
        fields = {"kind": "pretrain", "spec": dict(SMALL), "attempt": 0, **fields}
        job = Job(id=job_id, team_id=team.id, **fields)
        job.transition(JobState.QUEUED, "submitted")
        s.add(job)
    return job_id


def test_a_unique_prefix_names_the_job_on_every_route(
    app: TestClient, keys: tuple[str, str]
) -> None:
    mine, _ = keys
    job_id = app.post("/v1/jobs", json={"kind": "pretrain", "spec": SMALL}, headers=auth(mine))
    job_id = job_id.json()["id"]
    for prefix in (job_id[:6], job_id[:20], job_id[:31]):
        r = app.get(f"/v1/jobs/{prefix}", headers=auth(mine))
        assert r.status_code == 200 and r.json()["id"] == job_id, r.text
    assert app.get(f"/v1/jobs/{job_id[:8]}/events", headers=auth(mine)).status_code == 200
    assert app.get(f"/v1/jobs/{job_id[:8]}/metrics", headers=auth(mine)).json() == {"series": {}}
    assert app.get(f"/v1/jobs/{job_id[:8]}/artifacts", headers=auth(mine)).status_code == 200
    r = app.post(f"/v1/jobs/{job_id[:8]}/cancel", headers=auth(mine))
    assert r.status_code == 200 and r.json()["id"] == job_id and r.json()["state"] == "cancelled"
    # A full id is looked up as it is: no prefix search for it.
    assert app.get(f"/v1/jobs/{job_id}", headers=auth(mine)).json()["id"] == job_id


def test_prefix_errors_are_clear_and_never_count_another_teams_jobs(
    app: TestClient, settings: Settings, keys: tuple[str, str]
) -> None:
    mine, theirs = keys
    a = add_job(settings, "mine", "abcdef01" + "0" * 24)
    b = add_job(settings, "mine", "abcdef02" + "0" * 24)
    theirs_id = add_job(settings, "theirs", "abcdef03" + "0" * 24)
    solo_theirs = add_job(settings, "theirs", "fedcba99" + "0" * 24)

    for path in ("/v1/jobs/abcdef", "/v1/jobs/abcdef/events", "/v1/jobs/abcdef/cancel"):
        method = "POST" if path.endswith("cancel") else "GET"
        r = app.request(method, path, headers=auth(mine))
        assert r.status_code == 409, (path, r.text)
        error = r.json()["error"]
        assert error["code"] == "ambiguous_job_id" and error["field"] == "id"
        # Two of mine; their third with the same prefix is not counted.
        assert "matches 2 of your team's jobs" in error["message"]
        assert {d["message"] for d in error["details"]} == {f"matches {a}", f"matches {b}"}

    r = app.get("/v1/compare", params={"jobs": f"abcdef,{b}"}, headers=auth(mine))
    assert r.status_code == 409 and r.json()["error"]["field"] == "jobs"

    # Theirs alone under its prefix: they resolve it, I get a 404 (not a leak).
    assert app.get("/v1/jobs/abcdef03", headers=auth(theirs)).json()["id"] == theirs_id
    r = app.get("/v1/jobs/fedcba", headers=auth(mine))
    assert r.status_code == 404 and r.json()["error"]["message"] == "no job fedcba in your team"
    assert app.get("/v1/jobs/fedcba", headers=auth(theirs)).json()["id"] == solo_theirs
    r = app.get("/v1/jobs/abcdef", headers=auth(theirs))
    assert r.status_code == 200 and r.json()["id"] == theirs_id

    for path in ("/v1/jobs/abcde", "/v1/jobs/a/metrics", "/v1/jobs/abc/artifacts"):
        r = app.get(path, headers=auth(mine))
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["code"] == "job_id_too_short"
        assert "at least 6 characters" in r.json()["error"]["message"]
    r = app.get("/v1/compare", params={"jobs": f"abc,{b}"}, headers=auth(mine))
    assert r.status_code == 422 and r.json()["error"]["field"] == "jobs"

    # The key is checked first, whatever the id.
    for path in ("/v1/jobs/abc", "/v1/jobs/abcdef", f"/v1/jobs/{a}"):
        assert app.get(path, headers=auth("ldr_nope")).status_code == 401, path
    # LIKE's wildcards in a prefix are literal characters.
    assert app.get("/v1/jobs/abcde_", headers=auth(mine)).status_code == 404
    assert app.get("/v1/jobs/%25%25%25%25%25%25", headers=auth(mine)).status_code == 404


def test_the_job_list_shows_queue_positions_and_the_claiming_worker(
    app: TestClient, settings: Settings, keys: tuple[str, str]
) -> None:
    mine, theirs = keys
    first = app.post("/v1/jobs", json={"kind": "pretrain", "spec": SMALL}, headers=auth(theirs))
    ids = [
        app.post("/v1/jobs", json={"kind": "pretrain", "spec": SMALL}, headers=auth(mine)).json()[
            "id"
        ]
        for _ in range(3)
    ]
    with session_scope(settings.database_url) as s:
        assert claim_job(session=s, job_id=ids[0], worker="gpu-7@host") == 1
    listed = {j["id"]: j for j in app.get("/v1/jobs", headers=auth(mine)).json()["jobs"]}
    # Their job entered the queue first, so mine are 2nd and 3rd.
    assert [listed[i]["queue_position"] for i in ids] == [None, 2, 3]
    assert listed[ids[0]]["worker"] == "gpu-7@host" and listed[ids[1]]["worker"] is None
    theirs_listed = app.get("/v1/jobs", headers=auth(theirs)).json()["jobs"]
    assert [j["queue_position"] for j in theirs_listed] == [1]
    assert first.json()["id"] == theirs_listed[0]["id"]
    # A job cancelled and retried goes to the back of the queue.
    app.post(f"/v1/jobs/{ids[1]}/cancel", headers=auth(mine))
    app.post(f"/v1/jobs/{ids[1]}/retry", headers=auth(mine))
    listed = {j["id"]: j for j in app.get("/v1/jobs", headers=auth(mine)).json()["jobs"]}
    assert (listed[ids[2]]["queue_position"], listed[ids[1]]["queue_position"]) == (2, 3)
    # The poll carries the worker but not the position (the list computes it).
    poll = app.get(f"/v1/jobs/{ids[2]}", headers=auth(mine)).json()
    assert poll["queue_position"] is None and "worker" in poll


def test_step_progress_reaches_the_poll_through_the_heartbeat(
    app: TestClient, settings: Settings, keys: tuple[str, str]
) -> None:
    mine, _ = keys
    job_id = app.post("/v1/jobs", json={"kind": "pretrain", "spec": SMALL}, headers=auth(mine))
    job_id = job_id.json()["id"]
    with session_scope(settings.database_url) as s:
        attempt = claim_job(session=s, job_id=job_id, worker="w")
    assert attempt == 1

    # The sink as the trainer drives it, on a clock we move: 10 steps an epoch, 0.5 s
    # a step (32 images/s at batch 16), and an epoch's end that takes 4 s.
    now = [100.0]
    lease = Lease(settings, job_id, attempt)
    sink = DatabaseSink(lease, images_per_step=16, clock=lambda: now[0])
    sink.on_train_start(start_epoch=1, epochs=2, steps_per_epoch=10)
    for step in range(1, 11):
        now[0] += 0.5
        sink.on_step(epoch=1, step=step, metrics={"loss": 1.0})
    progress = lease.step_progress
    assert progress is not None and (progress.step, progress.steps) == (10, 20)
    assert progress.images_per_second == pytest.approx(32.0)
    # 10 steps at 2 steps/s, and two epochs' ends not timed yet.
    assert progress.eta_seconds == pytest.approx(5.0)
    sink.on_epoch_end(epoch=1, step=10, metrics={"loss": 0.9})
    now[0] += 4.0
    sink.on_step(epoch=2, step=11, metrics={"loss": 0.8})
    progress = lease.step_progress
    assert progress is not None and progress.step == 11
    # 9 steps at 2 steps/s plus this epoch's end, timed like the last one (4 s).
    assert progress.eta_seconds == pytest.approx(4.5 + 4.0)

    lease.beat()  # the heartbeat carries it: no write of its own
    job = app.get(f"/v1/jobs/{job_id[:10]}", headers=auth(mine)).json()
    p = job["progress"]
    assert (p["epoch"], p["epochs"], p["step"], p["steps"]) == (1, 2, 11, 20)
    assert p["fraction"] == pytest.approx(11 / 20)
    assert p["images_per_second"] == pytest.approx(32.0)
    assert p["eta_seconds"] == pytest.approx(8.5)
    assert p["updated_at"] is not None

    with session_scope(settings.database_url) as s:
        assert finish_job(session=s, job_id=job_id, attempt=attempt, state=JobState.SUCCEEDED)
    p = app.get(f"/v1/jobs/{job_id}", headers=auth(mine)).json()["progress"]
    assert p["eta_seconds"] is None and p["images_per_second"] == pytest.approx(32.0)


def test_spec_diff_names_only_the_fields_that_differ() -> None:
    a = {"method": "simclr", "epochs": 2, "ldreg": {"alpha": 0.01, "k": 8}, "eval": {"lid_k": [32]}}
    b = {"method": "simclr", "epochs": 3, "ldreg": {"alpha": 0.05, "k": 8}, "eval": {"lid_k": [32]}}
    c = {"method": "simclr", "epochs": 2, "ldreg": None, "eval": {"lid_k": [32, 64]}}
    assert [(d.field, d.values) for d in spec_diff([a, b])] == [
        ("epochs", [2, 3]),
        ("ldreg.alpha", [0.01, 0.05]),
    ]
    assert [(d.field, d.values) for d in spec_diff([a, b, c])] == [
        ("epochs", [2, 3, 2]),
        ("ldreg", [{"alpha": 0.01, "k": 8}, {"alpha": 0.05, "k": 8}, None]),
        ("eval.lid_k", [[32], [32], [32, 64]]),
    ]
    assert spec_diff([a, dict(a)]) == []
    # JSON types: 1 and 1.0, or true and 1, are different values in a spec.
    assert [d.field for d in spec_diff([{"x": 1}, {"x": 1.0}, {"x": True}])] == ["x"]


def test_compare_shows_spec_diff_final_and_latest_metrics_and_diagnosis_curves(
    app: TestClient, settings: Settings, keys: tuple[str, str]
) -> None:
    mine, _ = keys
    spec_b = {**SMALL, "epochs": 3, "ldreg": {"k": 4, "alpha": 0.05}}
    a = app.post("/v1/jobs", json={"kind": "pretrain", "spec": SMALL}, headers=auth(mine))
    b = app.post("/v1/jobs", json={"kind": "pretrain", "spec": spec_b}, headers=auth(mine))
    a_id, b_id = a.json()["id"], b.json()["id"]
    url = settings.database_url
    for job_id, epochs in ((a_id, 2), (b_id, 1)):
        with session_scope(url) as s:
            claim_job(session=s, job_id=job_id, worker="w")
        for epoch in range(1, epochs + 1):
            rows = [
                MetricRow("loss", epoch, epoch * 10, 5.0 / epoch),
                MetricRow("knn_acc", epoch, epoch * 10, 0.1 * epoch),
            ]
            with session_scope(url) as s:
                record_metrics(session=s, job_id=job_id, attempt=1, rows=rows, progress_epoch=epoch)
    with session_scope(url) as s:
        finish_job(
            session=s,
            job_id=a_id,
            attempt=1,
            state=JobState.SUCCEEDED,
            summary={"knn_acc": 0.25, "linear_probe_acc": 0.3, "lid_gmean_k32": 9.0},
        )

    r = app.get("/v1/compare", params={"jobs": f"{a_id[:8]},{b_id[:8]}"}, headers=auth(mine))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["baseline_id"] == a_id
    diff = {d["field"]: d["values"] for d in body["spec_diff"]}
    assert diff == {"epochs": [2, 3], "ldreg.alpha": [None, 0.05]}
    done, running = body["jobs"]
    assert done["metrics"] == {
        "final": True,
        "as_of_epoch": 2,
        "as_of_step": 20,
        "values": {"loss": 2.5, "knn_acc": 0.25, "linear_probe_acc": 0.3, "lid_gmean_k32": 9.0},
    }
    assert running["metrics"] == {
        "final": False,
        "as_of_epoch": 1,
        "as_of_step": 10,
        "values": {"loss": 5.0, "knn_acc": 0.1},
    }
    assert done["diagnosis"] is None and running["diagnosis"] is None
    # The same job twice, once by prefix: refused.
    r = app.get("/v1/compare", params={"jobs": f"{a_id[:8]},{a_id}"}, headers=auth(mine))
    assert r.status_code == 422 and "a second time" in r.json()["error"]["message"]

    # A diagnosis: its histogram file's curves and summaries come along.
    d = add_job(settings, "mine", "d1a9" + "0" * 28, kind="diagnose")
    with session_scope(url) as s:
        s.get(Job, d).spec = {"source": {"upload_id": "u"}, "k": [32]}
        claim_job(session=s, job_id=d, worker="w")
    histogram = {
        "bins": "log10-spaced",
        "histograms": {"mle": {"32": {"edges": [0.0, 1.0], "counts": [5]}}},
        "summaries": {"mle": {"32": {"gmean": 7.5}}},
        "per_class": {"0": {}},
    }
    path = settings.job_dir(d) / "histogram.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(histogram))
    with session_scope(url) as s:
        add_artifact(
            session=s,
            job_id=d,
            attempt=1,
            name="histogram.json",
            path=str(path),
            size=path.stat().st_size,
        )
        finish_job(
            session=s,
            job_id=d,
            attempt=1,
            state=JobState.SUCCEEDED,
            summary={"lid_gmean": {"mle": {"32": 7.5}}, "effective_rank": 12.0},
        )
    body = app.get("/v1/compare", params={"jobs": f"{a_id},{d}"}, headers=auth(mine)).json()
    diagnosis = body["jobs"][1]["diagnosis"]
    assert diagnosis == {k: histogram[k] for k in ("bins", "histograms", "summaries")}
    assert body["jobs"][1]["metrics"]["values"] == {"effective_rank": 12.0}
    assert body["jobs"][1]["lid_gmean"] == {"mle": {"32": 7.5}}
    assert "kind" not in {x["field"] for x in body["spec_diff"]}
    # A section only one spec has is one difference, its values whole.
    diff = {x["field"]: x["values"] for x in body["spec_diff"]}
    assert diff["source"] == [None, {"upload_id": "u"}] and diff["method"] == ["simclr", None]


def test_heartbeat_without_progress_leaves_step_progress_alone(
    settings: Settings, app: TestClient, keys: tuple[str, str]
) -> None:
    mine, _ = keys
    job_id = app.post("/v1/jobs", json={"kind": "pretrain", "spec": SMALL}, headers=auth(mine))
    job_id = job_id.json()["id"]
    url = settings.database_url
    with session_scope(url) as s:
        claim_job(session=s, job_id=job_id, worker="w")
    with session_scope(url) as s:
        heartbeat(
            session=s,
            job_id=job_id,
            attempt=1,
            step_progress=StepProgress(step=3, steps=20, images_per_second=float("nan")),
        )
    with session_scope(url) as s:
        heartbeat(session=s, job_id=job_id, attempt=1)
    p = app.get(f"/v1/jobs/{job_id}", headers=auth(mine)).json()["progress"]
    assert (p["step"], p["steps"], p["images_per_second"], p["eta_seconds"]) == (3, 20, None, None)
