"""End to end through real processes: HTTP API (uvicorn) → Redis → Celery worker → PostgreSQL.

A team submits a small LDReg pretraining job over HTTP; a real ``ldreg worker`` runs
it; the API then shows its metrics, events and artifacts.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import LDREG, ServiceProcess, finished, free_port, wait_for
from sqlalchemy import select

from service.db import session_scope
from service.models import Job, JobEvent
from service.queue import enqueue_job
from service.settings import Settings

pytestmark = pytest.mark.service

FIXED_METRICS = {
    "loss",
    "ssl_loss",
    "ldreg_loss",
    "lid_gmean_k8",
    "lid_gmean_k32",
    "effective_rank",
    "knn_acc",
    "online_probe_acc",
}


def epoch_values(points: list[dict]) -> dict[int, dict]:
    """Each epoch's value: the last point (by step) of the series in that epoch."""
    return {p["epoch"]: p for p in sorted(points, key=lambda p: p["step"])}


def tiny_spec(epochs: int = 3, **overrides) -> dict:
    """A pretrain spec that trains in seconds on one CPU core."""
    spec = {
        "method": "simclr",
        "backbone": "resnet18",
        "width": 8,
        "dataset": {"name": "digits", "image_size": 8},
        "epochs": epochs,
        "batch_size": 128,
        "optimizer": {"name": "sgd", "lr": 0.05},
        # The warm-up must be below epochs (a 1-epoch job has none).
        "ldreg": {"alpha": 0.01, "k": 16, "warmup_epochs": min(1, epochs - 1)},
        "eval": {"lid_k": [8, 32], "knn_k": [5], "max_samples": 300},
        "seed": 0,
    }
    spec.update(overrides)
    return spec


def submit(client: httpx.Client, spec: dict, name: str = "test") -> str:
    r = client.post("/v1/jobs", json={"kind": "pretrain", "name": name, "spec": spec})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def events(client: httpx.Client, job_id: str) -> list[dict]:
    return client.get(f"/v1/jobs/{job_id}/events").json()["events"]


def test_submit_run_and_inspect_a_pretrain_job_delivered_three_times(
    client: httpx.Client, start_worker, service_env: dict[str, str], pg_url: str
) -> None:
    job_id = submit(client, tiny_spec(epochs=3))
    # The API published the id once; the broker delivers it twice more (a re-publish
    # by the sweeper, a redelivery after a lost connection...). One execution only.
    settings = Settings(**_settings_kwargs(service_env))
    enqueue_job(settings, job_id, "cpu")
    enqueue_job(settings, job_id, "cpu")
    worker = start_worker()
    job = wait_for(client, job_id, finished, worker=worker)
    assert job["state"] == "succeeded", job
    assert job["attempt"] == 1 and job["error"] is None

    # The child that ran the job exits (one job per child); its replacement is forked
    # within a second, not at the pool's next 5 s maintenance (PromptRespawn), so the
    # next job does not wait for a child.
    with session_scope(pg_url) as s:
        job_child = int(s.get(Job, job_id).worker.rsplit(":", 1)[1])
    deadline = time.monotonic() + 30
    while job_child in pool_children(worker.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    gone = time.monotonic()  # exited (a zombie until reaped counts as gone)
    assert job_child not in pool_children(worker.pid)
    while not pool_children(worker.pid) and time.monotonic() < gone + 5:
        time.sleep(0.02)
    assert pool_children(worker.pid), "no replacement child"
    assert time.monotonic() - gone < 1.5, f"replacement after {time.monotonic() - gone:.1f} s"
    assert job["progress"]["epoch"] == job["progress"]["epochs"] == 3
    assert job["summary"]["knn_acc"] > 0.1 and "lid_gmean_k32" in job["summary"]

    series = client.get(f"/v1/jobs/{job_id}/metrics").json()["series"]
    assert set(series) >= FIXED_METRICS, sorted(series)
    for name in FIXED_METRICS:
        # An epoch's value is the series' last point in it, at the global step that
        # ends it; the evaluations have no other point.
        ends = epoch_values(series[name])
        assert sorted(ends) == [1, 2, 3], (name, series[name])
        assert len({p["step"] for p in ends.values()}) == 3
    # The training terms also have a point at every step (a short epoch keeps them all).
    steps = [p["step"] for p in series["loss"]]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > 3, steps
    assert [p["epoch"] for p in series["knn_acc"]] == [1, 2, 3]
    # The offline probe is fitted once, at the end, with the L2 weight it chose.
    assert [p["epoch"] for p in series["linear_probe_acc"]] == [3]
    assert [p["epoch"] for p in series["linear_probe_l2"]] == [3]
    # LDReg is off during its one warm-up epoch and on afterwards.
    ldreg = [p["value"] for p in epoch_values(series["ldreg_loss"]).values()]
    assert ldreg[0] == 0.0 and ldreg[1] < 0.0

    evs = events(client, job_id)
    assert [(e["from_state"], e["to_state"], e["attempt"]) for e in evs] == [
        (None, "queued", 0),
        ("queued", "running", 1),
        ("running", "succeeded", 1),
    ]

    artifacts = {
        a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]
    }
    assert "backbone.pt" in artifacts and "checkpoints/epoch_0003.pt" in artifacts
    r = client.get(f"/v1/jobs/{job_id}/artifacts/backbone.pt")
    assert r.status_code == 200 and len(r.content) == artifacts["backbone.pt"]["size"]

    # Both extra messages were consumed as no-ops.
    deadline = time.monotonic() + 30
    while worker.log().count("not claimable") < 2 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert worker.log().count("not claimable") == 2, worker.log()[-3000:]

    # The Celery parent never loaded torch (CUDA must not be initialised before a
    # fork); the job ran in a child that did.
    maps = Path(f"/proc/{worker.pid}/maps").read_text()
    assert "libtorch" not in maps
    with session_scope(pg_url) as s:
        ran_in = s.get(Job, job_id).worker
    assert ran_in.startswith(f"ldreg-cpu-{worker.pid}@") and ran_in.rsplit(":", 1)[1] != str(
        worker.pid
    )


