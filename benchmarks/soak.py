"""Fault soak: SIGKILL workers and the API, restart Redis and PostgreSQL, under load.

One command (three to four minutes on the 2-core development machine)::

    .venv/bin/python benchmarks/soak.py
    .venv/bin/python benchmarks/soak.py --seed 7 --keep    # another fault order; keep the logs

It starts a private PostgreSQL (``initdb`` in a temporary folder, run as the
``postgres`` user, 127.0.0.1 only, trust auth) and a private Redis (no persistence) on
free ports, never the machine's 5432 and 6379; migrates a database (``ldreg admin
migrate``), creates a team, and runs ``ldreg api`` and ``--workers`` ``ldreg worker``
processes, each in its own process group, with fast recovery timings (heartbeat 1 s,
stale after 6 s, sweep every 1 s, lost messages re-published after 10 s). Small
pretrain jobs (``SPEC``: 10 epochs, a checkpoint each) go in over HTTP so that before
each fault two jobs train past their first checkpoint, nothing waits in the queue and
one worker is idle. Each of ``--rounds`` rounds has ``--worker-kills`` worker faults and
one of each other kind, in an order drawn from ``--seed``:

* worker: SIGKILL to the group of the worker running a randomly chosen job (Celery
  main, sweeper, the job's child), restarted at once. Recovery: the kill until that
  job runs again at a higher attempt (stale heartbeat, sweep, claim by the idle worker).
* api: SIGKILL, restarted on the same port. Recovery: until ``/healthz`` answers.
* redis: killed, a job submitted while it is down (the API commits it; its message is
  lost), started again empty after ``--outage`` seconds. Recovery: Redis back until
  that job runs (the workers reconnect, the sweeper re-publishes the message).
* postgres: the postmaster's group SIGKILLed (a crash), started again after
  ``--outage`` seconds, longer than a worker's lease, so the jobs training through it
  must stop and resume. Recovery, from PostgreSQL back: ``/readyz`` ready; a job
  submitted then running; every job that trained before the crash progressing again.
* postgres-restart: a clean fast restart (about half a second down), inside a worker's
  lease: the jobs training through it must go on in the same attempt (the run fails if
  either needed another). Recovery: until both are past their epoch.

Then the jobs are topped up to ``--jobs`` (queued behind each other), and once every
job is terminal (or ``--timeout`` has passed since the start) each is checked: its
final state; duplicated epochs (an epoch-level series, such as ``epoch_seconds`` or the
evaluations, has its points written by the worker's sink at the epoch's end, so an
epoch may appear at most once in it; the loss terms also have per-step points);
missing epochs (the ``loss`` series must cover 1..epochs); double runs (two attempts of
one job alive at once: from the job's events, and from the workers' JSON log lines,
which carry ``job_id`` and ``attempt``). Exit status 0 only if every job succeeded,
none was lost, and no epoch was duplicated or missing and nothing ran twice. A job
that fails while the faults go on stops the soak early: it can no longer pass.

Everything it started is killed and its temporary folder removed at the end, also on
Ctrl-C or failure (``--keep`` keeps the folder: logs, database files, checkpoints).
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import pwd
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import psycopg
import redis
from bench_service import LDREG, Proc, free_port, table, wait_http_ok

EPOCHS = 10
SPEC = {
    "method": "simclr",
    "backbone": "resnet18",
    "width": 4,
    "dataset": {"name": "synthetic", "image_size": 8, "num_samples": 1024, "num_classes": 4},
    "epochs": EPOCHS,
    "batch_size": 32,
    "optimizer": {"name": "sgd", "lr": 0.05, "lr_scaling": "none"},
    "ldreg": {"k": 8, "warmup_epochs": 1},
    "eval": {"lid_k": [8], "knn_k": [5], "max_samples": 128},
    "method_options": {"proj_hidden_dim": 32, "proj_dim": 16},
    "checkpoint_every": 1,
    "seed": 0,
}
# Fast recovery (what tests/service use), no per-team cap in the way, and enough
# automatic attempts that the faults injected on purpose never exhaust a job's budget.
SERVICE_SETTINGS = {
    "LDREG_HEARTBEAT_SECONDS": "1",
    "LDREG_STALE_AFTER_SECONDS": "6",
    "LDREG_SWEEP_INTERVAL_SECONDS": "1",
    "LDREG_REQUEUE_AFTER_SECONDS": "10",
    "LDREG_MAX_ATTEMPTS": "10",
    "LDREG_MAX_ACTIVE_JOBS_PER_TEAM": "100",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}
TERMINAL = ("succeeded", "failed", "cancelled")
RUNNING = ("running", "cancelling")
MACHINE_PORTS = (5432, 6379)  # the machine's own PostgreSQL and Redis: never ours
AS_POSTGRES = ["runuser", "-u", "postgres", "--"]


class SoakStopped(Exception):
    """The soak cannot go on: its time limit (``--timeout``) ran out, or a job failed."""


@dataclass
class Deadline:
    at: float

    def left(self, cap: float = float("inf")) -> float:
        return max(0.0, min(self.at - time.monotonic(), cap))

    def check(self, what: str) -> None:
        if time.monotonic() >= self.at:
            raise SoakStopped(f"overall time limit reached while waiting for {what}")


def wait_until(
    predicate: Callable[[], object], what: str, deadline: Deadline, cap: float, interval=0.2
):
    """Poll ``predicate`` until it returns something truthy; at most ``cap`` seconds."""
    end = time.monotonic() + deadline.left(cap)
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= end:
            deadline.check(what)
            raise TimeoutError(f"{what}: not after {cap:.0f} s")
        time.sleep(interval)


def private_port() -> int:
    while (port := free_port()) in MACHINE_PORTS:
        pass
    return port


def sigkill(proc: Proc) -> None:
    """SIGKILL the process's whole group (its children too) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(10)


