"""The scheduler with real processes: the worker registry, claims chosen by the fair-
share policy, multi-device jobs on a worker with several devices, preemption that
resumes, refusal of jobs no worker can hold, and what GET /v1/workers and
``ldreg queue`` show. Timings from ``service_env``: heartbeat 1 s, stale after 6 s,
sweep every 1 s.
"""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest
from conftest import LDREG, finished, wait_for
from sqlalchemy import select
from test_faults import metric_rows, wait_training_steps
from test_worker import events, submit, tiny_spec

from service.db import session_scope
from service.models import Job, JobEvent

pytestmark = pytest.mark.service


def small(epochs: int = 1, **overrides) -> dict:
    """Trains in a second or two on one core."""
    spec = tiny_spec(epochs=epochs, batch_size=32, **overrides)
    spec["dataset"] = {"name": "digits", "image_size": 8}
    spec["width"] = 4
    spec["ldreg"] = {"alpha": 0.01, "k": 8, "warmup_epochs": 0}
    spec["eval"] = {"lid_k": [8], "knn_k": [5], "max_samples": 100}
    return spec


def node(proc) -> str:
    return f"ldreg-cpu-{proc.pid}@"


def live_workers(client: httpx.Client, *procs, timeout: float = 60) -> list[dict]:
    """Until every one of ``procs`` is registered; returns GET /v1/workers."""
    deadline = time.monotonic() + timeout
    while True:
        rows = client.get("/v1/workers").json()["workers"]
        if all(any(w["id"].startswith(node(p)) for w in rows) for p in procs):
            return rows
        for p in procs:
            assert p.alive(), p.log()[-4000:]
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)


def worker_row(rows: list[dict], proc) -> dict:
    return next(w for w in rows if w["id"].startswith(node(proc)))


def claims(pg_url: str, job_ids: list[str]) -> list[tuple[str, str]]:
    """(job id, reason) of every claim of these jobs, in the order they happened."""
    with session_scope(pg_url) as s:
        rows = s.execute(
            select(JobEvent.job_id, JobEvent.reason)
            .where(JobEvent.job_id.in_(job_ids), JobEvent.to_state == "running")
            .order_by(JobEvent.id)
        ).all()
    return [(r[0], r[1]) for r in rows]


def test_a_two_device_worker_runs_a_two_process_job_the_small_one_never_takes_it(
    client: httpx.Client, new_team, start_worker, pg_url: str, service_env: dict[str, str]
) -> None:
    big = start_worker(LDREG_WORKER_DEVICES="2")
    little = start_worker()
    rows = live_workers(client, big, little)
    assert worker_row(rows, big)["gpus"] == 2 and worker_row(rows, little)["gpus"] == 1
    assert {worker_row(rows, p)["state"] for p in (big, little)} == {"idle"}

    # Too large for every live worker: refused at submission, naming the largest.
    r = client.post("/v1/jobs", json={"kind": "pretrain", "spec": small(devices=4)})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "spec.resources.gpus"
    assert worker_row(rows, big)["id"] in err["message"] and "has 2 GPUs" in err["message"]

    job_id = submit(client, small(epochs=2, resources={"gpus": 2}), name="two ranks")
    job = wait_for(client, job_id, lambda j: j["state"] != "queued", worker=big, timeout=60)
    assert job["spec"]["devices"] == 2 and job["spec"]["resources"]["gpus"] == 2
    assert job["worker"].startswith(node(big))

    # While it runs: its own team sees it by id; another team sees a busy worker only.
    other, _ = new_team()
    mine = worker_row(client.get("/v1/workers").json()["workers"], big)
    theirs_rows = other.get("/v1/workers").json()["workers"]
    theirs = worker_row(theirs_rows, big)
    assert job["state"] == "running", job  # it trains for seconds after its start
    assert mine["state"] == "busy" and mine["free_gpus"] == 0
    assert [j["id"] for j in mine["jobs"]] == [job_id] and mine["jobs"][0]["devices"] == "0,1"
    assert theirs["state"] == "busy" and theirs["jobs"] == [] and theirs["other_jobs"] == 1
    assert job_id not in str(theirs_rows)
    assert worker_row(theirs_rows, little)["state"] == "idle"

    job = wait_for(client, job_id, finished, worker=big)
    assert job["state"] == "succeeded", job
    assert job["attempt"] == 1
    # One claim, by the two-device worker; the other never took it.
    assert [reason for _, reason in claims(pg_url, [job_id])] == [
        f"claimed by worker {job['worker']}"
    ]
    with session_scope(pg_url) as s:
        assert s.get(Job, job_id).devices == "0,1"


