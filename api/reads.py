"""The API's hot reads: API-key checks and ``GET /v1/jobs/{id}``, without the threadpool.

Every authenticated request checks its key, and dashboards poll a job several times a
second, so these two reads decide how many clients one API process can serve. They run
on the event loop instead of in a worker thread:

- **PostgreSQL**: an ``asyncpg`` pool; each read is one prepared statement. The key
  check and the job fetch are one query (the job is outer-joined to the key), so a
  revoked key stops working at once — there is no cache to go stale. Key checks that
  arrive together are coalesced into one query (``Coalescer``), and so are polls, so
  under load one round trip answers dozens of them and requests never queue for the
  pool's connections.
- **Anything else** (the embedded SQLite default): the same queries on the
  synchronous engine, in one worker-thread hop each, the connection returned before the
  hop ends.

Each read is defined once (:func:`team_lookup`, :func:`job_lookup`) over a source of
requests: many requests unnested from arrays on PostgreSQL (compiled once for
asyncpg), one request of bound parameters elsewhere. They are built from the models
(``service.models``), so a schema change reaches them. Measured in
benchmarks/bench_service.py ("Service").
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, String, bindparam, func, literal, select
from sqlalchemy.engine import make_url

from service import job_ids
from service.auth import KEY_PREFIX, hash_key
from service.models import ApiKey, Job, Team

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

# Connections per API process for these reads; a read holds one for a single round
# trip, so a few serve hundreds of concurrent clients.
POOL_MAX_SIZE = 8
# How long one try of a read waits to connect or for a free connection; a read is
# tried twice, then answered 503 ("database_unavailable"): a client should hear
# quickly that the database is away.
POOL_TIMEOUT_SECONDS = 2.0
# Key checks and job polls are coalesced (``Coalescer``): at most this many batch
# queries of each at once, each answering up to BATCH_MAX requests. Together they
# never need more connections than the pool has, so no read waits for one.
KEY_BATCHES_IN_FLIGHT = 4
POLL_BATCHES_IN_FLIGHT = 4
BATCH_MAX = 256

# The jobs columns JobOut.from_job reads.
JOB_OUT_COLUMNS = (
    "id",
    "kind",
    "name",
    "state",
    "attempt",
    "progress_epoch",
    "progress_epochs",
    "progress_fraction",
    "created_at",
    "started_at",
    "finished_at",
    "error_code",
    "error_message",
    "summary",
    "spec",
    "worker",
    "progress_step",
    "progress_steps",
    "progress_images_per_second",
    "progress_eta_seconds",
    "progress_updated_at",
    "parent_id",
    "sweep_arm",
    "sweep_seed",
)


def _live_key(requests: Any) -> Any:
    keys = ApiKey.__table__
    return (keys.c.key_hash == requests.c.key_hash) & keys.c.revoked_at.is_(None)


def team_lookup(requests: Any) -> Select[Any]:
    """The key check, for every request of ``requests`` (columns ``key_hash``, ``i``):
    ``(i, id, name)`` of the team whose live key it is; a key not live has no row."""
    keys, teams = ApiKey.__table__, Team.__table__
    return select(requests.c.i, teams.c.id, teams.c.name).select_from(
        requests.join(keys, _live_key(requests)).join(teams, teams.c.id == keys.c.team_id)
    )


def job_lookup(requests: Any) -> Select[Any]:
    """The poll, for every request of ``requests`` (columns ``key_hash``, ``job_id``,
    ``i``): the key's team and the job's shown columns (``JOB_OUT_COLUMNS``, all NULL
    when the team has no such job); a key that is not live has no row. The key check
    and the fetch are one query, so a revoked key stops working at once."""
    keys, jobs = ApiKey.__table__, Job.__table__
    shown = [jobs.c[name] for name in JOB_OUT_COLUMNS]
    return select(requests.c.i, keys.c.team_id.label("key_team_id"), *shown).select_from(
        requests.join(keys, _live_key(requests)).outerjoin(
            jobs, (jobs.c.team_id == keys.c.team_id) & (jobs.c.id == requests.c.job_id)
        )
    )


def prefix_lookup(requests: Any) -> Select[Any]:
    """A short id's resolution, for every request of ``requests`` (columns
    ``key_hash``, ``pattern`` (``service.job_ids.like_pattern``), ``i``): the key's
    team, and one row per job of that team whose id matches (``id`` NULL when none
    does); a key that is not live has no row. Only the key's own team is searched."""
    keys, jobs = ApiKey.__table__, Job.__table__
    matches = jobs.c.id.like(requests.c.pattern, escape=job_ids.LIKE_ESCAPE)
    return (
        select(requests.c.i, keys.c.team_id.label("key_team_id"), jobs.c.id)
        .select_from(
            requests.join(keys, _live_key(requests)).outerjoin(
                jobs, (jobs.c.team_id == keys.c.team_id) & matches
            )
        )
        .order_by(jobs.c.id)
    )


