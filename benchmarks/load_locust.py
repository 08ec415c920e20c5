"""Load run with locust: many dashboards polling jobs against the real API and PostgreSQL.

One command starts everything it needs, on 127.0.0.1 only: a fresh PostgreSQL database
(``ldreg_load_<random>``, migrated, dropped at the end), a Redis index claimed as
benchmarks/bench_service.py claims one (flushed, released at the end), a seeded team
with ``--jobs`` queued jobs (no worker runs, so they stay queued), and one API process
started as in production (``ldreg api``, access log on unless ``--no-access-log``).
Then ``locust --headless`` runs ``--users`` concurrent users for ``--seconds`` (after
spawning them all, its statistics are reset, so the ramp is not measured). Each user is
a dashboard watching one job: ``GET /v1/jobs/{id}`` (checked to be that job) and, one
request in ``--list-every``, ``GET /v1/jobs`` (the team's list, ORM route), waiting
``--wait-min``..``--wait-max`` seconds between requests (the dashboard polls a few
times a second; ``--wait-max 0`` makes every user a closed loop, i.e. saturation).

Prints requests/s, p50 and p99 (locust's percentiles: above 100 ms rounded to two
significant digits) per endpoint and overall, the error count with every distinct error,
and the API's warnings and errors; exits 1 on any error. Not a test; run by hand::

    .venv/bin/python benchmarks/load_locust.py                  # 200 users, 60 s
    .venv/bin/python benchmarks/load_locust.py --wait-max 0     # saturation, same users

The same file is the locustfile (``locust -f benchmarks/load_locust.py``, with
``LOAD_API_KEY`` and ``LOAD_JOB_IDS`` set): the runner starts it that way, in a
process of its own, so gevent's monkey-patching never reaches the runner.
"""

from __future__ import annotations

import os
import random
from typing import ClassVar

if __name__ != "__main__":
    # --------------------------------------------------------------- the locustfile
    from locust import FastHttpUser, between, task

    class Dashboard(FastHttpUser):
        """One browser tab of the dashboard, following one job."""

        wait_time = between(
            float(os.environ.get("LOAD_WAIT_MIN", "0.25")),
            float(os.environ.get("LOAD_WAIT_MAX", "0.75")),
        )
        network_timeout = 30.0
        connection_timeout = 30.0
        concurrency = 1  # one keep-alive connection per user, as a browser tab has
        default_headers: ClassVar[dict[str, str]] = {
            "Authorization": f"Bearer {os.environ.get('LOAD_API_KEY', '')}"
        }
        job_ids: ClassVar[list[str]] = [
            j for j in os.environ.get("LOAD_JOB_IDS", "").split(",") if j
        ]
        list_every = int(os.environ.get("LOAD_LIST_EVERY", "10"))

        def on_start(self) -> None:
            self.job_id = random.choice(self.job_ids)

        @task
        def poll(self) -> None:
            if random.randrange(self.list_every) == 0:
                with self.client.get("/v1/jobs", name="GET /v1/jobs", catch_response=True) as r:
                    if r.status_code == 200 and "jobs" not in r.json():
                        r.failure("200 without a 'jobs' list")
                return
            with self.client.get(
                f"/v1/jobs/{self.job_id}", name="GET /v1/jobs/{id}", catch_response=True
            ) as r:
                if r.status_code == 200 and r.json().get("id") != self.job_id:
                    r.failure(f"200 with another job's body: {r.text[:200]}")


# ------------------------------------------------------------------------ the runner


