"""Fixtures for service tests: real PostgreSQL, real Redis, real processes.

Each test session gets its own PostgreSQL database (migrated with Alembic) and its
own Redis database index; the API (uvicorn) and Celery workers run as separate
processes started through the ``ldreg`` command line, in their own process group so
fault tests can SIGKILL them for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from cli.processes import ServiceProcess, free_port, wait_http_ok
from service import auth
from service.db import session_scope
from tests.conftest import fresh_postgres_database

REDIS_SERVER = "redis://127.0.0.1:6379"
LDREG = str(Path(sys.executable).with_name("ldreg"))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head."""
    with fresh_postgres_database("ldreg_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database index of its own, emptied at the start of the session.

    Several test sessions may run at once on one machine; with a shared index one
    session's worker would take (and skip) another session's job messages. So each
    session claims a free index 1-15 with a SET NX marker in index 0, released at the
    end (and expiring by itself if the session is killed).
    """
    marker = redis.Redis.from_url(f"{REDIS_SERVER}/0")
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for index in range(1, 16):
        key = f"ldreg-test-session:{index}"
        if marker.set(key, token, nx=True, ex=2 * 3600):
            break
    else:
        raise RuntimeError("no free Redis database index (1-15) for this test session")
    url = f"{REDIS_SERVER}/{index}"
    redis.Redis.from_url(url).flushdb()
    yield url
    if marker.get(key) == token.encode():
        marker.delete(key)


@pytest.fixture(scope="session")
def service_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("ldreg_home")
    (home / "data").mkdir()
    return home


@pytest.fixture(scope="session")
def service_env(pg_url: str, redis_url: str, service_home: Path) -> dict[str, str]:
    """Environment for every service process: production services, fast timings."""
    env = dict(os.environ)
    env.update(
        LDREG_DATABASE_URL=pg_url,
        LDREG_BROKER_URL=redis_url,
        LDREG_HOME=str(service_home),
        LDREG_HEARTBEAT_SECONDS="1",
        LDREG_STALE_AFTER_SECONDS="6",
        LDREG_SWEEP_INTERVAL_SECONDS="1",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    return env


@pytest.fixture(scope="session")
def api_server(service_env: dict[str, str], service_home: Path) -> Iterator[str]:
    """The API as a real uvicorn process; yields its base URL."""
    port = free_port()
    proc = ServiceProcess(
        [LDREG, "api", "--host", "127.0.0.1", "--port", str(port)],
        service_env,
        service_home / "api.log",
    ).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{base}/healthz", proc=proc)
        yield base
    finally:
        proc.stop()


@pytest.fixture
def start_worker(
    service_env: dict[str, str], service_home: Path, pg_url: str, redis_url: str
) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory: start a real Celery worker (``ldreg worker``); all stopped at teardown.

    Jobs that earlier tests left queued (API tests submit without a worker) would run
    ahead of this test's on its worker; they are finished business, so they are
    closed, and their messages dropped, before the test's body submits anything. No
    worker runs at this point (earlier tests' workers were stopped at their teardown).
    """
    close_leftover_jobs(pg_url)
    redis.Redis.from_url(redis_url).flushdb()
    started: list[ServiceProcess] = []

    def _start(queues: str = "cpu", **extra_env: str) -> ServiceProcess:
        env = {**service_env, **extra_env}
        log = service_home / f"worker-{len(started)}-{uuid.uuid4().hex[:6]}.log"
        proc = ServiceProcess([LDREG, "worker", "--queues", queues], env, log).start()
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        proc.stop()


def close_leftover_jobs(pg_url: str) -> None:
    from sqlalchemy import update

    from service.db import session_scope
    from service.models import ACTIVE_STATES, Job, utcnow

    with session_scope(pg_url) as s:
        s.execute(
            update(Job)
            .where(Job.state.in_([st.value for st in ACTIVE_STATES]))
            .values(state="cancelled", finished_at=utcnow(), cancel_requested=True)
        )


def create_team(env: dict[str, str], name: str | None = None) -> str:
    """Create a team through the real CLI; its API key is the last line printed."""
    name = name or f"team-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        [LDREG, "admin", "create-team", name],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture
def team_key(service_env: dict[str, str]) -> str:
    return create_team(service_env)


@pytest.fixture
def client(api_server: str, team_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=api_server, headers={"Authorization": f"Bearer {team_key}"}, timeout=30
    ) as c:
        yield c


def wait_for(
    client: httpx.Client,
    job_id: str,
    done: Callable[[dict], bool],
    *,
    timeout: float = 150.0,
    worker=None,
) -> dict:
    """Poll the job over HTTP until ``done(job)``; fail early, with the worker's log, if
    the worker exits, and with the last state on timeout."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        if worker is not None and not worker.alive():
            raise AssertionError(f"worker exited:\n{worker.log()[-4000:]}")
        time.sleep(0.25)
    logs = worker.log()[-6000:] if worker is not None else ""
    raise AssertionError(f"timed out; job is {job}\n{logs}")


def finished(job: dict) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


@pytest.fixture
def new_team(api_server: str, pg_url: str) -> Iterator[Callable[[], tuple[httpx.Client, str]]]:
    """Factory: (client, team id) for a new team, made with the data-layer call that
    ``ldreg admin create-team`` uses (in-process, to keep the suite fast)."""
    clients: list[httpx.Client] = []

    def make(base: str = api_server) -> tuple[httpx.Client, str]:
        with session_scope(pg_url) as s:
            team, key = auth.create_team(session=s, name=f"team-{uuid.uuid4().hex[:10]}")
        c = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        clients.append(c)
        return c, team.id

    yield make
    for c in clients:
        c.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/service starts real processes: mark it ``service``, so
    ``make test-fast`` (``-m "not service"``) leaves it out."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.service)