def _one_request(*names: str) -> Any:
    """One request as a one-row source, its values bound parameters (any database)."""
    columns = [bindparam(n, type_=String).label(n) for n in names]
    return select(*columns, literal(1).label("i")).subquery("q")


def _batch_of_requests(*names: str) -> Any:
    """Many requests as arrays unnested side by side and numbered (PostgreSQL)."""
    from sqlalchemy.dialects.postgresql import ARRAY

    arrays = [bindparam(f"{n}s", type_=ARRAY(String)) for n in names]
    return func.unnest(*arrays).table_valued(*names, with_ordinality="i").render_derived(name="q")


@dataclass(frozen=True)
class JobRow:
    """The columns of a job that ``JobOut.from_job`` reads, as :func:`job_lookup`
    selects them."""

    id: str
    kind: str
    name: str | None
    state: str
    attempt: int
    progress_epoch: int
    progress_epochs: int
    progress_fraction: float | None
    created_at: Any
    started_at: Any
    finished_at: Any
    error_code: str | None
    error_message: str | None
    summary: dict[str, Any] | None
    spec: dict[str, Any]
    worker: str | None
    progress_step: int | None
    progress_steps: int | None
    progress_images_per_second: float | None
    progress_eta_seconds: float | None
    progress_updated_at: Any
    parent_id: str | None
    sweep_arm: str | None
    sweep_seed: int | None


@dataclass(frozen=True)
class KeyedJob:
    """What ``job_for_key`` found: ``team_id`` None means the key is not live;
    ``job`` None means the team has no job with that id (or another team has it)."""

    team_id: str | None
    job: JobRow | None


@dataclass(frozen=True)
class PrefixMatches:
    """What ``jobs_for_prefix`` found: ``team_id`` None means the key is not live;
    ``job_ids`` are the team's ids that start with the prefix."""

    team_id: str | None
    job_ids: list[str]


class Reads:
    """The two hot reads over one database URL; one instance per app, made lazily on
    the event loop that serves it (``reads_for``)."""

    async def team_for_key(self, token: str) -> Team | None:
        """The team owning ``token`` if it is a live key (not revoked), else None."""
        if not _plausible(token):
            return None
        row = await self._team_row(hash_key(token))
        # Detached: the routes use only the id (and the name in logs).
        return Team(id=row["id"], name=row["name"]) if row is not None else None

    async def job_for_key(self, token: str, job_id: str) -> KeyedJob:
        if not _plausible(token):
            return KeyedJob(None, None)
        return _keyed_job(await self._job_row(hash_key(token), job_id))

    async def jobs_for_prefix(self, token: str, prefix: str) -> PrefixMatches:
        """The team's job ids starting with ``prefix`` (a short id, resolved before
        the poll; never coalesced: a full id, the common case, does not come here)."""
        if not _plausible(token):
            return PrefixMatches(None, [])
        rows = await self._prefix_rows(hash_key(token), job_ids.like_pattern(prefix))
        if not rows:
            return PrefixMatches(None, [])
        return PrefixMatches(
            rows[0]["key_team_id"], [row["id"] for row in rows if row["id"] is not None]
        )

    async def _prefix_rows(self, key_hash: str, pattern: str) -> list[Mapping[str, Any]]:
        """The rows of statement "prefix" for a key hash and LIKE pattern."""
        raise NotImplementedError

    async def _team_row(self, key_hash: str) -> Mapping[str, Any] | None:
        """The row of statement "team" (``id``, ``name``) for a key hash, or None."""
        raise NotImplementedError

    async def _job_row(self, key_hash: str, job_id: str) -> Mapping[str, Any] | None:
        """The row of statement "job" for a key hash and job id, or None."""
        raise NotImplementedError

    async def close(self) -> None:
        pass