# --------------------------------------------------------------------------- servers


class Postgres:
    """A throwaway cluster in ``work/pg``, run as the ``postgres`` user (it refuses
    root), listening on 127.0.0.1 only, trust authentication."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.folder = work / "pg"
        self.data = self.folder / "data"
        self.bin = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1])
        self.port = private_port()
        self.proc: Proc | None = None
        user = pwd.getpwnam("postgres")
        self.folder.mkdir()
        os.chown(self.folder, user.pw_uid, user.pw_gid)
        subprocess.run(
            [*AS_POSTGRES, self.bin / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust"],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def start(self, deadline: Deadline) -> None:
        args = [*AS_POSTGRES, str(self.bin / "postgres"), "-D", str(self.data)]
        args += ["-p", str(self.port), "-c", "listen_addresses=127.0.0.1"]
        args += ["-c", f"unix_socket_directories={self.folder}"]
        self.proc = Proc(args, dict(os.environ), self.work / "postgres.log")
        wait_until(self.ready, "PostgreSQL to accept connections", deadline, 60)

    def ready(self) -> bool:
        try:
            with psycopg.connect(self.dsn(), connect_timeout=1):
                return True
        except psycopg.Error:
            return False

    def crash(self) -> None:
        sigkill(self.proc)

    def restart(self, deadline: Deadline) -> None:
        """A clean, quick restart (SIGINT: fast shutdown, then start again), as an
        operator's restart or a failover looks to the clients: a blip of a second or
        two, shorter than a worker's lease."""
        assert self.proc is not None
        # SIGINT is PostgreSQL's fast shutdown (SIGTERM, "smart", waits for clients);
        # to the group, since the process started is runuser, the postmaster its child.
        self.proc.kill(signal.SIGINT)
        self.proc.wait(30)
        self.proc.finish()
        self.start(deadline)


