"""/metrics and the JSON logs, against the real API process, PostgreSQL and Redis.

/metrics is unauthenticated Prometheus text: request counters by route template and
status, and gauges read from the database and the broker at scrape time, which must
equal what a direct query of PostgreSQL and Redis says.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter as Tally
from datetime import timedelta
from pathlib import Path

import httpx
import redis
from conftest import LDREG, ServiceProcess, free_port, wait_http_ok
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from service.db import session_scope
from service.models import Job, JobState, Metric, utcnow

PRETRAIN = {"method": "simclr", "epochs": 2, "batch_size": 32, "ldreg": {"k": 8}}


def scrape(api_server: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, keyed by (sample name, labels)."""
    r = httpx.get(f"{api_server}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def submit(client: httpx.Client) -> str:
    r = client.post("/v1/jobs", json={"kind": "pretrain", "spec": PRETRAIN})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_metrics_is_unauthenticated_prometheus_text(api_server: str) -> None:
    r = httpx.get(f"{api_server}/metrics")  # no Authorization header
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name for f in text_string_to_metric_families(r.text)}
    assert {
        "ldreg_http_requests",
        "ldreg_http_request_duration_seconds",
        "ldreg_jobs_by_state",
        "ldreg_queue_depth",
        "ldreg_worker_heartbeat_age_seconds_max",
        "ldreg_worker_heartbeat_age_seconds_avg",
        "ldreg_job_epochs_per_hour",
        "ldreg_oldest_queued_job_age_seconds",
    } <= families
    samples = scrape(api_server)
    assert sample(samples, "ldreg_database_up") == 1.0
    assert sample(samples, "ldreg_broker_up") == 1.0


def test_request_counters_are_by_route_template_and_status(
    api_server: str, client: httpx.Client
) -> None:
    before = scrape(api_server)
    missing = [uuid.uuid4().hex for _ in range(3)]
    for job_id in missing:
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    for _ in range(2):
        assert client.get("/v1/jobs").status_code == 200
    assert httpx.get(f"{api_server}/v1/jobs").status_code == 401
    after = scrape(api_server)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    one = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "404"}
    assert delta("ldreg_http_requests_total", **one) == 3
    assert delta("ldreg_http_request_duration_seconds_count", **one) == 3
    assert delta("ldreg_http_request_duration_seconds_sum", **one) > 0
    listing = {"method": "GET", "route": "/v1/jobs"}
    assert delta("ldreg_http_requests_total", **listing, status="200") == 2
    assert delta("ldreg_http_requests_total", **listing, status="401") == 1
    # Raw paths never become labels (a scan of random ids cannot explode the series).
    assert not any(job_id in str(key) for key in after for job_id in missing)


def test_jobs_by_state_gauges_match_the_database(
    api_server: str, client: httpx.Client, pg_url: str
) -> None:
    ids = [submit(client) for _ in range(3)]
    assert client.post(f"/v1/jobs/{ids[0]}/cancel").json()["state"] == "cancelled"

    def from_db() -> Tally:
        with session_scope(pg_url) as s:
            rows = s.execute(
                select(Job.state, Job.kind, func.count()).group_by(Job.state, Job.kind)
            )
            return Tally({(state, kind): n for state, kind, n in rows})

    # Scrape between two identical reads of the database, so a concurrent change
    # (none is expected) cannot make the comparison flaky.
    for _ in range(5):
        db_before = from_db()
        samples = scrape(api_server)
        if from_db() == db_before:
            break
    gauges = Tally(
        {
            (labels["state"], labels["kind"]): value
            for (name, label_set), value in samples.items()
            if name == "ldreg_jobs_by_state" and value
            for labels in [dict(label_set)]
        }
    )
    assert gauges == db_before
    assert db_before[("cancelled", "pretrain")] >= 1 and db_before[("queued", "pretrain")] >= 2
    # Every state is exported, zeros included, so alerts never see a missing series.
    states = {dict(k[1])["state"] for k in samples if k[0] == "ldreg_jobs_by_state"}
    assert states == {s.value for s in JobState}
    for job_id in ids[1:]:
        client.post(f"/v1/jobs/{job_id}/cancel")


def test_queue_depth_is_the_length_of_the_redis_queue(
    api_server: str, client: httpx.Client, redis_url: str
) -> None:
    broker = redis.Redis.from_url(redis_url)
    job_id = submit(client)  # no worker runs here: the message waits in the "cpu" list
    samples = scrape(api_server)
    assert sample(samples, "ldreg_queue_depth", queue="cpu") == broker.llen("cpu") >= 1
    assert sample(samples, "ldreg_queue_depth", queue="gpu") == broker.llen("gpu")
    client.post(f"/v1/jobs/{job_id}/cancel")


def test_running_jobs_report_epochs_per_hour_and_heartbeat_age(
    api_server: str, client: httpx.Client, pg_url: str
) -> None:
    job_id = submit(client)
    now = utcnow()
    # What a worker would have written: running for 2 hours, 4 epochs done, last
    # heartbeat 100 s ago.
    with session_scope(pg_url) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state="running",
                attempt=1,
                progress_epoch=4,
                started_at=now - timedelta(hours=2),
                heartbeat_at=now - timedelta(seconds=100),
            )
        )
    try:
        samples = scrape(api_server)
        rate = sample(samples, "ldreg_job_epochs_per_hour", job_id=job_id, kind="pretrain")
        assert abs(rate - 2.0) < 0.01
        assert sample(samples, "ldreg_running_jobs") >= 1
        assert sample(samples, "ldreg_worker_heartbeat_age_seconds_max") >= 100
        assert sample(samples, "ldreg_worker_heartbeat_age_seconds_avg") > 0

        # Once the worker reports epoch durations, the rate follows them (10 min/epoch).
        with session_scope(pg_url) as s:
            s.add_all(
                Metric(job_id=job_id, name="epoch_seconds", epoch=e, step=e, value=600.0, attempt=1)
                for e in (1, 2, 3, 4)
            )
        rate = sample(
            scrape(api_server), "ldreg_job_epochs_per_hour", job_id=job_id, kind="pretrain"
        )
        assert abs(rate - 6.0) < 1e-9
    finally:
        # Not left "running": a later test's worker sweeper would pick it up.
        with session_scope(pg_url) as s:
            s.execute(
                update(Job).where(Job.id == job_id).values(state="cancelled", finished_at=utcnow())
            )


def test_api_log_lines_are_json(api_server: str, service_home: Path) -> None:
    path = f"/metrics?probe={uuid.uuid4().hex}"
    httpx.get(f"{api_server}{path}")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = [
            json.loads(line)
            for line in (service_home / "api.log").read_text().splitlines()
            if line.startswith("{")
        ]
        access = [r for r in records if path in r.get("event", "")]
        if access:
            break
        time.sleep(0.1)
    assert access, "the request's access-log line never appeared"
    assert access[0]["service"] == "api" and access[0]["logger"] == "uvicorn.access"
    assert {"timestamp", "level"} <= set(access[0])


def test_api_access_log_can_be_turned_off(service_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "api.log"
    proc = ServiceProcess(
        [LDREG, "api", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
        service_env,
        log,
    ).start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/healthz", proc=proc)
        for _ in range(3):
            assert httpx.get(f"{base}/healthz").status_code == 200
        time.sleep(0.5)  # what would have been logged has been written by now
    finally:
        proc.stop()
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(r["logger"].startswith("uvicorn") for r in records), "no uvicorn lines at all"
    assert not [r for r in records if r["logger"] == "uvicorn.access"]
