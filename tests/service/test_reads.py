"""The API's hot reads (api/reads.py): key checks and GET /v1/jobs/{id} on the event loop.

In-process against both backends (PostgreSQL through asyncpg, SQLite through the
synchronous engine in a thread), then over HTTP against a real uvicorn: the fast path
answers exactly what the ORM path does, revocation is immediate, a burst of clients
never stalls the threadpool, and connections the database dropped are replaced.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest
from conftest import create_team

from api.reads import PostgresReads, ThreadedReads, make_reads
from service import auth
from service.db import migrate, session_scope
from service.models import Job

PRETRAIN = {"method": "simclr", "epochs": 1, "batch_size": 32, "ldreg": {"k": 8}}


def seed(url: str, prefix: str = "reads") -> dict[str, str]:
    """Two teams; team A has a job, a live key and a revoked one."""
    with session_scope(url) as s:
        team_a, key_a = auth.create_team(session=s, name=f"{prefix}-a")
        revoked = auth.create_key(session=s, team=team_a)
        auth.revoke_key(session=s, key_or_prefix=revoked)
        team_b, key_b = auth.create_team(session=s, name=f"{prefix}-b")
        job = Job(
            team_id=team_a.id,
            kind="pretrain",
            name="seeded",
            spec={"method": "simclr", "nested": {"k": [1, 2]}},
            progress_epochs=3,
            progress_fraction=0.25,
            started_at=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        )
        s.add(job)
        s.flush()
        return {
            "team_a": team_a.id,
            "team_b": team_b.id,
            "key_a": key_a,
            "key_b": key_b,
            "revoked": revoked,
            "job": job.id,
        }


@pytest.fixture(params=["postgresql", "sqlite"])
def backend(request, pg_url: str, tmp_path: Path) -> tuple[str, type]:
    if request.param == "postgresql":
        return pg_url, PostgresReads
    url = f"sqlite:///{tmp_path / 'reads.db'}"
    migrate(url)
    return url, ThreadedReads


def test_key_and_job_reads_on_both_backends(backend: tuple[str, type]) -> None:
    url, expected_class = backend
    ids = seed(url)

    async def scenario() -> None:
        reads = make_reads(url)
        assert isinstance(reads, expected_class)
        try:
            team = await reads.team_for_key(ids["key_a"])
            assert team is not None and (team.id, team.name) == (ids["team_a"], "reads-a")
            for bad in (ids["revoked"], "ldr_" + "x" * 43, "no-prefix", "ldr_" + "y" * 300):
                assert await reads.team_for_key(bad) is None, bad

            own = await reads.job_for_key(ids["key_a"], ids["job"])
            assert own.team_id == ids["team_a"] and own.job is not None
            job = own.job
            assert (job.id, job.state, job.attempt, job.name) == (ids["job"], "queued", 0, "seeded")
            assert job.spec == {"method": "simclr", "nested": {"k": [1, 2]}}
            assert (job.progress_epoch, job.progress_epochs, job.progress_fraction) == (0, 3, 0.25)
            assert job.started_at == datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
            assert job.started_at.utcoffset().total_seconds() == 0
            assert job.summary is None and job.finished_at is None

            # Another team's job: the key is fine, the job is not there for it.
            other = await reads.job_for_key(ids["key_b"], ids["job"])
            assert other.team_id == ids["team_b"] and other.job is None
            missing = await reads.job_for_key(ids["key_a"], "0" * 32)
            assert missing.team_id == ids["team_a"] and missing.job is None
            for bad in (ids["revoked"], "nonsense"):
                assert (await reads.job_for_key(bad, ids["job"])).team_id is None

            # Many at once, mixed: on PostgreSQL they go out as a few batch queries,
            # and each poll must still get its own answer.
            asks = [
                (ids["key_a"], ids["job"]),
                (ids["key_b"], ids["job"]),
                (ids["revoked"], ids["job"]),
                (ids["key_a"], "0" * 32),
            ] * 25
            many = await asyncio.gather(*(reads.job_for_key(k, j) for k, j in asks))
            for (key, job_id), got in zip(asks, many, strict=True):
                if key == ids["revoked"]:
                    assert got.team_id is None
                elif key == ids["key_b"]:
                    assert (got.team_id, got.job) == (ids["team_b"], None)
                elif job_id == ids["job"]:
                    assert got.team_id == ids["team_a"] and got.job.id == ids["job"]
                else:
                    assert (got.team_id, got.job) == (ids["team_a"], None)

            # Key checks too (every other route's first step): each its own answer.
            keys = [ids["key_a"], ids["revoked"], ids["key_b"], "ldr_" + "x" * 43] * 25
            owners = {ids["key_a"]: ids["team_a"], ids["key_b"]: ids["team_b"]}
            teams = await asyncio.gather(*(reads.team_for_key(key) for key in keys))
            assert [t.id if t else None for t in teams] == [owners.get(key) for key in keys]
        finally:
            await reads.close()

    asyncio.run(scenario())


def test_concurrent_reads_share_queries_on_postgresql(pg_url: str) -> None:
    """A hundred key checks and a hundred polls at once are a handful of queries, not
    two hundred waits for the pool's 8 connections."""
    ids = seed(pg_url, prefix="shared")

    async def scenario() -> None:
        reads = make_reads(pg_url)
        queries = 0
        real_query = reads._query

        async def counting(fetch):
            nonlocal queries
            queries += 1
            return await real_query(fetch)

        reads._query = counting
        try:
            teams, polls = await asyncio.gather(
                asyncio.gather(*(reads.team_for_key(ids["key_a"]) for _ in range(100))),
                asyncio.gather(*(reads.job_for_key(ids["key_b"], ids["job"]) for _ in range(100))),
            )
            assert {t.id for t in teams} == {ids["team_a"]}
            assert {(p.team_id, p.job) for p in polls} == {(ids["team_b"], None)}
            assert queries <= 4, queries
        finally:
            await reads.close()

    asyncio.run(scenario())