def _read_csv(path):
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _server_problems(log_path, limit: int = 40) -> list[str]:
    """The API's warning and error lines (JSON log), with each traceback's last line."""
    import json

    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            if "Traceback" in line or "Error" in line:
                out.append(line)
            continue
        if entry.get("level") in ("warning", "error", "critical"):
            text = f"{entry.get('timestamp', '')} {entry['level']}: {entry.get('event')}"
            exc = (entry.get("exception") or "").strip().splitlines()
            if exc:
                text += f" | {exc[-1]}"
            out.append(text)
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def main() -> int:
    import argparse
    import resource
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    import redis

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_service import (
        LDREG,
        PYTHON,
        REPO,
        TINY_SPEC,
        Proc,
        cpu_seconds,
        free_port,
        scratch_services,
        table,
        wait_http_ok,
        wait_warmed_up,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--spawn-rate", type=float, default=50.0, help="users started per second")
    p.add_argument("--seconds", type=int, default=60, help="measured time, after the ramp")
    p.add_argument("--jobs", type=int, default=20, help="queued jobs of the seeded team")
    p.add_argument("--list-every", type=int, default=10, help="one request in N lists")
    p.add_argument("--wait-min", type=float, default=0.25)
    p.add_argument("--wait-max", type=float, default=0.75)
    p.add_argument("--no-access-log", action="store_true", help="pass it to `ldreg api`")
    args = p.parse_args()
    args.wait_min = min(args.wait_min, args.wait_max)

    locust_rc = None
    stats: list[dict] = []
    failures: list[dict] = []
    exceptions: list[dict] = []
    problems: list[str] = []
    notes: list[str] = []
    server_cpu = locust_cpu = wall = 0.0
    # The seeded jobs are all queued at once (no worker runs).
    with scratch_services(
        "ldreg_load", LDREG_MAX_ACTIVE_JOBS_PER_TEAM=str(max(8, args.jobs))
    ) as scratch:
        env, work, key = scratch.env, scratch.work, scratch.key
        port = free_port()
        api_args = [LDREG, "api", "--host", "127.0.0.1", "--port", str(port)]
        if args.no_access_log:
            api_args.append("--no-access-log")
        api = Proc(api_args, env, work / "api.log")
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/healthz", timeout=90, proc=api)
        wait_warmed_up(api)
        job_ids = []
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as c:
            for i in range(args.jobs):
                r = c.post(
                    "/v1/jobs", json={"kind": "pretrain", "name": f"load-{i}", "spec": TINY_SPEC}
                )
                r.raise_for_status()
                job_ids.append(r.json()["id"])
        redis.Redis.from_url(scratch.broker).flushdb()  # their messages: nobody takes them
        print(f"API on {base}, {len(job_ids)} queued jobs; starting locust", flush=True)

        csv_prefix = work / "locust"
        locust_env = dict(
            env,
            LOAD_API_KEY=key,
            LOAD_JOB_IDS=",".join(job_ids),
            LOAD_WAIT_MIN=str(args.wait_min),
            LOAD_WAIT_MAX=str(args.wait_max),
            LOAD_LIST_EVERY=str(args.list_every),
        )
        ramp = args.users / args.spawn_rate
        cmd = [
            PYTHON,
            "-m",
            "locust",
            "-f",
            str(Path(__file__).resolve()),
            "--headless",
            "--host",
            base,
            "--users",
            str(args.users),
            "--spawn-rate",
            str(args.spawn_rate),
            "--run-time",
            f"{round(ramp + args.seconds)}s",
            "--reset-stats",
            "--only-summary",
            "--stop-timeout",
            "5",
            "--csv",
            str(csv_prefix),
            "--loglevel",
            "WARNING",
        ]
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0, t0 = cpu_seconds(api.pid), time.perf_counter()
        with open(work / "locust.log", "wb") as out:
            locust_rc = subprocess.run(
                cmd,
                env=locust_env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=ramp + args.seconds + 120,
            ).returncode
        wall = time.perf_counter() - t0
        server_cpu = cpu_seconds(api.pid) - cpu0
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        locust_cpu = (children.ru_utime - children0.ru_utime) + (
            children.ru_stime - children0.ru_stime
        )
        if not api.alive():
            notes.append(f"the API process exited during the run (code {api.popen.returncode})")
        stats = _read_csv(Path(f"{csv_prefix}_stats.csv"))
        failures = _read_csv(Path(f"{csv_prefix}_failures.csv"))
        exceptions = _read_csv(Path(f"{csv_prefix}_exceptions.csv"))
        log_text = (work / "locust.log").read_text(errors="replace")
        for line in log_text.splitlines():
            if "CPU usage" in line or "Traceback" in line or "Error" in line:
                notes.append(f"locust: {line.strip()}")
        api.stop()
        problems = _server_problems(work / "api.log")

    print()
    wait = (
        f"{args.wait_min:g}-{args.wait_max:g} s between a user's requests"
        if args.wait_max > 0
        else "no wait (closed loop)"
    )
    print(
        f"locust, {args.users} users ({wait}), {args.seconds} s measured after the ramp;"
        f" load {os.getloadavg()[0]:.1f}"
    )
    rows = []
    total_requests = total_errors = 0
    for row in stats:
        requests, errors = int(row["Request Count"]), int(row["Failure Count"])
        if row["Name"] == "Aggregated":
            total_requests, total_errors = requests, errors
        rows.append(
            [
                row["Name"],
                str(requests),
                f"{float(row['Requests/s']):.0f}",
                row["50%"],
                row["99%"],
                row["Max Response Time"].split(".")[0],
                str(errors),
            ]
        )
    if rows:
        print(
            table(["endpoint", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors"], rows)
        )
    if total_requests and wall:
        # Over the whole locust run, ramp included; locust runs on one core (gevent).
        print(
            f"CPU over the locust run: API process {server_cpu / wall:.0%} of one core,"
            f" locust {locust_cpu / wall:.0%} of one core"
        )
    errors = total_errors + sum(int(e.get("Occurrences", 0) or 0) for e in exceptions)
    for f in failures:
        print(f"error: {f['Method']} {f['Name']}: {f['Error']} x{f['Occurrences']}")
    for e in exceptions:
        print(f"locust exception x{e.get('Occurrences')}: {e.get('Message')}")
    for note in notes:
        print(note)
    if problems:
        print("API warnings/errors:")
        for line in problems:
            print(f"  {line}")
    if not stats:
        print(f"no statistics: locust exited with {locust_rc}; see {work}/locust.log")
        return 1
    print(f"errors: {errors}")
    return 1 if errors or locust_rc not in (0, None) or not total_requests else 0


if __name__ == "__main__":
    raise SystemExit(main())