class Redis:
    """A private redis-server, no persistence: a restart loses every message."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = private_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Proc | None = None

    def start(self, deadline: Deadline) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        self.proc = Proc(args, dict(os.environ), self.work / "redis.log")
        wait_until(self.ready, "Redis to answer PING", deadline, 30)

    def ready(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        sigkill(self.proc)


# --------------------------------------------------------------------------- service


class Service:
    """``ldreg api`` and ``ldreg worker`` processes; workers are named ``w<slot>.<n>``
    (the n-th start of that slot) so a job's claim event says which one runs it."""

    def __init__(self, env: dict[str, str], work: Path) -> None:
        self.env = env
        self.work = work
        self.api_port = private_port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.api: Proc | None = None
        self.workers: dict[int, tuple[str, Proc]] = {}
        self.starts: Counter[int] = Counter()
        self.worker_logs: list[Path] = []

    def start_api(self, deadline: Deadline) -> None:
        args = [LDREG, "api", "--host", "127.0.0.1", "--port", str(self.api_port)]
        self.api = Proc(args, self.env, self.work / "api.log")
        wait_http_ok(f"{self.base}/healthz", timeout=deadline.left(120), proc=self.api)

    def start_worker(self, slot: int) -> Proc:
        name = f"w{slot}.{self.starts[slot]}"
        self.starts[slot] += 1
        log = self.work / f"worker-{name}.log"
        args = [LDREG, "worker", "--queues", "cpu", "--hostname", f"{name}@%h"]
        proc = Proc(args, self.env, log)
        self.workers[slot] = (name, proc)
        self.worker_logs.append(log)
        return proc

    def slot_of(self, worker_name: str) -> int | None:
        return next((s for s, (n, _) in self.workers.items() if n == worker_name), None)

    def wait_workers_ready(self, deadline: Deadline) -> None:
        for _, proc in self.workers.values():
            wait_until(
                lambda p=proc: "worker ready" in p.log() or not p.alive(), "a worker", deadline, 180
            )
            if not proc.alive():
                raise RuntimeError(f"a worker exited at start:\n{proc.log()[-3000:]}")


