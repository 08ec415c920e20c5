"""HTTP API v1 against a real uvicorn process and PostgreSQL.

No worker runs here: submitted jobs stay queued, and states a worker would set
(running, succeeded) are written to the database directly where a test needs them.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ServiceProcess, free_port, wait_http_ok
from sqlalchemy import select, update

from service import auth
from service.db import session_scope
from service.models import Artifact, Job, JobEvent, Metric

PRETRAIN = {
    "method": "simclr",
    "backbone": "resnet18",
    "dataset": {"name": "digits"},
    "epochs": 2,
    "batch_size": 32,
    "ldreg": {"alpha": 0.01, "k": 8},
}
JOB_KEYS = {
    "id",
    "kind",
    "name",
    "state",
    "attempt",
    "progress",
    "created_at",
    "started_at",
    "finished_at",
    "error",
    "summary",
    "spec",
    "worker",
    "queue_position",
    "queue_reason",  # why a queued job waits (service/scheduling.py's explain_queue)
    # a sweep's child's sweep, arm and seed; a sweep's number of children
    "parent_id",
    "sweep_arm",
    "sweep_seed",
    "children",
}


@pytest.fixture
def new_client(api_server: str, pg_url: str) -> Iterator[Callable[[], httpx.Client]]:
    """Factory: a client for a brand-new team. The team is made with the same data-layer
    call ``ldreg admin create-team`` uses, in-process: a CLI start per test would cost
    seconds (the CLI path itself is covered by the ``client`` fixture and test_auth)."""
    clients: list[httpx.Client] = []

    def make() -> httpx.Client:
        with session_scope(pg_url) as s:
            _, key = auth.create_team(session=s, name=f"team-{uuid.uuid4().hex[:10]}")
        c = httpx.Client(
            base_url=api_server, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def submit(client: httpx.Client, name: str | None = None, **spec_changes) -> dict:
    r = client.post(
        "/v1/jobs", json={"kind": "pretrain", "name": name, "spec": {**PRETRAIN, **spec_changes}}
    )
    assert r.status_code == 201, r.text
    return r.json()


def set_state(pg_url: str, job_id: str, state: str) -> None:
    """What a worker would do; the API only reads it."""
    with session_scope(pg_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(state=state))


def test_submit_returns_201_with_the_job_as_designed(client: httpx.Client, pg_url: str) -> None:
    job = submit(client, name="first")

    assert set(job) == JOB_KEYS
    assert job["kind"] == "pretrain" and job["name"] == "first"
    assert job["state"] == "queued" and job["attempt"] == 0
    assert job["progress"] == {
        "epoch": 0,
        "epochs": 2,
        "fraction": None,
        "step": None,
        "steps": None,
        "images_per_second": None,
        "eta_seconds": None,
        "updated_at": None,
    }
    assert job["worker"] is None and job["queue_position"] is None
    assert job["error"] is None and job["started_at"] is None and job["finished_at"] is None
    # The stored spec is the normalised one: defaults spelled out.
    assert job["spec"]["optimizer"]["name"] == "lars" and job["spec"]["ldreg"]["k"] == 8
    assert client.get(f"/v1/jobs/{job['id']}").json() == job
    with session_scope(pg_url) as s:
        row = s.get(Job, job["id"])
        assert row.queue == "cpu" and row.enqueued_at is not None
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == job["id"])).all()
        assert [(e.from_state, e.to_state, e.reason) for e in events] == [
            (None, "queued", "submitted")
        ]


def test_invalid_specs_are_422_naming_the_field(
    new_client: Callable[[], httpx.Client], service_home: Path
) -> None:
    client = new_client()
    # A symlink inside the data root that leads out of it.
    link = service_home / "data" / f"escape-{uuid.uuid4().hex[:6]}"
    link.symlink_to("/etc")
    cases = [
        ({"method": "simclrr"}, "spec.method", "simclr"),
        ({"batch_size": 32, "ldreg": {"k": 64}}, "spec.ldreg.k", "batch_size"),
        ({"ldreg": {"alpha": -0.5, "k": 8}}, "spec.ldreg.alpha", "greater than or equal"),
        ({"dataset": {"name": "npz", "path": "../x.npz"}}, "spec.dataset.path", "data root"),
        ({"dataset": {"name": "npz", "path": "/etc/passwd"}}, "spec.dataset.path", "relative"),
        ({"dataset": {"name": "npz", "path": f"{link.name}/x"}}, "spec.dataset.path", "data root"),
        ({"epochs": 5000}, "spec.epochs", "limit of 1000"),
        ({"epochz": 3}, "spec.epochz", "not permitted"),
    ]
    for change, field, reason in cases:
        r = client.post("/v1/jobs", json={"kind": "pretrain", "spec": {**PRETRAIN, **change}})
        assert r.status_code == 422, (change, r.text)
        error = r.json()["error"]
        assert error["field"] == field, (change, error)
        assert reason in error["message"], (change, error)

    r = client.post("/v1/jobs", json={"kind": "finetune", "spec": PRETRAIN})
    assert r.status_code == 422 and r.json()["error"]["field"] == "kind"
    r = client.post(
        "/v1/jobs", content=b'{"kind": "pretrain",', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]
    # Nothing was stored by any refused request.
    assert client.get("/v1/jobs").json()["jobs"] == []


def test_list_is_newest_first_with_filters_and_cursor_pages(
    new_client: Callable[[], httpx.Client],
) -> None:
    client = new_client()
    ids = [submit(client, name=f"job{i}")["id"] for i in range(5)]
    for job_id in ids[:2]:
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == ids[::-1]  # newest first, every job once

    queued = client.get("/v1/jobs", params={"state": "queued"}).json()["jobs"]
    assert [j["id"] for j in queued] == ids[:1:-1]
    both = client.get("/v1/jobs", params=[("state", "queued"), ("state", "cancelled")]).json()
    assert len(both["jobs"]) == 5
    assert client.get("/v1/jobs", params={"kind": "diagnose"}).json()["jobs"] == []

    r = client.get("/v1/jobs", params={"cursor": "not-a-cursor"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "cursor"
    r = client.get("/v1/jobs", params={"state": "sleeping"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "state.0"


def test_idempotency_key_returns_the_original_job(new_client: Callable[[], httpx.Client]) -> None:
    client = new_client()
    body = {"kind": "pretrain", "name": "idem", "spec": PRETRAIN}
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = client.post("/v1/jobs", json=body, headers=key)
    again = client.post("/v1/jobs", json=body, headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert len(client.get("/v1/jobs").json()["jobs"]) == 1

    changed = client.post("/v1/jobs", json={**body, "name": "other"}, headers=key)
    assert changed.status_code == 422
    assert changed.json()["error"]["code"] == "idempotency_key_reused"
    assert changed.json()["error"]["field"] == "Idempotency-Key"

    fresh = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
    assert fresh.status_code == 201 and fresh.json()["id"] != first.json()["id"]


def test_cancel_and_retry_follow_the_state_machine(
    new_client: Callable[[], httpx.Client], pg_url: str
) -> None:
    client = new_client()
    job = submit(client)
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert r.json()["finished_at"] is not None
    events = client.get(f"/v1/jobs/{job['id']}/events").json()["events"]
    assert [(e["from_state"], e["to_state"]) for e in events] == [
        (None, "queued"),
        ("queued", "cancelled"),
    ]
    assert "cancelled by user" in events[-1]["reason"]

    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and "already cancelled" in r.json()["error"]["message"]

    # A cancelled job can be retried; a queued one cannot.
    r = client.post(f"/v1/jobs/{job['id']}/retry")
    assert r.status_code == 200 and r.json()["state"] == "queued"
    assert r.json()["finished_at"] is None
    r = client.post(f"/v1/jobs/{job['id']}/retry")
    assert r.status_code == 409 and "only failed or cancelled" in r.json()["error"]["message"]

    # Running (as a worker would have set it): retry refused, cancel is cooperative.
    set_state(pg_url, job["id"], "running")
    assert client.post(f"/v1/jobs/{job['id']}/retry").status_code == 409
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelling"
    with session_scope(pg_url) as s:
        assert s.get(Job, job["id"]).cancel_requested is True

    set_state(pg_url, job["id"], "succeeded")
    assert client.post(f"/v1/jobs/{job['id']}/retry").status_code == 409
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


def test_active_job_limit_is_429_with_the_reason(new_client: Callable[[], httpx.Client]) -> None:
    client = new_client()
    ids = [submit(client)["id"] for _ in range(8)]  # LDREG_MAX_ACTIVE_JOBS_PER_TEAM default
    r = client.post("/v1/jobs", json={"kind": "pretrain", "spec": PRETRAIN})
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "limit_exceeded"
    assert "limit is 8" in r.json()["error"]["message"]
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    assert client.post("/v1/jobs", json={"kind": "pretrain", "spec": PRETRAIN}).status_code == 201


def test_metrics_series_with_since_and_downsampling(
    new_client: Callable[[], httpx.Client], pg_url: str
) -> None:
    client = new_client()
    job = submit(client)
    with session_scope(pg_url) as s:
        s.add_all(
            Metric(
                job_id=job["id"],
                name="loss",
                epoch=step // 10,
                step=step,
                value=1 / (step + 1),
                attempt=1,
            )
            for step in range(100)
        )
        s.add_all(
            Metric(
                job_id=job["id"],
                name="lid_gmean_k32",
                epoch=e,
                step=e * 10 + 9,
                value=10.0 + e,
                attempt=1,
            )
            for e in range(10)
        )

    series = client.get(f"/v1/jobs/{job['id']}/metrics").json()["series"]
    assert set(series) == {"loss", "lid_gmean_k32"}
    assert [p["step"] for p in series["loss"]] == list(range(100))
    assert series["lid_gmean_k32"][3] == {"epoch": 3, "step": 39, "value": 13.0}

    recent = client.get(f"/v1/jobs/{job['id']}/metrics", params={"since": 89}).json()["series"]
    assert [p["step"] for p in recent["loss"]] == list(range(90, 100))
    assert [p["step"] for p in recent["lid_gmean_k32"]] == [99]

    thin = client.get(
        f"/v1/jobs/{job['id']}/metrics", params={"max_points": 20, "name": "loss"}
    ).json()["series"]
    steps = [p["step"] for p in thin["loss"]]
    assert set(thin) == {"loss"}
    assert len(steps) == 20 and steps[0] == 0 and steps[-1] == 99 and steps == sorted(steps)
    # Every epoch's value (its last point) is kept, whatever the thinning.
    assert {9, 19, 29, 39, 49, 59, 69, 79, 89, 99} <= set(steps)
    only_epochs = client.get(
        f"/v1/jobs/{job['id']}/metrics", params={"max_points": 3, "name": "loss"}
    ).json()["series"]
    assert [p["step"] for p in only_epochs["loss"]] == [9, 19, 29, 39, 49, 59, 69, 79, 89, 99]


def test_artifacts_list_and_stream_but_never_leave_the_job_folder(
    new_client: Callable[[], httpx.Client], pg_url: str, service_home: Path
) -> None:
    client = new_client()
    job = submit(client)
    job_dir = service_home / "artifacts" / "jobs" / job["id"]
    job_dir.mkdir(parents=True)
    payload = os.urandom(300_000)
    (job_dir / "lids.npy").write_bytes(payload)
    (service_home / "artifacts" / "secret.txt").write_text("not yours")
    with session_scope(pg_url) as s:
        s.add(
            Artifact(
                job_id=job["id"], name="lids.npy", path=str(job_dir / "lids.npy"), size=len(payload)
            )
        )
        s.add(Artifact(job_id=job["id"], name="escape", path="../../secret.txt", size=9))

    listed = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["artifacts"]
    assert [a["name"] for a in listed] == ["escape", "lids.npy"]
    r = client.get(f"/v1/jobs/{job['id']}/artifacts/lids.npy")
    assert r.status_code == 200 and r.content == payload
    assert client.get(f"/v1/jobs/{job['id']}/artifacts/escape").status_code == 404
    # Percent-encoded so the client does not normalise it away before the server.
    sneaky = client.get(f"/v1/jobs/{job['id']}/artifacts/..%2F..%2Fsecret.txt")
    assert sneaky.status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}/artifacts/missing.pt").status_code == 404


def test_openapi_has_stable_operation_ids(api_server: str) -> None:
    schema = httpx.get(f"{api_server}/openapi.json").json()
    ops = {
        op["operationId"]
        for path in schema["paths"].values()
        for op in path.values()
        if isinstance(op, dict) and "operationId" in op
    }
    assert {
        "submit_job",
        "list_jobs",
        "get_job",
        "get_job_metrics",
        "list_job_events",
        "cancel_job",
        "retry_job",
        "list_job_artifacts",
        "download_job_artifact",
        "create_upload",
        "healthz",
        "readyz",
    } <= ops
    assert "/v1/jobs/{job_id}/cancel" in schema["paths"]
    # The poll is added on the app, outside the jobs router (api/routes/jobs.py), and
    # documents by hand what the router and a declared parameter would have.
    poll = schema["paths"]["/v1/jobs/{job_id}"]["get"]
    assert poll["tags"] == ["jobs"]
    assert poll["security"] == [{"HTTPBearer": []}]
    assert [(p["name"], p["in"], p["required"]) for p in poll["parameters"]] == [
        ("job_id", "path", True)
    ]
    assert poll["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobOut"
    }
    assert {"401", "404", "503"} <= set(poll["responses"])


@pytest.fixture
def api_without_database(service_env: dict[str, str], service_home: Path):
    """A second API process (same app, real uvicorn) whose database never answers."""
    port = free_port()
    env = {**service_env, "LDREG_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/none"}
    proc = ServiceProcess(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "api.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env,
        service_home / f"api-nodb-{port}.log",
    ).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{base}/healthz", proc=proc)
        yield base, proc
    finally:
        proc.stop()


def test_unreachable_database_is_503_never_500(api_without_database) -> None:
    base, proc = api_without_database
    # Checking any key needs the database, so even a made-up one gets 503, not 401.
    auth = {"Authorization": "Bearer ldr_" + "x" * 43}
    r = httpx.get(f"{base}/v1/jobs", headers=auth)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "database_unavailable"
    assert "Traceback" not in r.text
    r = httpx.post(f"{base}/v1/jobs", headers=auth, json={"kind": "pretrain", "spec": PRETRAIN})
    assert r.status_code == 503
    # The event-loop read path (api/reads.py) too, and promptly: a refused connection
    # is not waited on.
    started = time.monotonic()
    r = httpx.get(f"{base}/v1/jobs/{'0' * 32}", headers=auth)
    assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
    assert r.headers["Retry-After"] == "5" and "Traceback" not in r.text
    assert time.monotonic() - started < 4

    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] != "ok" and ready.json()["checks"]["broker"] == "ok"
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert proc.alive()


def test_readyz_is_200_with_database_and_broker_up(api_server: str) -> None:
    r = httpx.get(f"{api_server}/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}


def test_unexpected_errors_are_a_generic_500_without_details(service_env: dict[str, str]) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from service.settings import Settings

    app = create_app(Settings(database_url=service_env["LDREG_DATABASE_URL"]))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internal detail")

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal_error", "message": "internal server error"}}
