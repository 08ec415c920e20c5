"""Faults, for real: SIGKILL a worker mid-training, lose every broker message, cancel a
running job, stop a worker with SIGTERM. Nothing may be lost, duplicated or stuck.

Timings come from ``service_env``: heartbeat 1 s, stale after 6 s, sweep every 1 s.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis
from conftest import finished, wait_for
from sqlalchemy import select
from test_worker import events, submit, tiny_spec

from service.db import session_scope
from service.models import Job, Metric

pytestmark = pytest.mark.service


def checkpoint_epochs(home: Path, job_id: str) -> list[int]:
    """Epochs with a complete checkpoint (the checksum sidecar is written last)."""
    folder = home / "artifacts" / "jobs" / job_id / "checkpoints"
    return sorted(
        int(m.group(1))
        for p in folder.glob("epoch_*.pt.sha256")
        if (m := re.match(r"epoch_(\d+)\.pt\.sha256$", p.name))
    )


def metric_rows(pg_url: str, job_id: str, name: str = "epoch_seconds") -> list[tuple[int, int]]:
    """(epoch, attempt) of every point of the series, by step; ``epoch_seconds`` has one
    point per epoch (the loss terms have one per step as well)."""
    with session_scope(pg_url) as s:
        rows = s.execute(
            select(Metric.epoch, Metric.attempt)
            .where(Metric.job_id == job_id, Metric.name == name)
            .order_by(Metric.step)
        ).all()
    return [tuple(r) for r in rows]


def wait_training_steps(pg_url: str, job_id: str, worker, timeout: float = 150) -> None:
    """Until the job's heartbeat has carried step progress (training proper runs)."""
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(pg_url) as s:
            fraction = s.get(Job, job_id).progress_fraction
        if fraction:
            return
        assert time.monotonic() < deadline and worker.alive(), worker.log()[-4000:]
        time.sleep(0.2)


def test_sigkilled_worker_resumes_from_checkpoint(
    client: httpx.Client, start_worker, service_home: Path, pg_url: str
) -> None:
    epochs = 5
    job_id = submit(client, tiny_spec(epochs=epochs), name="kill me")
    first = start_worker()
    deadline = time.monotonic() + 120
    while not checkpoint_epochs(service_home, job_id):
        assert time.monotonic() < deadline and first.alive(), first.log()[-4000:]
        time.sleep(0.1)
    first.kill(signal.SIGKILL)  # the main process and its forked child, no cleanup
    first.popen.wait(10)
    resume_from = max(checkpoint_epochs(service_home, job_id))
    assert resume_from < epochs, "killed too late to test a resume"
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "running"  # as far as the DB knows

    killed_at = time.monotonic()
    second = start_worker()
    job = wait_for(client, job_id, finished, worker=second)
    assert job["state"] == "succeeded", job
    assert job["attempt"] == 2
    assert job["progress"]["epoch"] == epochs

    evs = [(e["from_state"], e["to_state"], e["attempt"]) for e in events(client, job_id)]
    assert evs == [
        (None, "queued", 0),
        ("queued", "running", 1),
        ("running", "queued", 1),
        ("queued", "running", 2),
        ("running", "succeeded", 2),
    ]
    requeue = events(client, job_id)[2]
    assert "heartbeat stale" in requeue["reason"]

    # Every epoch exactly once; those before the checkpoint were not re-run (still
    # written by attempt 1), the rest were trained by attempt 2.
    rows = metric_rows(pg_url, job_id)
    assert [epoch for epoch, _ in rows] == list(range(1, epochs + 1))
    assert rows == [(e, 1 if e <= resume_from else 2) for e in range(1, epochs + 1)]
    # The per-step points too: every step of an epoch written by the attempt that
    # trained it (what the killed attempt wrote of a later epoch was overwritten).
    steps = metric_rows(pg_url, job_id, "loss")
    assert sorted({e for e, _ in steps}) == list(range(1, epochs + 1))
    assert all(a == (1 if e <= resume_from else 2) for e, a in steps), steps
    # Each attempt has a log of its own; the second says where it resumed.
    logs = service_home / "artifacts" / "jobs" / job_id / "logs"
    assert "claimed" in (logs / "attempt-1.log").read_text()
    log = (logs / "attempt-2.log").read_text()
    assert f"resuming from the checkpoint of epoch {resume_from}" in log
    # Recovery was bounded: stale (6 s) + sweep (1 s) + startup + the remaining epochs.
    assert time.monotonic() - killed_at < 150