class Api:
    """The soak's HTTP client: retries through outages (the API or its database being
    down is what the soak does on purpose) and tallies every 5xx answer."""

    def __init__(self, base: str, key: str) -> None:
        self.http = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        self.server_errors: Counter[str] = Counter()

    def _call(self, method: str, path: str, deadline: Deadline, **kwargs) -> httpx.Response:
        end = time.monotonic() + deadline.left(120)
        while True:
            try:
                r = self.http.request(method, path, **kwargs)
                if r.status_code < 500:
                    return r
                self.server_errors[f"{r.status_code} {method} {route_of(path)}"] += 1
            except httpx.HTTPError:
                pass
            if time.monotonic() >= end:
                deadline.check(f"{method} {path}")
                raise TimeoutError(f"{method} {path}: no answer for 120 s")
            time.sleep(0.3)

    def sample(self, paths: list[str], seconds: float) -> None:
        """GET each path every half second for ``seconds``, tallying 5xx answers: what
        clients see during an outage (503 is by design, 500 a bug)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for path in paths:
                with contextlib.suppress(httpx.HTTPError):
                    r = self.http.get(path, timeout=5)
                    if r.status_code >= 500:
                        self.server_errors[f"{r.status_code} GET {route_of(path)}"] += 1
            time.sleep(0.5)

    def get(self, path: str, deadline: Deadline) -> dict:
        r = self._call("GET", path, deadline)
        r.raise_for_status()
        return r.json()

    def submit(self, name: str, deadline: Deadline) -> str:
        # Retried with the same key, a submit that did commit is replayed, not doubled.
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        body = {"kind": "pretrain", "name": name, "spec": SPEC}
        r = self._call("POST", "/v1/jobs", deadline, json=body, headers=headers)
        if r.status_code != 201:
            raise RuntimeError(f"submit refused: {r.status_code} {r.text}")
        return r.json()["id"]


def route_of(path: str) -> str:
    return re.sub(r"/v1/jobs/[^/]+", "/v1/jobs/{id}", path)


# --------------------------------------------------------------------------- the soak


@dataclass
class Recovery:
    fault: str
    measure: str
    seconds: float
    note: str = ""


@dataclass
class Soak:
    api: Api
    service: Service
    postgres: Postgres
    redis: Redis
    rng: random.Random
    deadline: Deadline
    outage: float
    jobs: list[str] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    # A restart shorter than the lease cost a training job an attempt.
    blip_cost_attempts: bool = False

    # ----- helpers

    def submit(self) -> str:
        job_id = self.api.submit(f"soak-{len(self.jobs)}", self.deadline)
        self.jobs.append(job_id)
        return job_id

    def job(self, job_id: str) -> dict:
        return self.api.get(f"/v1/jobs/{job_id}", self.deadline)

    def events(self, job_id: str) -> list[dict]:
        return self.api.get(f"/v1/jobs/{job_id}/events", self.deadline)["events"]

    def active(self) -> list[dict]:
        return [j for j in map(self.job, self.jobs) if j["state"] not in TERMINAL]

    def active_unless_failed(self) -> list[dict]:
        """Our unfinished jobs; stops the soak if one failed (it can no longer pass)."""
        jobs = [self.job(job_id) for job_id in self.jobs]
        if failed := [j for j in jobs if j["state"] == "failed"]:
            raise SoakStopped(f"job {failed[0]['id']} failed: {failed[0]['error']}")
        return [j for j in jobs if j["state"] not in TERMINAL]

    def worker_running(self, job_id: str) -> str | None:
        claims = [e for e in self.events(job_id) if e["to_state"] == "running"]
        match = re.search(r"claimed by worker ([^@\s]+)@", claims[-1]["reason"]) if claims else None
        return match.group(1) if match else None

    def prepare(self, training: int = 2) -> list[dict]:
        """Until ``training`` jobs run past their first checkpoint and none waits
        (submitting as needed): a known load, and an idle worker to recover onto."""

        def ready() -> list[dict] | None:
            active = self.active_unless_failed()
            for _ in range(training - len(active)):
                self.submit()
            if len(active) == training and all(
                j["state"] == "running" and (j["progress"]["epoch"] or 0) >= 1 for j in active
            ):
                return active
            return None

        return wait_until(ready, "jobs to train", self.deadline, 300, interval=0.5)

    def wait_running(self, job_id: str, above_attempt: int, cap: float = 180) -> dict:
        """The job once it runs at an attempt above ``above_attempt``, or has finished."""

        def running() -> dict | None:
            job = self.job(job_id)
            if job["state"] in TERMINAL or (
                job["state"] in RUNNING and job["attempt"] > above_attempt
            ):
                return job
            return None

        return wait_until(running, f"job {job_id} to run", self.deadline, cap)

    def record(self, fault: str, measure: str, since: float, note: str = "") -> None:
        seconds = time.monotonic() - since
        self.recoveries.append(Recovery(fault, measure, seconds, note))
        print(f"  {fault}: {measure}: {seconds:.1f} s {note}".rstrip(), flush=True)

    # ----- faults

    def fault_worker(self) -> None:
        active = self.prepare()
        # Not one about to finish: the kill must land while it trains.
        early = [j for j in active if j["progress"]["epoch"] <= EPOCHS - 3] or active
        job = self.rng.choice(sorted(early, key=lambda j: j["id"]))
        name = self.worker_running(job["id"])
        slot = self.service.slot_of(name) if name else None
        if slot is None:
            raise RuntimeError(f"job {job['id']}: no known worker runs it ({name})")
        killed = time.monotonic()
        sigkill(self.service.workers[slot][1])
        self.service.start_worker(slot)
        after = self.wait_running(job["id"], job["attempt"])
        if after["state"] in TERMINAL and after["attempt"] == job["attempt"]:
            self.record("worker", "missed", killed, f"(job ended {after['state']} first)")
            return
        note = f"({name}, after epoch {job['progress']['epoch']}; now attempt {after['attempt']})"
        self.record("worker", "SIGKILL → its job running again", killed, note)

    def fault_api(self) -> None:
        self.prepare()
        killed = time.monotonic()
        sigkill(self.service.api)
        self.service.start_api(self.deadline)
        self.record("api", "SIGKILL → /healthz answers", killed)

    def fault_redis(self) -> None:
        job = self.prepare()[0]
        killed = time.monotonic()
        self.redis.kill()
        probe = self.submit()  # committed; its message cannot be published
        outage_left = self.outage - (time.monotonic() - killed)
        self.api.sample([f"/v1/jobs/{job['id']}", "/v1/jobs"], outage_left)
        self.redis.start(self.deadline)
        back = time.monotonic()
        self.wait_running(probe, 0)
        self.record(
            "redis",
            "back → job submitted while down running",
            back,
            f"(down {back - killed:.1f} s)",
        )

    def fault_postgres(self) -> None:
        before = self.prepare()
        crashed = time.monotonic()
        self.postgres.crash()
        self.api.sample([f"/v1/jobs/{before[0]['id']}", "/v1/jobs"], self.outage)
        self.postgres.start(self.deadline)
        back = time.monotonic()
        down = f"(down {back - crashed:.1f} s)"
        wait_until(self.api_ready, "/readyz after the restart", self.deadline, 120)
        self.record("postgres", "back → /readyz ready", back, down)
        probe = self.submit()
        self.wait_running(probe, 0)
        self.record("postgres", "back → job submitted then running", back, down)
        for measure, done in [
            ("back → earlier jobs running again", self.resumed),
            ("back → earlier jobs past their last epoch", self.progressed),
        ]:
            wait_until(
                lambda done=done: all(done(j) for j in before),
                f"jobs to recover from the crash ({measure})",
                self.deadline,
                180,
                interval=0.5,
            )
            self.record("postgres", measure, back, down)

    def fault_postgres_restart(self) -> None:
        """A blip shorter than the lease: the jobs training through it must go on in
        the same attempt (their metrics writes wait for the database and retry)."""
        before = self.prepare()
        stopped = time.monotonic()
        self.postgres.restart(self.deadline)
        back = time.monotonic()
        wait_until(
            lambda: all(self.progressed(j) for j in before),
            "jobs to go on after the restart",
            self.deadline,
            180,
            interval=0.5,
        )
        attempts = [(self.job(j["id"])["attempt"], j["attempt"]) for j in before]
        kept = all(now == then for now, then in attempts)
        note = f"(down {back - stopped:.1f} s; attempts {'kept' if kept else attempts})"
        self.record("postgres-restart", "back → earlier jobs past their last epoch", back, note)
        if not kept:
            self.blip_cost_attempts = True

    def api_ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.service.base}/readyz", timeout=5).status_code == 200
        return False

    def resumed(self, before: dict) -> bool:
        """Finished, or running at a later attempt or a later epoch than ``before``."""
        now = self.job(before["id"])
        return now["state"] in TERMINAL or (
            now["state"] == "running"
            and (now["attempt"] > before["attempt"] or self.progressed(before, now))
        )

    def progressed(self, before: dict, now: dict | None = None) -> bool:
        """Finished, or an epoch further than ``before``."""
        now = now or self.job(before["id"])
        return now["state"] in TERMINAL or (
            now["state"] == "running"
            and (now["progress"]["epoch"] or 0) > (before["progress"]["epoch"] or 0)
        )

    # ----- the end

    def drain(self, total: int) -> None:
        while len(self.jobs) < total:
            self.submit()
        print(f"waiting for all {len(self.jobs)} jobs to finish", flush=True)
        with contextlib.suppress(TimeoutError, SoakStopped):
            wait_until(lambda: not self.active(), "every job to finish", self.deadline, math.inf, 2)


FAULTS = {
    "worker": Soak.fault_worker,
    "api": Soak.fault_api,
    "redis": Soak.fault_redis,
    "postgres": Soak.fault_postgres,
    "postgres-restart": Soak.fault_postgres_restart,
}


# --------------------------------------------------------------------------- checks


@dataclass
class JobCheck:
    job_id: str
    state: str
    attempt: int
    error: str = ""
    duplicated: list[str] = field(default_factory=list)  # "series@epoch"
    missing: list[int] = field(default_factory=list)  # epochs without a loss point
    double_runs: list[str] = field(default_factory=list)


# The series the trainer also reports at every step (ldreg.train's step metrics).
STEP_SERIES = frozenset({"loss", "ssl_loss", "ldreg_loss", "lr", "ldreg_lid_gmean"})


def parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def check_job(soak: Soak, job_id: str, spans_in_logs: dict) -> JobCheck:
    try:
        job = soak.job(job_id)
    except (httpx.HTTPError, TimeoutError, SoakStopped):
        return JobCheck(job_id, "missing", 0)
    error = job["error"] or {}
    check = JobCheck(job_id, job["state"], job["attempt"], error.get("code", ""))
    series = soak.api.get(f"/v1/jobs/{job_id}/metrics", soak.deadline)["series"]
    for name, points in sorted(series.items()):
        if name in STEP_SERIES:
            continue  # a point per step besides the epoch's own
        counts = Counter(p["epoch"] for p in points)
        check.duplicated += [f"{name}@{e}" for e, n in sorted(counts.items()) if n > 1]
    if job["state"] == "succeeded":
        seen = {p["epoch"] for p in series.get("loss", [])}
        check.missing = [e for e in range(1, EPOCHS + 1) if e not in seen]
    check.double_runs = overlaps(event_spans(soak.events(job_id)), "events")
    check.double_runs += overlaps(spans_in_logs.get(job_id, {}), "logs")
    return check


def event_spans(events: list[dict]) -> dict[int, tuple[datetime, datetime]]:
    """Per attempt: from its claim to the event that ended its run."""
    spans: dict[int, tuple[datetime, datetime]] = {}
    for i, e in enumerate(events):
        if e["to_state"] != "running" or e["from_state"] not in (None, "queued"):
            continue
        end = next(
            (parse_ts(x["at"]) for x in events[i + 1 :] if x["from_state"] in RUNNING),
            datetime.max.replace(tzinfo=parse_ts(e["at"]).tzinfo),
        )
        spans[e["attempt"]] = (parse_ts(e["at"]), end)
    return spans


def log_spans(paths: list[Path]) -> dict[str, dict[int, tuple[datetime, datetime]]]:
    """Per job and attempt: the first and last JSON log line of that attempt's process."""
    spans: dict[str, dict[int, list[datetime]]] = defaultdict(dict)
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{") or '"job_id"' not in line:
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                rec = json.loads(line)
                at = parse_ts(rec["timestamp"])
                span = spans[rec["job_id"]].setdefault(int(rec["attempt"]), [at, at])
                span[0], span[1] = min(span[0], at), max(span[1], at)
    return {job: {a: (s[0], s[1]) for a, s in per.items()} for job, per in spans.items()}


def overlaps(spans: dict[int, tuple[datetime, datetime]], source: str) -> list[str]:
    ordered = sorted(spans.items())
    return [
        f"{source}: attempt {a} until {a_end:%H:%M:%S.%f}, attempt {b} from {b_start:%H:%M:%S.%f}"
        for (a, (_, a_end)), (b, (b_start, _)) in itertools.combinations(ordered, 2)
        if a_end > b_start
    ]


# --------------------------------------------------------------------------- report


def print_recoveries(recoveries: list[Recovery]) -> None:
    rows = [[r.fault, r.measure, f"{r.seconds:.1f}", r.note] for r in recoveries]
    print(table(["fault", "recovery", "seconds", ""], rows))
    grouped: dict[str, list[float]] = defaultdict(list)
    for r in recoveries:
        if r.measure != "missed":
            grouped[f"{r.fault}: {r.measure}"].append(r.seconds)
    rows = [
        [k, f"{statistics.median(v):.1f}", f"{max(v):.1f}", str(len(v))] for k, v in grouped.items()
    ]
    print()
    print(table(["recovery", "median s", "max s", "n"], rows))


def report(soak: Soak, checks: list[JobCheck], elapsed: float) -> bool:
    """Print the results; True if every job succeeded once, whole and not lost."""
    states = Counter(c.state for c in checks)
    lost = sum(c.state not in TERMINAL for c in checks)
    duplicated = sum(len(c.duplicated) for c in checks)
    missing = sum(len(c.missing) for c in checks)
    double = sum(len(c.double_runs) for c in checks)
    attempts = Counter(c.attempt for c in checks)
    print()
    print_recoveries(soak.recoveries)
    print()
    for label, value in [
        ("jobs submitted", len(checks)),
        (
            "succeeded / failed / cancelled",
            f"{states['succeeded']} / {states['failed']} / {states['cancelled']}",
        ),
        ("lost (never terminal or missing)", lost),
        ("duplicated epochs", duplicated),
        ("missing epochs", missing),
        ("double runs", double),
        ("jobs by attempts", ", ".join(f"{n} × {a}" for a, n in sorted(attempts.items()))),
        ("attempts kept through a restart", "no" if soak.blip_cost_attempts else "yes"),
        ("HTTP 5xx answers", dict(soak.api.server_errors) or 0),
        ("wall time", f"{elapsed:.0f} s"),
    ]:
        print(f"{label:34} {value}")
    for c in checks:
        problems = [*c.duplicated, *[f"epoch {e} missing" for e in c.missing], *c.double_runs]
        if c.state != "succeeded" or problems:
            print(
                f"  job {c.job_id}: {c.state}, attempt {c.attempt} {c.error}",
                *problems,
                sep="\n    ",
            )
    ok = states["succeeded"] == len(checks) and not (
        lost or duplicated or missing or double or soak.blip_cost_attempts
    )
    print("\nPASS" if ok else "\nFAIL", flush=True)
    return ok


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace, work: Path) -> bool:
    started = time.monotonic()
    deadline = Deadline(started + args.timeout)
    work.chmod(0o755)  # the postgres user must reach work/pg
    (work / "home" / "data").mkdir(parents=True)
    print(f"work dir {work}; starting PostgreSQL and Redis", flush=True)
    postgres = Postgres(work)
    postgres.start(deadline)
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE ldreg_soak")
    store = Redis(work)
    store.start(deadline)
    env = {
        **os.environ,
        **SERVICE_SETTINGS,
        "LDREG_DATABASE_URL": postgres.url("ldreg_soak"),
        "LDREG_BROKER_URL": store.url,
        "LDREG_HOME": str(work / "home"),
    }
    subprocess.run([LDREG, "admin", "migrate"], env=env, check=True, capture_output=True)
    created = subprocess.run(
        [LDREG, "admin", "create-team", "soak"], env=env, check=True, capture_output=True, text=True
    )
    key = created.stdout.strip().splitlines()[-1]
    service = Service(env, work)
    service.start_api(deadline)
    for slot in range(args.workers):
        service.start_worker(slot)
    service.wait_workers_ready(deadline)
    print(
        f"PostgreSQL :{postgres.port}, Redis :{store.port}, API :{service.api_port},"
        f" {args.workers} workers; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    soak = Soak(
        api=Api(service.base, key),
        service=service,
        postgres=postgres,
        redis=store,
        rng=random.Random(args.seed),
        deadline=deadline,
        outage=args.outage,
    )
    plan = []
    for _ in range(args.rounds):
        faults = ["worker"] * args.worker_kills + ["api", "redis", "postgres", "postgres-restart"]
        soak.rng.shuffle(faults)
        plan += faults
    print(f"faults (seed {args.seed}): {', '.join(plan)}", flush=True)
    try:
        for fault in plan:
            FAULTS[fault](soak)
        soak.drain(args.jobs)
    except (SoakStopped, TimeoutError) as exc:
        print(f"stopped early: {exc}", flush=True)
    soak.deadline = Deadline(time.monotonic() + 300)  # time to read every job back
    spans = log_spans(service.worker_logs)
    checks = [check_job(soak, job_id, spans) for job_id in soak.jobs]
    return report(soak, checks, time.monotonic() - started)