def _keyed_job(row: Mapping[str, Any] | None) -> KeyedJob:
    if row is None:
        return KeyedJob(None, None)
    job = JobRow(**{name: row[name] for name in JOB_OUT_COLUMNS}) if row["id"] is not None else None
    return KeyedJob(row["key_team_id"], job)


def _plausible(token: str) -> bool:
    return token.startswith(KEY_PREFIX) and len(token) <= 200


class DatabaseUnavailable(Exception):
    """The database could not be reached for a read (answered 503 by api/errors.py)."""


def _asyncpg_sql(statement: Select[Any]) -> str:
    """The statement as asyncpg runs it (``$1``-style parameters, in the order of the
    arrays passed to ``conn.fetch``)."""
    from sqlalchemy.dialects.postgresql.asyncpg import dialect

    return str(statement.compile(dialect=dialect()))


class Coalescer(Generic[K, V]):
    """Answers concurrent lookups with as few queries as load allows.

    A lookup waits for the end of the current event-loop iteration; everything asked
    by then goes out as one batch. At most ``max_in_flight`` batches run at once;
    lookups that arrive meanwhile wait for the next free slot and go out together.
    So an idle service answers each poll with its own query at once, and a busy one
    answers dozens with one round trip instead of queueing dozens of round trips for
    the pool. Nothing is cached: every answer comes from a query sent after it was
    asked.
    """

    def __init__(
        self,
        run_batch: Callable[[list[K]], Awaitable[list[V]]],
        *,
        max_in_flight: int,
        max_batch: int,
    ) -> None:
        if max_in_flight < 1 or max_batch < 1:
            raise ValueError("max_in_flight and max_batch must be at least 1")
        self._run_batch = run_batch
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._waiting: list[tuple[K, asyncio.Future[V]]] = []
        self._in_flight = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> V:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[V] = loop.create_future()
        self._waiting.append((key, future))
        self._schedule(loop)
        return await future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._flush_scheduled and self._in_flight < self._max_in_flight:
            self._flush_scheduled = True
            loop.call_soon(self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush_scheduled = False
        while self._waiting and self._in_flight < self._max_in_flight:
            batch = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            self._in_flight += 1
            task = loop.create_task(self._run(batch, loop))
            self._tasks.add(task)  # a reference, so the task is not collected mid-run
            task.add_done_callback(self._tasks.discard)

    async def _run(
        self, batch: list[tuple[K, asyncio.Future[V]]], loop: asyncio.AbstractEventLoop
    ) -> None:
        try:
            results = await self._run_batch([key for key, _ in batch])
        except asyncio.CancelledError:
            # The batch itself was cancelled (the loop is shutting down): its lookups
            # must not wait for an answer that will never come.
            for _, future in batch:
                future.cancel()
            raise
        except DatabaseUnavailable as exc:
            # The database is away for everyone: one answer (503) for all.
            for _, future in batch:
                if not future.done():  # a client that went away cancelled its own
                    future.set_exception(exc)
        except Exception as exc:
            if len(batch) == 1:
                _, future = batch[0]
                if not future.done():
                    future.set_exception(exc)
            else:
                # Something in the batch made the query fail (the edge refuses the inputs
                # known to, api/edge.py; this is for the ones nobody foresaw): answer each
                # member on its own, so only the request that caused it fails.
                for key, future in batch:
                    await self._run_alone(key, future)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            if self._waiting:
                self._schedule(loop)

    async def _run_alone(self, key: K, future: asyncio.Future[V]) -> None:
        if future.done():
            return
        try:
            (result,) = await self._run_batch([key])
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)