def test_three_teams_start_in_fair_share_order(new_team, start_worker, pg_url: str) -> None:
    teams = [new_team()[0] for _ in range(3)]
    team_of: dict[str, int] = {}
    # Each team submits its two jobs back to back: first come, first served would run
    # them team by team (A A B B C C).
    for t, c in enumerate(teams):
        for i in range(2):
            team_of[submit(c, small(), name=f"team {t} job {i}")] = t
    worker = start_worker()  # one slot
    for job_id, t in team_of.items():
        assert wait_for(teams[t], job_id, finished, worker=worker)["state"] == "succeeded"
    order = [team_of[j] for j, _ in claims(pg_url, list(team_of))]
    assert len(order) == 6, order
    # Round-robin: every team once, then every team again; not A A B B C C.
    assert sorted(order[:3]) == [0, 1, 2], order
    assert sorted(order[3:]) == [0, 1, 2], order
    assert teams[0].get("/v1/queue").json()["jobs"] == []


def test_queue_shows_positions_and_reasons(
    client: httpx.Client, start_worker, service_env: dict[str, str], api_server: str, new_team
) -> None:
    worker = start_worker()
    live_workers(client, worker)
    running = submit(client, small(epochs=200), name="long")
    wait_for(client, running, lambda j: j["state"] == "running", worker=worker, timeout=60)
    first = submit(client, small(), name="next")
    second = submit(client, small(), name="after")
    other, _ = new_team()
    theirs = submit(other, small(), name="theirs")

    view = client.get("/v1/queue").json()
    assert [j["id"] for j in view["jobs"]] == [first, second]
    assert view["queued_total"] == 3 and view["queued_other_teams"] == 1
    assert theirs not in str(view)
    positions = [j["position"] for j in view["jobs"]]
    assert positions == sorted(positions) and all(p is not None for p in positions)
    assert view["jobs"][0]["reason"]
    listed = {j["id"]: j for j in client.get("/v1/jobs").json()["jobs"]}
    assert listed[first]["queue_reason"] == view["jobs"][0]["reason"]

    key = client.headers["Authorization"].removeprefix("Bearer ")
    out = subprocess.run(
        [LDREG, "queue"],
        env={**service_env, "LDREG_URL": api_server, "LDREG_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "3 queued (1 of other teams)" in lines[0]
    assert any(line.split()[1] == first[:12] for line in lines[2:]), out.stdout
    assert view["jobs"][0]["reason"] in out.stdout
    out = subprocess.run(
        [LDREG, "workers"],
        env={**service_env, "LDREG_URL": api_server, "LDREG_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert node(worker) in out.stdout and running[:8] in out.stdout and "busy" in out.stdout
    for job_id in (running, first, second):
        client.post(f"/v1/jobs/{job_id}/cancel")
    other.post(f"/v1/jobs/{theirs}/cancel")


def test_a_high_priority_job_preempts_a_preemptible_one_which_resumes(
    client: httpx.Client, new_team, start_worker, pg_url: str
) -> None:
    epochs = 6
    worker = start_worker()
    live_workers(client, worker)
    low = submit(client, small(epochs=epochs, resources={"preemptible": True}), name="preemptible")
    wait_training_steps(pg_url, low, worker)
    urgent_client, _ = new_team()
    urgent = submit(urgent_client, small(resources={"priority": 5}), name="urgent")

    job = wait_for(urgent_client, urgent, finished, worker=worker)
    assert job["state"] == "succeeded", job
    job = wait_for(client, low, finished, worker=worker)
    assert job["state"] == "succeeded", job

    evs = events(client, low)
    handed_back = [e for e in evs if e["from_state"] == "running" and e["to_state"] == "queued"]
    assert handed_back and f"preempted for job {urgent}" in handed_back[0]["reason"], evs
    # The preempting job started while the preempted one waited.
    order = [j for j, _ in claims(pg_url, [low, urgent])]
    assert order[:3] == [low, urgent, low], order
    # Not counted against max_attempts; every epoch's metrics exactly once.
    with session_scope(pg_url) as s:
        row = s.get(Job, low)
        assert row.max_attempts == 4 and not row.preempt_requested
    assert [e for e, _ in metric_rows(pg_url, low)] == list(range(1, epochs + 1))
