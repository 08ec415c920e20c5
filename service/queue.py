"""The broker side of the service: one Celery configuration for the API and the workers.

The broker only carries a job id; the database is the truth (see docs/architecture.md).
This module imports Celery and kombu but never the worker's code or torch: the API
publishes by task *name* (``send_task``), so it does not even need the task defined.
"""

from __future__ import annotations

import logging

from celery import Celery
from kombu import Exchange, Queue

from service.settings import Settings

log = logging.getLogger(__name__)

TASK_NAME = "ldreg.run_job"
QUEUES = ("cpu", "gpu")


class _HostlessBrokerIsFine(logging.Filter):
    """The filesystem transport has no host, and kombu warns "No hostname was
    supplied" on every connection to it: noise in every embedded process's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No hostname was supplied")


_HOSTLESS_BROKER_IS_FINE = _HostlessBrokerIsFine()


def broker_transport_options(settings: Settings) -> dict:
    if settings.broker_url.startswith("filesystem://"):
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # One folder for both directions: every process publishes into and
        # consumes from the same place. kombu moves a message file away
        # atomically (rename) before reading it, so two workers never get the same file.
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            # How often an idle worker looks for new files (seconds).
            "polling_interval": 0.2,
        }
    return {
        # Early ack (below) means a *started* job is never re-delivered by Redis.
        # Only a message reserved by a worker that then died unstarted waits for this
        # timeout; the sweeper re-publishes such queued jobs much sooner anyway.
        "visibility_timeout": settings.visibility_timeout_seconds,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }


def _config(settings: Settings) -> dict:
    transport = broker_transport_options(settings)
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        # Celery also reads a visibility timeout from here; set it alike so no code
        # path falls back to Redis's 1 h default.
        "result_backend_transport_options": {
            "visibility_timeout": settings.visibility_timeout_seconds
        },
        "broker_connection_retry_on_startup": True,
        # A publish that cannot reach the broker must not hang an HTTP request: give
        # up after ~2 s. The job row is committed first, and the sweeper re-publishes
        # queued jobs whose message is older than requeue_after_seconds.
        "task_publish_retry_policy": {
            "max_retries": 3,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        "broker_connection_timeout": 4.0,
        # Early ack: the message is acknowledged when a pool process accepts it. A
        # running job is owned by its database row (attempt fence + heartbeat), so
        # Redis's visibility timeout can never restart a five-hour job, and a dead
        # worker's job is recovered by the sweeper from its last checkpoint.
        "task_acks_late": False,
        "task_reject_on_worker_lost": False,
        # Reserve at most one message per process, and (Redis) none while all
        # processes are busy, so a queued job never waits behind a long one on a
        # busy worker while another worker idles.
        "worker_prefetch_multiplier": 1,
        # (Redis only; other transports log a warning and ignore it.)
        "worker_disable_prefetch": settings.broker_url.startswith(("redis://", "rediss://")),
        # One job per child process: the child exits after its job, which releases
        # all GPU memory; the next job gets a freshly forked child from a parent that
        # never imported torch (so CUDA is never initialised before a fork).
        "worker_max_tasks_per_child": 1,
        # Results live in the database; no result backend.
        "task_ignore_result": True,
        "result_backend": None,
        "task_queues": [
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES
        ],
        "task_default_queue": settings.default_queue,
        "task_create_missing_queues": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        # Heartbeats/mingle/gossip are worker-to-worker chatter we do not use.
        # Remote control (celery inspect) needs broadcast; keep it for Redis only.
        "worker_enable_remote_control": settings.broker_url.startswith(("redis", "rediss")),
    }


_apps: dict[tuple, Celery] = {}


def celery_app(settings: Settings) -> Celery:
    """The Celery app for ``settings`` (cached: the API reuses its broker connections)."""
    key = (
        settings.broker_url,
        str(settings.broker_dir),
        settings.visibility_timeout_seconds,
        settings.default_queue,
    )
    app = _apps.get(key)
    if app is None:
        if settings.broker_url.startswith("filesystem://"):
            # Added once however many apps are made (addFilter skips a filter it has).
            logging.getLogger("kombu.connection").addFilter(_HOSTLESS_BROKER_IS_FINE)
        app = Celery("ldreg", set_as_current=False)
        app.conf.update(_config(settings))
        app = _apps.setdefault(key, app)
    return app


def enqueue_job(settings: Settings, job_id: str, queue: str) -> None:
    """Publish the message that asks a worker on ``queue`` to run ``job_id``.

    Only publishes. The caller sets ``job.enqueued_at`` in the same transaction that
    made the job ``queued`` and publishes *after* committing, so a worker never sees a
    message for a row it cannot read yet. If the publish fails (or the process dies
    before it), the job stays queued and the sweeper publishes it again once
    ``enqueued_at`` is older than ``requeue_after_seconds``. Raises on broker errors
    (kombu.exceptions.OperationalError), after a short bounded retry.
    """
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; expected one of {QUEUES}")
    app = celery_app(settings)
    app.send_task(TASK_NAME, args=[job_id], queue=queue)
    log.info("published job %s to queue %s", job_id, queue)