def _unavailable() -> tuple[type[BaseException], ...]:
    """asyncpg's errors that mean "the database is away", not "the query is wrong":
    refused or reset connections, timeouts, a server shutting down or starting up, too
    many clients, and a connection the server killed mid-protocol."""
    import asyncpg
    from asyncpg import exceptions as pg

    return (
        OSError,
        TimeoutError,
        asyncpg.InterfaceError,
        pg.InternalClientError,
        pg.PostgresConnectionError,
        pg.OperatorInterventionError,
        pg.InsufficientResourcesError,
    )


class PostgresReads(Reads):
    """asyncpg: its protocol is compiled and runs on the loop's own callbacks, which
    made the poll ~25 % cheaper than psycopg's async mode in the benchmark."""

    def __init__(self, url: str) -> None:
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(False)
        key_sql = _asyncpg_sql(team_lookup(_batch_of_requests("key_hash")))
        poll_sql = _asyncpg_sql(job_lookup(_batch_of_requests("key_hash", "job_id")))
        self._prefix_sql = _asyncpg_sql(prefix_lookup(_batch_of_requests("key_hash", "pattern")))

        async def key_batch(key_hashes: list[str]) -> list[Mapping[str, Any] | None]:
            return await self._batch(key_sql, len(key_hashes), key_hashes)

        async def poll_batch(polls: list[tuple[str, str]]) -> list[Mapping[str, Any] | None]:
            key_hashes = [key_hash for key_hash, _ in polls]
            job_ids = [job_id for _, job_id in polls]
            return await self._batch(poll_sql, len(polls), key_hashes, job_ids)

        self._keys = Coalescer(key_batch, max_in_flight=KEY_BATCHES_IN_FLIGHT, max_batch=BATCH_MAX)
        self._polls = Coalescer(
            poll_batch, max_in_flight=POLL_BATCHES_IN_FLIGHT, max_batch=BATCH_MAX
        )
        self._pool: Any = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> Any:
        import asyncpg

        async def init(conn: Any) -> None:
            # JSON columns as Python objects, as the ORM returns them.
            for json_type in ("json", "jsonb"):
                await conn.set_type_codec(
                    json_type, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
                )

        async def reset(conn: Any) -> None:
            # These connections only ever run the read statements above (no session
            # state, locks or LISTENs to undo), so the default reset, one more round
            # trip per read, is skipped.
            return None

        # min_size=0: nothing connects until a read needs it, so a database that is
        # down fails that read at once (503) instead of the app's start.
        return await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=POOL_MAX_SIZE,
            init=init,
            reset=reset,
            timeout=POOL_TIMEOUT_SECONDS,  # per connection attempt
        )

    async def _team_row(self, key_hash: str) -> Mapping[str, Any] | None:
        return await self._keys.get(key_hash)

    async def _job_row(self, key_hash: str, job_id: str) -> Mapping[str, Any] | None:
        return await self._polls.get((key_hash, job_id))

    async def _prefix_rows(self, key_hash: str, pattern: str) -> list[Mapping[str, Any]]:
        sql = self._prefix_sql
        return list(await self._query(lambda conn: conn.fetch(sql, [key_hash], [pattern])))

    async def _batch(self, sql: str, n: int, *arrays: list[str]) -> list[Mapping[str, Any] | None]:
        """Run a batch statement over ``n`` requests; a row (or None) for each, in order
        (the statement numbers its rows ``i`` = 1..n WITH ORDINALITY)."""
        rows = await self._query(lambda conn: conn.fetch(sql, *arrays))
        by_position = {row["i"]: row for row in rows}
        return [by_position.get(i) for i in range(1, n + 1)]

    async def _query(self, fetch: Callable[[Any], Awaitable[T]]) -> T:
        if self._pool is None:
            async with self._lock:  # the first requests arrive together
                if self._pool is None:
                    self._pool = await self._connect()
        try:
            return await self._on_connection(fetch)
        except _unavailable():
            # A read is safe to repeat: once more, on a fresh connection. What broke
            # one pooled connection (a database restart) broke the others too, so all
            # are replaced, as SQLAlchemy's pool does on a disconnect.
            await self._pool.expire_connections()
            try:
                return await self._on_connection(fetch)
            except _unavailable() as exc:
                raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc

    async def _on_connection(self, fetch: Callable[[Any], Awaitable[T]]) -> T:
        async with self._pool.acquire(timeout=POOL_TIMEOUT_SECONDS) as conn:
            try:
                return await fetch(conn)
            except _unavailable():
                # Never hand a connection in an unknown state back to the pool (a
                # server-side kill can leave asyncpg's protocol mid-operation).
                conn.terminate()
                raise

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