def test_jobs_survive_losing_every_broker_message(
    client: httpx.Client, start_worker, redis_url: str, pg_url: str
) -> None:
    r = redis.Redis.from_url(redis_url)
    ids = [submit(client, tiny_spec(epochs=1), name=f"lost {i}") for i in range(2)]
    assert r.llen("cpu") >= 2  # the API published them; no worker is running
    # What a restart of a Redis that keeps nothing on disk does to queued messages.
    r.flushdb()
    assert r.llen("cpu") == 0

    # The sweeper re-publishes queued jobs whose message is older than this.
    worker = start_worker(LDREG_REQUEUE_AFTER_SECONDS="2")
    for job_id in ids:
        job = wait_for(client, job_id, finished, worker=worker)
        assert job["state"] == "succeeded" and job["attempt"] == 1, job
    # Each lost message was re-published. A message only wakes a slot, which claims the
    # job the scheduler ranks first (service/claiming.py): the second job's message
    # may wake the slot that takes the first, and the second is then re-published once
    # more; a spare message claims nothing. Either way each job ran once (attempt 1).
    assert 2 <= worker.log().count("its message is gone, re-published") <= 3


def test_cancel_running_job_frees_the_worker(
    client: httpx.Client, start_worker, pg_url: str, redis_url: str
) -> None:
    r = redis.Redis.from_url(redis_url)
    long_id = submit(client, tiny_spec(epochs=200), name="long")
    worker = start_worker()
    wait_training_steps(pg_url, long_id, worker)

    next_id = submit(client, tiny_spec(epochs=1), name="next")
    time.sleep(2)
    # Early ack: the running job's message is acknowledged, so no visibility timeout
    # can ever re-deliver it; and the busy worker reserved nothing more, so the next
    # job stays in Redis for any idle worker to take.
    assert r.hlen("unacked") == 0
    assert r.llen("cpu") == 1
    assert client.get(f"/v1/jobs/{next_id}").json()["state"] == "queued"

    asked = time.monotonic()
    resp = client.post(f"/v1/jobs/{long_id}/cancel")
    assert resp.status_code == 200, resp.text
    job = wait_for(client, long_id, finished, timeout=30, worker=worker)
    took = time.monotonic() - asked
    assert job["state"] == "cancelled", job
    assert took < 10, f"cancellation took {took:.1f}s"
    assert job["progress"]["epoch"] < 200
    assert events(client, long_id)[-1]["to_state"] == "cancelled"

    # The same worker process is free and runs the next job.
    assert wait_for(client, next_id, finished, worker=worker)["state"] == "succeeded"
    with session_scope(pg_url) as s:
        a, b = (s.get(Job, long_id).worker, s.get(Job, next_id).worker)
    node = f"ldreg-cpu-{worker.pid}@"
    assert a.startswith(node) and b.startswith(node)
    # ...each job in a fresh child process (max_tasks_per_child=1).
    assert a.rsplit(":", 1)[1] != b.rsplit(":", 1)[1]


def test_sigterm_hands_the_running_job_back(
    client: httpx.Client, start_worker, service_home: Path, pg_url: str
) -> None:
    # Epochs enough that the SIGTERM lands in training, not in the final evaluation
    # (after the last stop check a job finishes: it is handed back only from training).
    epochs = 6
    job_id = submit(client, tiny_spec(epochs=epochs), name="deploy")
    first = start_worker()
    wait_training_steps(pg_url, job_id, first)
    # docker stop: SIGTERM to the main process only; it must tell its child.
    os.kill(first.pid, signal.SIGTERM)
    assert first.popen.wait(60) == 0
    # A clean stop: no pool child died of a signal (the pool logs that as an ERROR).
    assert [line for line in first.log().splitlines() if "ERROR" in line] == []
    # Handed back at once (no wait for a stale heartbeat), without using up an attempt.
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "queued", job
    last = events(client, job_id)[-1]
    assert last["to_state"] == "queued" and "shutting down" in last["reason"]
    with session_scope(pg_url) as s:
        assert s.get(Job, job_id).max_attempts == 4

    second = start_worker()
    job = wait_for(client, job_id, finished, worker=second)
    assert job["state"] == "succeeded" and job["attempt"] == 2
    assert [e for e, _ in metric_rows(pg_url, job_id)] == list(range(1, epochs + 1))