def fast_shutdown(data: Path) -> None:
    """Stop a PostgreSQL cluster in fast mode (SIGINT to its postmaster): a SIGKILLed
    one would leave its shared memory segment behind."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data / "postmaster.pid").read_text().split()[0])
        if Path(f"/proc/{pid}/comm").read_text().strip() == "postgres":
            os.kill(pid, signal.SIGINT)
            end = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < end:
                time.sleep(0.1)


def cleanup(work: Path, keep: bool) -> None:
    fast_shutdown(work / "pg" / "data")
    for proc in Proc.started:
        sigkill(proc)
    Proc.stop_all()  # closes the log files
    if keep:
        print(f"kept {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="fault order and targets")
    p.add_argument("--jobs", type=int, default=12, help="at least this many jobs in all")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="of every fault, in a new order each")
    p.add_argument("--worker-kills", type=int, default=3, help="worker SIGKILLs per round")
    p.add_argument("--outage", type=float, default=8.0, help="seconds Redis/PostgreSQL are down")
    p.add_argument("--timeout", type=float, default=1200.0, help="hard limit on the whole run")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: PostgreSQL is started as the postgres user with runuser")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))  # clean up as on Ctrl-C
    work = Path(tempfile.mkdtemp(prefix="ldreg_soak_"))
    status = 1
    try:
        status = 0 if run(args, work) else 1
    except KeyboardInterrupt:
        print("interrupted; stopping everything", flush=True)
        status = 130
    finally:
        cleanup(work, args.keep)
    sys.exit(status)


if __name__ == "__main__":
    main()
