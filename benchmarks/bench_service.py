"""Service performance against the real PostgreSQL and Redis (issue 4, "Performance").

1. ``GET /v1/jobs/{id}`` throughput and p99 latency at 64 concurrent clients (``wrk
   -t2 -c64``, keep-alive, loopback; an in-process ``httpx`` load where wrk is not
   installed) against a trivial FastAPI endpoint served in the same run with the same
   uvicorn settings (one process each, ``--no-access-log``). Once with what the project
   installs (asyncio event loop, h11 parser) and, where ``uvloop`` and ``httptools``
   are installed, once with those. Targets: ≥ 50 % of the trivial endpoint's
   throughput, p99 < 50 ms. Without ``--quick`` the list route (ORM, threadpool) is
   measured too, for reference.
2. Submit-to-running latency with Redis and an idle ``ldreg worker --queues cpu``:
   time from a ``POST /v1/jobs`` returning to the job's ``started_at`` (set by the
   worker's claim). One job at a time; each is waited for (the worker runs every job
   in a fresh child process), so the worker is idle at each submit. Target: p50 < 500 ms.
3. Database write overhead of metrics: ``service.execution.record_metrics`` for one
   epoch's metric rows (what ``worker.sink.DatabaseSink`` writes, in its own
   transaction) against the epoch time of a small ``ldreg.train.pretrain`` run
   (digits, width 8, 16 px, 2 epochs; ``epoch_seconds``). Target: < 1 %.

Creates its own PostgreSQL database (``ldreg_bench_<random>``, dropped at the end) on
127.0.0.1:5432 and uses Redis 127.0.0.1:6379 index 14 (flushed first; claimed with the
test fixtures' marker in index 0 so a concurrent test session does not take it). Every
process it starts runs in its own session and is killed by process group at the end.
Not a test; run by hand::

    .venv/bin/python benchmarks/bench_service.py            # 10 s per measurement, 10 jobs
    .venv/bin/python benchmarks/bench_service.py --quick    # 3 s per measurement, 3 jobs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import httpx
import psycopg
import redis

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cli.processes import ServiceProcess, free_port, wait_http_ok  # noqa: E402

PG_SERVER = "postgres@127.0.0.1:5432"
REDIS_SERVER = "redis://127.0.0.1:6379"
PYTHON = sys.executable
LDREG = str(Path(sys.executable).with_name("ldreg"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The load generator: wrk where installed (apt-get install wrk), else httpx in-process.
WRK = shutil.which("wrk")

TINY_SPEC = {
    "method": "simclr",
    "width": 8,
    "dataset": {"name": "digits", "image_size": 8},
    "epochs": 1,
    "batch_size": 64,
    "ldreg": {"k": 16},
}

TRIVIAL_APP = """
from fastapi import FastAPI

app = FastAPI()


@app.get("/ping")
async def ping():
    return {"ok": True}