def test_get_job_is_the_orm_view_and_checks_the_key_each_time(
    client: httpx.Client, api_server: str, service_env: dict[str, str]
) -> None:
    job = client.post("/v1/jobs", json={"kind": "pretrain", "name": "fast", "spec": PRETRAIN})
    assert job.status_code == 201
    job_id = job.json()["id"]
    got = client.get(f"/v1/jobs/{job_id}")
    assert got.status_code == 200 and got.headers["content-type"] == "application/json"
    # The list is served by the ORM path: the same job must read identically (but for
    # the queue position and reason, which only the list computes).
    listed = next(j for j in client.get("/v1/jobs").json()["jobs"] if j["id"] == job_id)
    assert isinstance(listed.pop("queue_position"), int)
    assert isinstance(listed.pop("queue_reason"), str)
    assert got.json() == {**listed, "queue_position": None, "queue_reason": None} == job.json()
    # A short prefix reads the same job (resolved first, then the same poll).
    assert client.get(f"/v1/jobs/{job_id[:7]}").json() == got.json()

    other = create_team(service_env)
    r = httpx.get(f"{api_server}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {other}"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "id"
    assert client.get(f"/v1/jobs/{'0' * 32}").status_code == 404
    r = httpx.get(f"{api_server}/v1/jobs/{job_id}")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")

    # Revocation takes effect on the very next request (no cached key).
    key = client.headers["Authorization"].removeprefix("Bearer ")
    with session_scope(service_env["LDREG_DATABASE_URL"]) as s:
        auth.revoke_key(session=s, key_or_prefix=key)
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


def test_a_burst_of_clients_is_served_without_stalling(client: httpx.Client) -> None:
    """128 clients at once, most on routes with an ORM session, some on the fast path.

    A route must never hold a pooled connection while it waits for a threadpool
    thread: a burst larger than the pool then fills the threadpool with threads waiting
    for connections that only queued requests could return, and the API stalls until
    the pool's 30 s timeout. It happened twice: the key check once ran in a hop of its
    own, and FastAPI validates a sync route's returned model in a second hop while the
    session is still open (the routes now serialize in their own hop,
    ``api.schemas.json_response``).
    """
    job_id = client.post("/v1/jobs", json={"kind": "pretrain", "spec": PRETRAIN}).json()["id"]
    paths = [f"/v1/jobs/{job_id}"] * 16 + ["/v1/jobs", f"/v1/jobs/{job_id}/events"] * 56

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=len(paths))
        async with httpx.AsyncClient(
            base_url=str(client.base_url), headers=client.headers, limits=limits, timeout=60
        ) as c:
            answers = await asyncio.gather(*(c.get(p) for p in paths))
        return [a.status_code for a in answers]

    for _ in range(3):
        started = time.monotonic()
        codes = asyncio.run(burst())
        assert codes == [200] * len(paths)
        assert time.monotonic() - started < 15, "the burst stalled"


def test_connections_the_database_dropped_are_replaced(client: httpx.Client, pg_url: str) -> None:
    job_id = client.post("/v1/jobs", json={"kind": "pretrain", "spec": PRETRAIN}).json()["id"]
    for _ in range(20):  # fill the read pool
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchone()[0]
    assert killed >= 1
    # What an administrator's restart does to open connections: the next reads reconnect.
    for _ in range(5):
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
