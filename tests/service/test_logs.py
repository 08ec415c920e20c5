"""GET /v1/jobs/{id}/logs, POST /v1/jobs?dry_run=true and a failed job's error kind,
against the real API process (uvicorn, PostgreSQL). No worker runs: a job's attempt,
state and log file are written where a worker would write them (the database, the
job's folder under the artifact root the API shares), while the test reads them over
HTTP."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from sqlalchemy import select, update

from service.db import session_scope
from service.models import IdempotencyKey, Job

PRETRAIN = {
    "method": "simclr",
    "backbone": "resnet18",
    "dataset": {"name": "digits"},
    "epochs": 2,
    "batch_size": 32,
    "ldreg": {"alpha": 0.01, "k": 8},
}


def submit(client: httpx.Client, **body) -> dict:
    r = client.post("/v1/jobs", json={"kind": "pretrain", "spec": PRETRAIN, **body})
    assert r.status_code == 201, r.text
    return r.json()


def set_job(pg_url: str, job_id: str, **values) -> None:
    with session_scope(pg_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


def log_file(service_home: Path, job_id: str, attempt: int) -> Path:
    path = service_home / "artifacts" / "jobs" / job_id / "logs" / f"attempt-{attempt}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def test_logs_from_an_offset_whole_lines_tail_and_attempts(
    new_team: Callable[[], tuple[httpx.Client, str]], pg_url: str, service_home: Path
) -> None:
    client, _ = new_team()
    job = submit(client)
    url = f"/v1/jobs/{job['id']}/logs"
    # Queued, never started: an empty log, no attempt yet.
    r = client.get(url)
    assert r.status_code == 200 and r.text == ""
    assert r.headers["content-type"].startswith("text/plain")
    assert (r.headers["x-log-attempt"], r.headers["x-log-offset"]) == ("0", "0")

    set_job(pg_url, job["id"], state="running", attempt=1)
    path = log_file(service_home, job["id"], 1)
    append(path, "one\ntwo\nthr")
    r = client.get(url)
    # While the attempt runs, whole lines only: "thr" is still being written.
    assert r.text == "one\ntwo\n"
    assert r.headers["x-log-attempt"] == "1" and r.headers["x-log-complete"] == "false"
    assert (int(r.headers["x-log-offset"]), int(r.headers["x-log-size"])) == (8, 11)
    append(path, "ee\nfour\n")
    r = client.get(url, params={"since": r.headers["x-log-offset"]})
    assert r.text == "three\nfour\n" and r.headers["x-log-offset"] == "19"
    assert client.get(url, params={"since": 19}).text == ""
    assert client.get(url, params={"tail": 2}).text == "three\nfour\n"

    # A second attempt writes a log of its own; the first stays readable, complete.
    set_job(pg_url, job["id"], attempt=2)
    append(log_file(service_home, job["id"], 2), "resumed\n")
    assert client.get(url).text == "resumed\n"
    first = client.get(url, params={"attempt": 1})
    assert first.text.startswith("one\n") and first.headers["x-log-complete"] == "true"
    r = client.get(url, params={"attempt": 3})
    assert r.status_code == 404 and r.json()["error"]["field"] == "attempt"
    assert client.get(url, params={"since": -1}).status_code == 422

    # Once the job has finished its last line counts even without a newline.
    append(log_file(service_home, job["id"], 2), "no newline")
    set_job(pg_url, job["id"], state="failed")
    r = client.get(url, params={"since": len("resumed\n")})
    assert r.text == "no newline" and r.headers["x-log-complete"] == "true"


def test_another_teams_job_log_is_not_found(
    new_team: Callable[[], tuple[httpx.Client, str]], pg_url: str, service_home: Path
) -> None:
    mine, _ = new_team()
    theirs, _ = new_team()
    job = submit(theirs)
    set_job(pg_url, job["id"], state="running", attempt=1)
    append(log_file(service_home, job["id"], 1), "secret\n")
    assert theirs.get(f"/v1/jobs/{job['id']}/logs").text == "secret\n"
    for params in ({}, {"follow": "true"}, {"attempt": 1}):
        r = mine.get(f"/v1/jobs/{job['id']}/logs", params=params)
        assert r.status_code == 404 and "secret" not in r.text, params
        assert r.json()["error"]["code"] == "not_found"
    theirs.post(f"/v1/jobs/{job['id']}/cancel")


def follow(client: httpx.Client, url: str, lines: queue.Queue, **params) -> threading.Thread:
    """Read the followed log in a thread: each line with the time it arrived, then None
    when the stream ended."""

    def run() -> None:
        with client.stream("GET", url, params={"follow": "true", **params}, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.put((time.monotonic(), line))
        lines.put(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_follow_streams_new_lines_as_written_across_attempts_until_the_job_ends(
    new_team: Callable[[], tuple[httpx.Client, str]], pg_url: str, service_home: Path
) -> None:
    client, _ = new_team()
    job = submit(client)
    url = f"/v1/jobs/{job['id']}/logs"
    lines: queue.Queue = queue.Queue()
    # Followed from before the first attempt: it waits for one.
    reader = follow(client, url, lines)
    time.sleep(1.5)
    assert lines.empty()
    set_job(pg_url, job["id"], state="running", attempt=1)
    first = log_file(service_home, job["id"], 1)
    for text in ("claimed\n", "epoch 1 done\n"):
        written = time.monotonic()
        append(first, text)
        at, line = lines.get(timeout=10)
        assert line == text.strip()
        assert at - written < 1.5, "a line reached the follower more than a second late"
    # The attempt is lost; the job is queued again and a second attempt starts: the
    # follower reads the first log to its end, then goes on with the second.
    append(first, "last words")
    set_job(pg_url, job["id"], state="queued")
    time.sleep(1.5)
    set_job(pg_url, job["id"], state="running", attempt=2)
    append(log_file(service_home, job["id"], 2), "resuming\n")
    received = [lines.get(timeout=10)[1] for _ in range(3)]
    assert received == ["last words", "==> attempt 2 <==", "resuming"]
    # The job finishes: the stream ends by itself.
    append(log_file(service_home, job["id"], 2), "succeeded\n")
    set_job(pg_url, job["id"], state="succeeded")
    assert lines.get(timeout=10)[1] == "succeeded"
    assert lines.get(timeout=10) is None
    reader.join(timeout=5)
    assert not reader.is_alive()

    # An explicit attempt is followed until that attempt is over (here: at once).
    done: queue.Queue = queue.Queue()
    follow(client, url, done, attempt=1).join(timeout=10)
    got = []
    while (item := done.get(timeout=5)) is not None:
        got.append(item[1])
    assert got == ["claimed", "epoch 1 done", "last words"]


def test_dry_run_validates_like_a_submit_and_creates_nothing(
    new_team: Callable[[], tuple[httpx.Client, str]], pg_url: str, service_home: Path
) -> None:
    client, team_id = new_team()
    r = client.post(
        "/v1/jobs?dry_run=true",
        json={"kind": "pretrain", "name": "try", "spec": PRETRAIN},
        headers={"Idempotency-Key": "dry-1"},
    )
    assert r.status_code == 200, r.text
    checked = r.json()
    assert checked["valid"] is True and checked["kind"] == "pretrain" and checked["name"] == "try"
    # The spec as a submit would store it: defaults spelled out.
    assert checked["spec"]["epochs"] == 2 and checked["spec"]["optimizer"]["name"] == "lars"
    assert client.get("/v1/jobs").json()["jobs"] == []
    with session_scope(pg_url) as s:
        assert s.scalars(select(Job).where(Job.team_id == team_id)).all() == []
        assert (
            s.scalars(select(IdempotencyKey).where(IdempotencyKey.team_id == team_id)).all() == []
        )

    # Invalid: the usual 422, naming the field, from the spec itself...
    bad = {**PRETRAIN, "ldreg": {"alpha": 0.01, "k": 64}}  # k must be < batch_size
    r = client.post("/v1/jobs?dry_run=true", json={"kind": "pretrain", "spec": bad})
    assert r.status_code == 422 and r.json()["error"]["field"] == "spec.ldreg.k"
    r = client.post(
        "/v1/jobs?dry_run=true", json={"kind": "pretrain", "spec": {**PRETRAIN, "epochs": 0}}
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "spec.epochs"
    # ... and from the checks at the door: a dataset whose files are not there.
    missing = {**PRETRAIN, "dataset": {"name": "cifar10", "path": "no-such-folder"}}
    r = client.post("/v1/jobs?dry_run=true", json={"kind": "pretrain", "spec": missing})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("dataset_not_found", "spec.dataset.path")
    assert client.get("/v1/jobs").json()["jobs"] == []
    # The same request without dry_run creates the job.
    assert client.post("/v1/jobs", json={"kind": "pretrain", "spec": PRETRAIN}).status_code == 201
    assert len(client.get("/v1/jobs").json()["jobs"]) == 1


def test_a_failed_jobs_error_says_whether_a_retry_can_help(
    new_team: Callable[[], tuple[httpx.Client, str]], pg_url: str
) -> None:
    client, _ = new_team()
    kinds = {}
    for code in ("dataset_error", "loss_not_finite", "out_of_memory", "worker_lost"):
        job = submit(client)
        set_job(pg_url, job["id"], state="failed", error_code=code, error_message="...")
        kinds[code] = client.get(f"/v1/jobs/{job['id']}").json()["error"]["kind"]
    assert kinds == {
        "dataset_error": "user",
        "loss_not_finite": "user",
        "out_of_memory": "user",
        "worker_lost": "infrastructure",
    }