"""


# --------------------------------------------------------------------------- processes


class Proc(ServiceProcess):
    """A :class:`ServiceProcess` started at once and remembered, so that
    :meth:`stop_all` stops every process a benchmark started."""

    started: ClassVar[list[Proc]] = []

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO):
        super().__init__(args, env, log, cwd)
        self.start()
        Proc.started.append(self)

    @classmethod
    def stop_all(cls) -> None:
        for p in reversed(cls.started):
            p.stop()


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_warmed_up(proc: Proc, timeout: float = 30.0) -> None:
    """The API imports Celery and freezes its heap in a background thread once it
    serves (api/app.py, ``_warm_up``); measure after that, as a long-running API is."""
    deadline = time.monotonic() + timeout
    while "api warmed up" not in proc.log():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the API did not finish warming up:\n{proc.log()[-3000:]}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- stats


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, sep, *body])


# --------------------------------------------------------------------------- 1. HTTP


async def _load(url: str, headers: dict[str, str], clients: int, seconds: float, warmup: float):
    # One AsyncClient (one keep-alive connection) per simulated client: a single
    # client with a 64-connection pool spends its CPU in the pool's bookkeeping and
    # becomes the bottleneck long before the server does.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    pool = [httpx.AsyncClient(headers=headers, limits=limits, timeout=30.0) for _ in range(clients)]
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop_at = 0.0

    async def one_client(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at and measuring:
                return
            try:
                r = await client.get(url)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            t1 = time.perf_counter()
            if measuring and t1 <= stop_at:
                if ok:
                    latencies.append(t1 - t0)
                else:
                    errors += 1

    try:
        # Warm-up (connections open, caches filled), then the measured window.
        tasks = [asyncio.create_task(one_client(c)) for c in pool]
        await asyncio.sleep(warmup)
        measuring = True
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*tasks)
    finally:
        for c in pool:
            await c.aclose()
    return latencies, errors, seconds


def _wrk(url: str, headers: dict[str, str], args: argparse.Namespace) -> dict:
    """One measured window of wrk (C, so the load generator costs little CPU)."""
    cmd = [WRK, "-t2", f"-c{args.clients}", "--latency", "--timeout", "10s"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    warm = [*cmd, f"-d{max(1, round(args.warmup))}s", url]
    subprocess.run(warm, check=True, capture_output=True, timeout=args.warmup + 60)
    out = subprocess.run(
        [*cmd, f"-d{round(args.seconds)}s", url],
        check=True,
        capture_output=True,
        text=True,
        timeout=args.seconds + 60,
    ).stdout
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def ms(text: str) -> float:
        number = text.rstrip("smu")
        return float(number) * units[text[len(number) :]]

    latency = {}
    requests = errors = 0
    for line in out.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] in ("50%", "75%", "90%", "99%"):
            latency[words[0]] = ms(words[1])
        elif "requests in" in line:
            requests = int(words[0])
        elif line.strip().startswith("Non-2xx"):
            errors += int(words[-1])
        elif line.strip().startswith("Socket errors"):
            errors += sum(int(w.rstrip(",")) for w in words[3::2])
    return {
        "requests": requests - errors,
        "errors": errors,
        "p50_ms": latency["50%"],
        "p99_ms": latency["99%"],
    }


def _httpx(url: str, headers: dict[str, str], args: argparse.Namespace) -> dict:
    latencies, errors, _ = asyncio.run(_load(url, headers, args.clients, args.seconds, args.warmup))
    return {
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": pct(latencies, 50) * 1e3,
        "p99_ms": pct(latencies, 99) * 1e3,
    }


def measure_http(
    name: str, proc: Proc, url: str, headers: dict[str, str], args: argparse.Namespace
) -> dict:
    server_cpu0 = cpu_seconds(proc.pid)
    wall0 = time.perf_counter()
    result = (_wrk if WRK else _httpx)(url, headers, args)
    wall = time.perf_counter() - wall0
    server_cpu = cpu_seconds(proc.pid) - server_cpu0  # warm-up included, as its requests
    result.update(
        name=name,
        rps=result["requests"] / args.seconds,
        server_cpu=server_cpu / wall,
        load1=os.getloadavg()[0],
    )
    print(
        f"  {name}: {result['rps']:.0f} req/s, p50 {result['p50_ms']:.1f} ms,"
        f" p99 {result['p99_ms']:.1f} ms, {result['errors']} errors"
        f" (server CPU {result['server_cpu']:.0%}, load {result['load1']:.1f})",
        flush=True,
    )
    return result


def server_configs() -> list[tuple[str, list[str]]]:
    """uvicorn's event loop and HTTP parser: what the project installs (asyncio, h11),
    and uvloop + httptools (``uvicorn[standard]``) as a reference where present."""
    configs = [("asyncio+h11", ["--loop", "asyncio", "--http", "h11"])]
    if importlib.util.find_spec("uvloop") and importlib.util.find_spec("httptools"):
        configs.append(("uvloop+httptools", ["--loop", "uvloop", "--http", "httptools"]))
    return configs


def bench_http(env: dict[str, str], work: Path, key: str, job_id: str, args) -> list[dict]:
    (work / "trivial_app.py").write_text(textwrap.dedent(TRIVIAL_APP))
    auth = {"Authorization": f"Bearer {key}"}
    results = []
    for config, flags in server_configs():
        # The same uvicorn settings for both: what `ldreg api` passes (one process,
        # proxy headers), the access log off, and this event loop and parser.
        common = ["--host", "127.0.0.1", "--proxy-headers", "--no-access-log", *flags]
        port = free_port()
        trivial = Proc(
            [
                PYTHON,
                "-m",
                "uvicorn",
                "trivial_app:app",
                "--app-dir",
                str(work),
                "--port",
                str(port),
                *common,
            ],
            env,
            work / f"trivial-{config}.log",
        )
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/ping", timeout=90, proc=trivial)
        trivial_result = measure_http(f"{config}: trivial /ping", trivial, f"{base}/ping", {}, args)
        trivial_result["baseline"] = True
        results.append(trivial_result)
        trivial.stop()

        port = free_port()
        api = Proc(
            [
                PYTHON,
                "-m",
                "uvicorn",
                "api.app:create_app",
                "--factory",
                "--port",
                str(port),
                *common,
            ],
            env,
            work / f"api-{config}.log",
        )
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/healthz", timeout=90, proc=api)
        wait_warmed_up(api)
        get = measure_http(
            f"{config}: GET /v1/jobs/{{id}}", api, f"{base}/v1/jobs/{job_id}", auth, args
        )
        get["get"] = True
        results.append(get)
        if not args.quick:
            results.append(
                measure_http(
                    f"{config}: GET /v1/jobs (list, ORM)", api, f"{base}/v1/jobs", auth, args
                )
            )
        api.stop()
    return results


# --------------------------------------------------------------------------- 2. worker


def parse_ts(value: str) -> datetime:
    ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def bench_submit(env: dict[str, str], work: Path, key: str, args) -> dict:
    worker = Proc(
        [
            LDREG,
            "worker",
            "--queues",
            "cpu",
            "--loglevel",
            os.environ.get("BENCH_WORKER_LOGLEVEL", "INFO"),
        ],
        env,
        work / "worker.log",
    )
    deadline = time.monotonic() + 120
    while "worker ready" not in worker.log():
        if not worker.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not become ready:\n{worker.log()[-3000:]}")
        time.sleep(0.2)
    time.sleep(args.idle)  # let the prefork child settle: an idle worker
    port = free_port()
    api = Proc(
        [LDREG, "api", "--host", "127.0.0.1", "--port", str(port)], env, work / "api-submit.log"
    )
    base = f"http://127.0.0.1:{port}"
    wait_http_ok(f"{base}/healthz", timeout=90, proc=api)

    from_return: list[float] = []
    from_send: list[float] = []
    job_seconds: list[float] = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        for i in range(args.jobs):
            sent = datetime.now(UTC)
            r = c.post(
                "/v1/jobs", json={"kind": "pretrain", "name": f"bench-{i}", "spec": TINY_SPEC}
            )
            returned = datetime.now(UTC)
            r.raise_for_status()
            job_id = r.json()["id"]
            started = None
            end = time.monotonic() + args.job_timeout
            while time.monotonic() < end:
                job = c.get(f"/v1/jobs/{job_id}").json()
                if started is None and job.get("started_at"):
                    started = parse_ts(job["started_at"])
                if job["state"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.05 if started is None else 0.25)
            else:
                raise TimeoutError(f"job {job_id} not finished after {args.job_timeout}s")
            if started is None:
                raise RuntimeError(f"job {job_id} ended {job['state']} without started_at")
            done = parse_ts(job["finished_at"]) if job.get("finished_at") else datetime.now(UTC)
            from_return.append((started - returned).total_seconds())
            from_send.append((started - sent).total_seconds())
            job_seconds.append((done - started).total_seconds())
            print(
                f"  job {i + 1}/{args.jobs}: running {from_return[-1] * 1e3:.0f} ms after the"
                f" POST returned ({from_send[-1] * 1e3:.0f} ms after it was sent);"
                f" {job['state']} after {job_seconds[-1]:.1f} s",
                flush=True,
            )
            if job["state"] != "succeeded":
                print(f"    error: {job.get('error')}", flush=True)
            time.sleep(args.idle)  # the replacement child is forked: idle again
    api.stop()
    worker.stop(timeout=30)
    return {
        "from_return": from_return,
        "from_send": from_send,
        "job_seconds": job_seconds,
    }


# --------------------------------------------------------------------------- 3. metrics


def bench_metrics(url: str, work: Path, job_id: str, args) -> dict:
    import torch

    from ldreg.spec import PretrainSpec
    from ldreg.train import pretrain
    from service.db import session_scope
    from service.execution import MetricRow, claim_job, finish_job, heartbeat, record_metrics
    from service.models import JobState

    with session_scope(url) as s:
        attempt = claim_job(session=s, job_id=job_id, worker="bench")
    if attempt is None:
        raise RuntimeError(f"job {job_id} could not be claimed")

    def write(rows: list[MetricRow], epoch: int) -> float:
        t0 = time.perf_counter()
        with session_scope(url) as s:  # one transaction, as DatabaseSink._write does
            owned = record_metrics(
                session=s,
                job_id=job_id,
                attempt=attempt,
                rows=rows,
                progress_epoch=epoch,
                progress_epochs=args.epochs,
            )
        elapsed = time.perf_counter() - t0
        if not owned:
            raise RuntimeError("lost the fence")
        return elapsed

    class TimingSink:
        def __init__(self) -> None:
            self.epoch_seconds: list[float] = []
            self.write_seconds: list[float] = []
            self.rows: list[MetricRow] = []

        def on_train_start(self, *, start_epoch: int, epochs: int, steps_per_epoch: int) -> None:
            write([], 0)  # as DatabaseSink does (also opens the pooled connection)

        def on_step(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
            pass

        def on_epoch_end(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
            rows = []
            for name, value in metrics.items():
                with contextlib.suppress(TypeError, ValueError):
                    rows.append(MetricRow(name=name, epoch=epoch, step=step, value=float(value)))
            self.rows = rows
            self.epoch_seconds.append(float(metrics["epoch_seconds"]))
            self.write_seconds.append(write(rows, epoch))

        def on_checkpoint(self, *, epoch: int, path: Path) -> None:
            pass

        def should_stop(self) -> bool:
            return False

    spec = PretrainSpec.model_validate(
        {
            "method": "simclr",
            "width": 8,
            "dataset": {"name": "digits", "image_size": 16},
            "epochs": args.epochs,
            "batch_size": 64,
            "ldreg": {"k": 16},
        }
    )
    sink = TimingSink()
    (work / "data").mkdir(exist_ok=True)
    pretrain(spec, run_dir=work / "run", data_root=work / "data", sink=sink, device="cpu")

    # A steadier estimate of the same write: the last epoch's rows at new steps.
    repeats = []
    for i in range(args.write_repeats):
        rows = [
            MetricRow(name=r.name, epoch=r.epoch + 1 + i, step=r.step * (2 + i), value=r.value)
            for r in sink.rows
        ]
        repeats.append(write(rows, args.epochs))
    beats = []
    for _ in range(args.write_repeats):
        t0 = time.perf_counter()
        with session_scope(url) as s:
            heartbeat(session=s, job_id=job_id, attempt=attempt, progress_fraction=0.5)
        beats.append(time.perf_counter() - t0)
    with session_scope(url) as s:
        finish_job(session=s, job_id=job_id, attempt=attempt, state=JobState.SUCCEEDED, summary={})
    return {
        "names": len(sink.rows),
        "epoch_seconds": sink.epoch_seconds,
        "write_in_training": sink.write_seconds,
        "write_repeats": repeats,
        "heartbeat": beats,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- main


def claim_redis_index(preferred: int = 14) -> tuple[int, str, str]:
    marker = redis.Redis.from_url(f"{REDIS_SERVER}/0")
    token = f"bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for index in [preferred, *range(15, 0, -1)]:
        key = f"ldreg-test-session:{index}"
        if marker.set(key, token, nx=True, ex=3600):
            return index, key, token
    raise RuntimeError("no free Redis database index")


@dataclass
class Scratch:
    """What :func:`scratch_services` made: a database URL, a broker URL, a work folder
    (logs are kept there), the environment for service processes, and a team's key."""

    url: str
    broker: str
    work: Path
    env: dict[str, str]
    key: str


