"""``/metrics`` for Prometheus: HTTP traffic, and the service's state read at scrape time.

- ``ldreg_http_requests_total`` / ``ldreg_http_request_duration_seconds``: by method,
  route *template* (``/v1/jobs/{job_id}``, never the raw path, so a scan of random ids
  cannot explode the series count) and status, from an ASGI middleware.
- Gauges computed on each scrape from a few cheap aggregate queries (no background
  thread, so every API replica reports the same truth): jobs by state and kind, queue
  depth, running jobs' epochs per hour, worker heartbeat ages, the age of the oldest
  queued job, and whether the database and broker answered.

Unauthenticated by design (docs/api.md, "Auth"): it exposes counts, never job content;
keep it on the internal network. docs/operations.md has the alert rules.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db import session_factory
from service.models import Job, JobState, Metric
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

JOB_KINDS = ("pretrain", "diagnose")
QUEUES = ("cpu", "gpu")
# kombu's Redis transport keeps messages of priority p>0 under "<queue>\x06\x16<p>".
_REDIS_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RequestMetricsMiddleware:
    """Counts requests and times them, labelled by the matched route's template."""

    def __init__(self, app: ASGIApp, *, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency
        self._mounts: dict[int, str] | None = None
        # Per label set, the metric children (``labels()`` takes a lock and validates
        # each time); per matched route, its template. Both are bounded by the routes.
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        # By id(route); the route is kept in the entry, so its id cannot be reused.
        self._templates: dict[int, tuple[Any, str]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception that escapes every handler ends as a 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            labels = (scope["method"], self._route_template(scope), str(status))
            children = self._children.get(labels)
            if children is None:
                children = (self.requests.labels(*labels), self.latency.labels(*labels))
                self._children[labels] = children
            children[0].inc()
            children[1].observe(time.perf_counter() - start)

    def _route_template(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            entry = self._templates.get(id(route))
            if entry is None or entry[0] is not route:
                entry = self._templates[id(route)] = (route, _with_prefix(route, scope["path"]))
            return entry[1]
        endpoint = scope.get("endpoint")
        if endpoint is not None:  # a Mount (static files): label it by its prefix
            if self._mounts is None:
                app = scope.get("app")
                routes = getattr(getattr(app, "router", None), "routes", [])
                self._mounts = {
                    id(r.app): (r.path or "/") + "/*" for r in routes if isinstance(r, Mount)
                }
            return self._mounts.get(id(endpoint), "<mount>")
        return "<unmatched>"


def _with_prefix(route: Any, path: str) -> str:
    """The route's template with the prefix it was included under.

    FastAPI may hand over the route as declared (``/jobs/{job_id}``) even when it was
    included with ``prefix="/v1"``; the prefix is then the part of the request path in
    front of what the route's own pattern matches.
    """
    regex = getattr(route, "path_regex", None)
    if regex is None or regex.fullmatch(path):
        return route.path
    start = path.find("/", 1)
    while start != -1:
        if regex.fullmatch(path[start:]):
            return path[:start] + route.path
        start = path.find("/", start + 1)
    return route.path


class ServiceStateCollector(Collector):
    """Gauges read from the database and the broker when Prometheus scrapes."""

    def __init__(self, settings: Callable[[], Settings]) -> None:
        self._settings = settings

    @property
    def settings(self) -> Settings:
        return self._settings()

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Without this, registering the collector calls collect(): a database and broker
        # round trip at app start-up, which can hang start-up while the database is down.
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        db_up = GaugeMetricFamily("ldreg_database_up", "1 if the database answered this scrape")
        try:
            yield from self._job_gauges()
            db_up.add_metric([], 1)
        except Exception as exc:  # a scrape must answer even while the database is down
            log.warning("metrics: database unavailable: %s", exc)
            db_up.add_metric([], 0)
        yield db_up
        yield from self._queue_gauges()

    def _job_gauges(self) -> Iterable[GaugeMetricFamily]:
        now = datetime.now(UTC)
        with session_factory(self.settings.database_url)() as session:
            counts = session.execute(
                select(Job.state, Job.kind, func.count()).group_by(Job.state, Job.kind)
            ).all()
            running = session.execute(
                select(
                    Job.id, Job.kind, Job.progress_epoch, Job.started_at, Job.heartbeat_at
                ).where(Job.state.in_([JobState.RUNNING.value, JobState.CANCELLING.value]))
            ).all()
            oldest_queued = session.execute(
                select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED.value)
            ).scalar()
            epoch_seconds: dict[str, float] = {}
            if running:
                epoch_seconds = dict(
                    session.execute(
                        select(Metric.job_id, func.avg(Metric.value))
                        .where(
                            Metric.job_id.in_([r.id for r in running]),
                            Metric.name == "epoch_seconds",
                        )
                        .group_by(Metric.job_id)
                    ).all()
                )

        by_state = GaugeMetricFamily(
            "ldreg_jobs_by_state", "Jobs in each state, by kind", labels=["state", "kind"]
        )
        found = {(s, k): n for s, k, n in counts}
        kinds = sorted(set(JOB_KINDS) | {k for _, k in found})
        for state in JobState:
            for kind in kinds:
                by_state.add_metric([state.value, kind], found.get((state.value, kind), 0))
        yield by_state

        rate = GaugeMetricFamily(
            "ldreg_job_epochs_per_hour",
            "Training speed of each running job (from epoch_seconds, else since its start)",
            labels=["job_id", "kind"],
        )
        ages = []
        for job in running:
            per_hour = _epochs_per_hour(job, epoch_seconds.get(job.id), now)
            if per_hour is not None:
                rate.add_metric([job.id, job.kind], per_hour)
            if job.heartbeat_at is not None:
                ages.append((now - _aware(job.heartbeat_at)).total_seconds())
        yield rate

        yield GaugeMetricFamily(
            "ldreg_running_jobs", "Jobs running or cancelling now", value=len(running)
        )
        yield GaugeMetricFamily(
            "ldreg_worker_heartbeat_age_seconds_max",
            "Oldest heartbeat among running jobs (0 when none run)",
            value=max(ages, default=0.0),
        )
        yield GaugeMetricFamily(
            "ldreg_worker_heartbeat_age_seconds_avg",
            "Mean heartbeat age over running jobs (0 when none run)",
            value=sum(ages) / len(ages) if ages else 0.0,
        )
        yield GaugeMetricFamily(
            "ldreg_oldest_queued_job_age_seconds",
            "How long the oldest queued job has waited (0 when none wait)",
            value=(now - _aware(oldest_queued)).total_seconds() if oldest_queued else 0.0,
        )

    def _queue_gauges(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "ldreg_queue_depth", "Messages waiting in each broker queue", labels=["queue"]
        )
        broker_up = GaugeMetricFamily("ldreg_broker_up", "1 if the broker answered this scrape")
        try:
            for queue, n in _queue_depths(self.settings).items():
                depth.add_metric([queue], n)
            broker_up.add_metric([], 1)
        except Exception as exc:
            log.warning("metrics: broker unavailable: %s", exc)
            broker_up.add_metric([], 0)
        yield depth
        yield broker_up


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _epochs_per_hour(job: Any, mean_epoch_seconds: float | None, now: datetime) -> float | None:
    if mean_epoch_seconds and mean_epoch_seconds > 0:
        return 3600.0 / mean_epoch_seconds
    if job.started_at is None:
        return None
    hours = (now - _aware(job.started_at)).total_seconds() / 3600.0
    return job.progress_epoch / hours if hours > 0 else 0.0


_redis_clients: dict[str, Any] = {}


def _queue_depths(settings: Settings) -> dict[str, int]:
    """LLEN of each Celery queue on Redis; message files on the filesystem broker."""
    url = settings.broker_url
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = _redis_clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
            _redis_clients[url] = client
        pipe = client.pipeline(transaction=False)
        for queue in QUEUES:
            for suffix in _REDIS_PRIORITY_SUFFIXES:
                pipe.llen(queue + suffix)
        lengths = iter(pipe.execute())
        return {q: sum(next(lengths) for _ in _REDIS_PRIORITY_SUFFIXES) for q in QUEUES}
    if url.startswith("filesystem://"):
        # kombu's filesystem transport names a message "<ms>_<uuid>.<queue>.msg".
        folder = settings.broker_dir / "queue"
        counts = dict.fromkeys(QUEUES, 0)
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name.endswith(".msg"):
                    queue = name.partition(".")[2].removesuffix(".msg")
                    counts[queue] = counts.get(queue, 0) + 1
        return counts
    return {}


def install_observability(app: FastAPI) -> None:
    """Add the request-metrics middleware and the ``/metrics`` route to ``app``.

    Each app gets its own registry, so building several apps in one process (tests)
    never registers a metric twice.
    """
    registry = CollectorRegistry(auto_describe=True)
    requests = Counter(
        "ldreg_http_requests",
        "HTTP requests by method, route template and status",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "ldreg_http_request_duration_seconds",
        "HTTP request latency by method, route template and status",
        ["method", "route", "status"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    # The app's settings (create_app may be given its own), else the environment's.
    registry.register(
        ServiceStateCollector(lambda: getattr(app.state, "settings", None) or get_settings())
    )
    app.state.metrics_registry = registry
    app.add_middleware(RequestMetricsMiddleware, requests=requests, latency=latency)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        # Text format 0.0.4 unless the scraper asks for OpenMetrics.
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), headers={"Content-Type": content_type})