class ThreadedReads(Reads):
    """SQLite (and any other backend): the synchronous engine, one thread hop a read."""

    def __init__(self, url: str) -> None:
        from service.db import engine_for

        self._engine = engine_for(url)
        self._statements = {
            "team": team_lookup(_one_request("key_hash")),
            "job": job_lookup(_one_request("key_hash", "job_id")),
            "prefix": prefix_lookup(_one_request("key_hash", "pattern")),
        }

    def _run(self, name: str, params: dict[str, Any]) -> Mapping[str, Any] | None:
        with self._engine.connect() as conn:
            row = conn.execute(self._statements[name], params).mappings().first()
            return None if row is None else dict(row)

    async def _first(self, name: str, params: dict[str, Any]) -> Mapping[str, Any] | None:
        from anyio import to_thread

        return await to_thread.run_sync(self._run, name, params)

    async def _team_row(self, key_hash: str) -> Mapping[str, Any] | None:
        return await self._first("team", {"key_hash": key_hash})

    async def _job_row(self, key_hash: str, job_id: str) -> Mapping[str, Any] | None:
        return await self._first("job", {"key_hash": key_hash, "job_id": job_id})

    def _run_all(self, name: str, params: dict[str, Any]) -> list[Mapping[str, Any]]:
        with self._engine.connect() as conn:
            return [dict(row) for row in conn.execute(self._statements[name], params).mappings()]

    async def _prefix_rows(self, key_hash: str, pattern: str) -> list[Mapping[str, Any]]:
        from anyio import to_thread

        params = {"key_hash": key_hash, "pattern": pattern}
        return await to_thread.run_sync(self._run_all, "prefix", params)


def make_reads(url: str) -> Reads:
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return PostgresReads(url)
    return ThreadedReads(url)


async def reads_for(state: Any, url: str) -> Reads:
    """The app's ``Reads`` (kept on ``app.state``), created on first use.

    Lazily, on the serving loop, so creating the app stays cheap and a pool is never
    used from a loop other than the one it was opened on (a test client may start a
    new loop; it gets new reads).
    """
    loop = asyncio.get_running_loop()
    current = getattr(state, "reads", None)
    if current is not None and current[0] is loop:
        return current[1]
    # No await between the check and the store: one coroutine at a time gets here.
    reads = make_reads(url)
    state.reads = (loop, reads)
    return reads


async def close_reads(state: Any) -> None:
    current = getattr(state, "reads", None)
    if current is not None:
        state.reads = None
        await current[1].close()