def pool_children(pid: int) -> set[int]:
    """The Celery parent's live pool children: its other child, the sweeper, and
    children that exited but are not reaped yet (zombies) left out."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if state != "Z" and b"worker.sweeper" not in cmdline:
                    found.add(int(child))
    return found


def _settings_kwargs(env: dict[str, str]) -> dict:
    return {
        "database_url": env["LDREG_DATABASE_URL"],
        "broker_url": env["LDREG_BROKER_URL"],
        "home": Path(env["LDREG_HOME"]),
    }


def start_until(
    args: list[str], env: dict[str, str], log: Path, ready: str, timeout: float
) -> ServiceProcess:
    """Start ``args`` in its own session, output to ``log``; return once ``ready`` is
    in the log (the test fails if the process exits or ``timeout`` passes first)."""
    proc = ServiceProcess(args, env, log).start()
    deadline = time.monotonic() + timeout
    while ready not in log.read_text(errors="replace"):
        if not proc.alive() or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {ready!r} within {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    return proc


def test_serve_stops_an_idle_embedded_worker_promptly(tmp_path: Path) -> None:
    """What Ctrl-C on ``ldreg serve`` does to its worker (cli.service._stop), with the
    embedded default (SQLite, filesystem broker) and the pool child idle."""
    from cli.service import _stop

    env = {k: v for k, v in os.environ.items() if not k.startswith("LDREG_")}
    env.update(LDREG_HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    log = tmp_path / "worker.log"
    worker = start_until([LDREG, "worker", "--queues", "cpu"], env, log, "worker ready", 60)
    try:
        time.sleep(2)  # its pool child is up and waiting for work
        started = time.monotonic()
        _stop([worker])
        # A clean warm shutdown, not _stop's SIGKILL after 30 s.
        assert worker.returncode == 0, log.read_text()[-3000:]
        assert time.monotonic() - started < 15
        # ...in which the idle pool child exits on its own, not as an ERROR about a
        # child killed by SIGTERM.
        errors = [line for line in log.read_text().splitlines() if "ERROR" in line]
        assert errors == [], errors
        # kombu's warning about the filesystem transport having no host is filtered.
        assert "No hostname was supplied" not in log.read_text()
        time.sleep(0.5)
        assert processes_with_env(f"LDREG_HOME={tmp_path}") == []
    finally:
        worker.kill()


def processes_with_env(entry: str) -> list[int]:
    """Pids of live processes whose environment contains ``entry``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if entry.encode() in environ and state != "Z":
            found.append(int(proc.name))
    return found