@contextlib.contextmanager
def scratch_services(prefix: str, **extra_env: str) -> Iterator[Scratch]:
    """A fresh PostgreSQL database (migrated, one team), a Redis index of its own and a
    work folder, for one benchmark run; the database dropped and the index released at
    the end, and every process started through :class:`Proc` stopped."""
    db_name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    url = f"postgresql+psycopg://{PG_SERVER}/{db_name}"
    index, marker_key, token = claim_redis_index()
    broker = f"{REDIS_SERVER}/{index}"
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}_"))
    (work / "home" / "data").mkdir(parents=True)
    env = dict(os.environ)
    env.update(
        LDREG_DATABASE_URL=url,
        LDREG_BROKER_URL=broker,
        LDREG_HOME=str(work / "home"),
        PYTHONUNBUFFERED="1",
        **extra_env,
    )
    print(
        f"database {db_name}, redis index {index}, work dir {work};"
        f" {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with psycopg.connect(f"postgresql://{PG_SERVER}/test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db_name}"')
    try:
        redis.Redis.from_url(broker).flushdb()
        from service.auth import create_team
        from service.db import engine_for, migrate, session_scope

        migrate(url)
        with session_scope(url) as s:
            _, key = create_team(session=s, name=f"{prefix}-{uuid.uuid4().hex[:6]}")
        engine_for(url).dispose()
        yield Scratch(url=url, broker=broker, work=work, env=env, key=key)
    finally:
        Proc.stop_all()
        with contextlib.suppress(Exception):
            from service.db import engine_for

            engine_for(url).dispose()
        with psycopg.connect(f"postgresql://{PG_SERVER}/test", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        with contextlib.suppress(Exception):
            redis.Redis.from_url(broker).flushdb()
            marker = redis.Redis.from_url(f"{REDIS_SERVER}/0")
            if marker.get(marker_key) == token.encode():
                marker.delete(marker_key)
        print(f"logs kept in {work}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 s per measurement, 3 jobs")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=None, help="per HTTP measurement")
    p.add_argument("--warmup", type=float, default=None)
    p.add_argument("--jobs", type=int, default=None, help="submit-to-running samples")
    p.add_argument("--idle", type=float, default=3.0, help="seconds the worker idles first")
    p.add_argument("--job-timeout", type=float, default=300.0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--write-repeats", type=int, default=20)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: http,metrics,submit")
    args = p.parse_args()
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.jobs = args.jobs or (3 if args.quick else 10)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    http_results: list[dict] = []
    submit: dict | None = None
    metrics: dict | None = None
    with scratch_services("ldreg_bench") as scratch:
        url, env, work, key = scratch.url, scratch.env, scratch.work, scratch.key
        # This process uses the same settings (the metrics part reads none, but be safe).
        os.environ.update(
            {k: env[k] for k in ("LDREG_DATABASE_URL", "LDREG_BROKER_URL", "LDREG_HOME")}
        )
        # One queued job (no worker yet) for the GETs; the metrics part then claims it.
        port = free_port()
        api = Proc(
            [LDREG, "api", "--host", "127.0.0.1", "--port", str(port)], env, work / "api-setup.log"
        )
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/healthz", timeout=90, proc=api)
        r = httpx.post(
            f"{base}/v1/jobs",
            json={"kind": "pretrain", "name": "bench-get", "spec": TINY_SPEC},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        r.raise_for_status()
        job_id = r.json()["id"]
        api.stop()
        redis.Redis.from_url(scratch.broker).flushdb()  # its message: no worker may take it

        if "http" not in skip:
            print(f"1. HTTP, {args.clients} clients, {args.seconds:.0f} s each", flush=True)
            http_results = bench_http(env, work, key, job_id, args)
        if "metrics" not in skip:
            print("3. metrics write vs epoch time", flush=True)
            metrics = bench_metrics(url, work, job_id, args)
        if "submit" not in skip:
            print(f"2. submit-to-running, {args.jobs} jobs", flush=True)
            submit = bench_submit(env, work, key, args)

    report(http_results, submit, metrics, args)


def report(http_results: list[dict], submit: dict | None, metrics: dict | None, args) -> None:
    print()
    if http_results:
        rows = []
        base = http_results[0]
        for r in http_results:
            if r.get("baseline"):
                base = r
            rows.append(
                [
                    r["name"],
                    f"{r['rps']:.0f}",
                    f"{r['rps'] / base['rps']:.0%}",
                    f"{r['p50_ms']:.1f}",
                    f"{r['p99_ms']:.1f}",
                    str(r["errors"]),
                    f"{r['server_cpu'] / r['rps'] * 1e3:.2f}" if r["rps"] else "—",
                    f"{r['load1']:.1f}",
                ]
            )
        loader = "wrk -t2" if WRK else "httpx (wrk not installed)"
        print(f"HTTP, {args.clients} concurrent clients ({loader}), {args.seconds:.0f} s each")
        print(
            table(
                [
                    "server: endpoint",
                    "req/s",
                    "vs trivial",
                    "p50 ms",
                    "p99 ms",
                    "errors",
                    "server CPU ms/req",
                    "load",
                ],
                rows,
            )
        )
        print()
    summary = []
    base = None
    for r in http_results:
        if r.get("baseline"):
            base = r
        if r.get("get") and base is not None:
            config = r["name"].split(":")[0]
            ratio = r["rps"] / base["rps"]
            summary.append(
                [
                    f"{config}: GET /v1/jobs/{{id}} vs trivial",
                    f"{ratio:.0%}",
                    "≥ 50%",
                    ok(ratio >= 0.5),
                ]
            )
            summary.append(
                [
                    f"{config}: GET /v1/jobs/{{id}} p99",
                    f"{r['p99_ms']:.1f} ms",
                    "< 50 ms",
                    ok(r["p99_ms"] < 50),
                ]
            )
    if submit:
        ms = [v * 1e3 for v in submit["from_return"]]
        sent = [v * 1e3 for v in submit["from_send"]]
        p50 = statistics.median(ms)
        summary.append(
            [
                f"submit-to-running p50 / p90 / max (n={len(ms)})",
                f"{p50:.0f} / {pct(ms, 90):.0f} / {max(ms):.0f} ms",
                "p50 < 500 ms",
                ok(p50 < 500),
            ]
        )
        summary.append(
            [
                "  same, from the POST being sent",
                f"{statistics.median(sent):.0f} / {pct(sent, 90):.0f} / {max(sent):.0f} ms",
                "",
                "",
            ]
        )
    if metrics:
        epoch = statistics.median(metrics["epoch_seconds"])
        write = statistics.median(metrics["write_repeats"])
        in_training = statistics.median(metrics["write_in_training"])
        share = write / epoch
        summary.append(
            [
                f"metrics write ({metrics['names']} rows) / epoch",
                f"{write * 1e3:.1f} ms / {epoch:.2f} s = {share:.2%}"
                f" (epochs: {', '.join(f'{e:.2f} s' for e in metrics['epoch_seconds'])})",
                "< 1%",
                ok(share < 0.01),
            ]
        )
        summary.append(
            [
                "  writes during training (per epoch)",
                ", ".join(f"{w * 1e3:.1f} ms" for w in metrics["write_in_training"])
                + f" (median {in_training / epoch:.2%})",
                "",
                "",
            ]
        )
        summary.append(
            [
                "  heartbeat UPDATE (every 5 s, own thread)",
                f"{statistics.median(metrics['heartbeat']) * 1e3:.1f} ms",
                "",
                "",
            ]
        )
    if summary:
        print(table(["measure", "result", "target", ""], summary))


def ok(flag: bool) -> str:
    return "met" if flag else "NOT met"


if __name__ == "__main__":
    main()