def test_serve_demo_on_the_embedded_default(tmp_path: Path) -> None:
    """`ldreg serve --demo` (the README's first command) on SQLite and the filesystem
    broker: it prints a working key and job URL, runs the job, and Ctrl-C stops every
    process it started, handing the running job back to the queue."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDREG_")}
    env.update(LDREG_HOME=str(tmp_path), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    port = free_port()
    log = tmp_path / "serve.log"
    serve = start_until(
        [LDREG, "serve", "--port", str(port), "--demo"], env, log, "serving; press Ctrl-C", 120
    )
    deadline = time.monotonic() + 120
    try:
        text = log.read_text()
        key = re.search(r"API key \(kept in [^)]*\):\s+(\S+)", text).group(1)
        url = re.search(r"(http://127\.0\.0\.1:\d+/v1/jobs/\w+)", text).group(1)
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
            while (job := c.get(url).json())["progress"]["epoch"] < 1:
                assert time.monotonic() < deadline + 120, (job, log.read_text()[-4000:])
                assert job["state"] in ("queued", "running"), job
                time.sleep(0.5)
        assert job["spec"]["ldreg"]["k"] == 32 and job["spec"]["epochs"] == 5

        serve.popen.send_signal(signal.SIGINT)  # Ctrl-C
        assert serve.popen.wait(60) == 0
        # What a new user reads: no ERROR on the way out, no hostless-broker warnings.
        text = log.read_text()
        assert [line for line in text.splitlines() if "ERROR" in line] == []
        assert "No hostname was supplied" not in text
        # Every process serve started is gone (API, worker, its child, the sweeper).
        time.sleep(1)
        assert processes_with_env(f"LDREG_HOME={tmp_path}") == []
        with session_scope(f"sqlite:///{tmp_path / 'ldreg.sqlite'}") as s:
            job_row = s.get(Job, job["id"])
            last = s.scalars(
                select(JobEvent).where(JobEvent.job_id == job_row.id).order_by(JobEvent.id.desc())
            ).first()
            assert job_row.state == "queued", (job_row.state, last.reason)
            assert "shutting down" in last.reason
    finally:
        serve.kill()


def test_serve_demo_twice_with_port_8000_taken_reuses_its_key_and_job(tmp_path: Path) -> None:
    """What a newcomer meets when something else holds port 8000: a free port is used
    and printed; a second run prints the same key (kept in LDREG_HOME) and the same job
    instead of queueing another; asking for a taken port fails at once, naming it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDREG_")}
    env.update(LDREG_HOME=str(tmp_path), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.0.1", 8000))
            holder.listen()
        except OSError:
            pass  # already held by another process: the same situation
        taken = subprocess.run(
            [LDREG, "serve", "--demo", "--port", "8000"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert taken.returncode == 2
        assert "port 8000 on 127.0.0.1 is already in use" in taken.stderr
        assert "--port N" in taken.stderr

        seen = []
        for run in range(2):
            log = tmp_path / f"serve-{run}.log"
            serve = start_until([LDREG, "serve", "--demo"], env, log, "serving; press", 120)
            try:
                text = log.read_text()
                assert "port 8000 is in use by another process; serving on" in text
                base = re.search(r"API on (http://127\.0\.0\.1:\d+)", text).group(1)
                assert not base.endswith(":8000")
                key = re.search(r"API key \(kept in [^)]*\):\s+(\S+)", text).group(1)
                job_url = re.search(rf"({re.escape(base)}/v1/jobs/\w+)", text).group(1)
                r = httpx.get(job_url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
                assert r.status_code == 200, r.text
                seen.append((key, job_url.rsplit("/", 1)[1], "earlier run" in text))
                # No access log lines bury the key in the demo's console.
                assert '"GET /v1/jobs' not in text and 'HTTP/1.1" 200' not in text
            finally:
                serve.popen.send_signal(signal.SIGINT)
                serve.popen.wait(60)
                serve.kill()
    (key1, job1, reused1), (key2, job2, reused2) = seen
    assert key1 == key2 and job1 == job2
    assert (reused1, reused2) == (False, True)
    assert (tmp_path / "demo-api-key").stat().st_mode & 0o077 == 0


def test_a_gpu_queue_worker_that_sees_no_gpu_says_so_at_start(start_worker) -> None:
    worker = start_worker(queues="gpu", CUDA_VISIBLE_DEVICES="")
    deadline = time.monotonic() + 60
    while "worker ready" not in worker.log():
        assert time.monotonic() < deadline and worker.alive(), worker.log()[-3000:]
        time.sleep(0.2)
    warnings = [line for line in worker.log().splitlines() if "sees no GPU" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], worker.log()[-3000:]
