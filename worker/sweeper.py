"""The sweeper: recovers jobs of dead workers and lost broker messages.

Every ``ldreg worker`` starts one next to its Celery main process. It runs
``service.execution.sweep`` every ``sweep_interval_seconds`` and publishes what the
sweep queued. Many sweepers at once are safe: each change is a conditional UPDATE
under the row's lock, so a job is re-queued (and re-published) by one of them.

It runs as its own small process (``python -m worker.sweeper``), not as a thread in
the Celery parent: the parent forks a child for every job, and forking while another
thread holds a lock (the connection pool's, a logging handler's) can leave the child
deadlocked. The process imports neither torch nor the worker's task code, and exits
when the worker that started it goes away.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from service.claiming import (
    beat_worker,
    deregister_worker,
    register_worker,
    request_preemptions,
)
from service.db import session_scope
from service.execution import sweep
from service.models import utcnow
from service.queue import celery_app, enqueue_job
from service.settings import Settings, get_settings

log = logging.getLogger("ldreg.sweeper")


def sweep_once(settings: Settings) -> dict[str, int]:
    """One sweep + the publishes it calls for; returns counts (for logs and tests)."""
    with session_scope(settings.database_url) as s:
        result = sweep(
            session=s,
            now=utcnow(),
            stale_after=timedelta(seconds=settings.stale_after_seconds),
            requeue_after=timedelta(seconds=settings.requeue_after_seconds),
        )
    # Published after the commit: a worker must find the job queued when the message
    # arrives. A failed publish is retried by a later sweep (enqueued_at is old again
    # after requeue_after_seconds).
    for job_id, queue in result.requeued:
        _publish(settings, job_id, queue)
    republished = 0
    for job_id, queue in result.republish:
        # A job that merely waits behind others still has its message in the queue;
        # publishing again would only pile up duplicates (harmless, but each one
        # costs a worker a fresh child process). Re-publish only what is gone.
        if waiting_in_broker(settings, job_id, queue):
            continue
        republished += _publish(settings, job_id, queue)
        log.info("job %s: queued for long and its message is gone, re-published", job_id)
    for job_id, _ in result.requeued:
        log.warning("job %s: worker lost (stale heartbeat), re-queued to resume", job_id)
    for job_id in result.failed:
        log.warning("job %s: worker lost and no attempts left, failed", job_id)
    return {
        "requeued": len(result.requeued),
        "failed": len(result.failed),
        "cancelled": len(result.cancelled),
        "republished": republished,
    }


def _publish(settings: Settings, job_id: str, queue: str) -> bool:
    try:
        enqueue_job(settings, job_id, queue)
        return True
    except Exception:
        log.warning("could not publish job %s; will retry later", job_id, exc_info=True)
        return False


def waiting_in_broker(settings: Settings, job_id: str, queue: str) -> bool:
    """Whether a message for ``job_id`` is still on its way to a worker: waiting in
    ``queue``, or (Redis) reserved by a worker moments ago and about to start. The job
    id appears verbatim in the message (``argsrepr`` header on Redis, the JSON file on
    the filesystem broker). A reservation older than ``requeue_after_seconds`` (at
    least a minute) belongs to a worker that died before starting it: that one counts
    as lost. When unsure, False: re-publish (a duplicate is harmless)."""
    needle = job_id.encode()
    try:
        if settings.broker_url.startswith(("redis://", "rediss://")):
            with celery_app(settings).connection_for_write() as conn:
                channel = conn.default_channel
                client = channel.client
                if any(needle in m for m in client.lrange(queue, 0, -1)):
                    return True
                # A live worker starts what it reserved within seconds (a new child
                # process); only a reservation this old can belong to a dead one.
                fresh_after = time.time() - max(settings.requeue_after_seconds, 60.0)
                for tag, raw in client.hscan_iter(channel.unacked_key):
                    if needle in raw:
                        reserved_at = client.zscore(channel.unacked_index_key, tag)
                        if reserved_at is not None and reserved_at > fresh_after:
                            return True
                return False
        if settings.broker_url.startswith("filesystem://"):
            folder = settings.broker_dir / "queue"
            return any(needle in f.read_bytes() for f in folder.glob(f"*.{queue}.msg"))
    except Exception:
        log.debug("could not look into the broker queue %s", queue, exc_info=True)
    return False


def preempt_once(settings: Settings) -> None:
    """Ask running jobs to make room for a higher-priority one (service/claiming.py)."""
    with session_scope(settings.database_url) as s:
        plan = request_preemptions(session=s, stale_after=settings.stale_after_seconds)
    if plan is not None:
        log.info(
            "preempting %s on %s for job %s", ", ".join(plan.preempt), plan.worker, plan.job_id
        )


def run_forever(
    settings: Settings,
    stop: threading.Event,
    parent_pid: int | None = None,
    *,
    sweeping: bool = True,
) -> None:
    while not stop.is_set():
        if parent_pid is not None and os.getppid() != parent_pid:
            log.info("worker process %d is gone; sweeper exits", parent_pid)
            return
        if sweeping:
            try:
                sweep_once(settings)
                preempt_once(settings)
            except Exception:
                log.warning("sweep failed (database or broker unreachable?)", exc_info=True)
        stop.wait(settings.sweep_interval_seconds)


@dataclass(frozen=True)
class Registration:
    """This worker in the registry (the ``workers`` table)."""

    worker_id: str
    queues: tuple[str, ...]
    gpus: int
    memory_gb: float | None = None

    def argv(self) -> list[str]:
        out = ["--worker-id", self.worker_id, "--queues", ",".join(self.queues)]
        out += ["--gpus", str(self.gpus)]
        if self.memory_gb is not None:
            out += ["--memory-gb", str(self.memory_gb)]
        return out


def register(settings: Settings, registration: Registration) -> None:
    """Insert or refresh the worker's row now."""
    r = registration
    with session_scope(settings.database_url) as s:
        register_worker(
            session=s,
            worker_id=r.worker_id,
            queues=r.queues,
            gpus=r.gpus,
            memory_gb=r.memory_gb,
        )


class RegistryThread(threading.Thread):
    """Registers the worker, renews its row every ``heartbeat_seconds`` (registering
    again if it was deleted), and deletes it when stopped (a clean shutdown)."""

    def __init__(self, settings: Settings, registration: Registration) -> None:
        super().__init__(name="worker-registry", daemon=True)
        self.settings = settings
        self.registration = registration
        self.stop_event = threading.Event()

    def run(self) -> None:
        registered = False
        while not self.stop_event.is_set():
            try:
                if not registered:
                    register(self.settings, self.registration)
                    registered = True
                    log.info(
                        "worker %s registered: %d GPU(s), queues %s",
                        self.registration.worker_id,
                        self.registration.gpus,
                        ",".join(self.registration.queues),
                    )
                else:
                    with session_scope(self.settings.database_url) as s:
                        registered = beat_worker(session=s, worker_id=self.registration.worker_id)
            except Exception:
                log.warning("worker registry heartbeat failed", exc_info=True)
            self.stop_event.wait(self.settings.heartbeat_seconds)

    def deregister(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        try:
            with session_scope(self.settings.database_url) as s:
                deregister_worker(session=s, worker_id=self.registration.worker_id)
        except Exception:
            log.warning("could not deregister the worker; it goes stale by itself")


def start_process(
    env: dict[str, str] | None = None,
    registration: Registration | None = None,
    *,
    sweeping: bool = True,
) -> subprocess.Popen:
    """Start the sweeper as a child of this process (same process group, so a signal
    to the worker's group reaches it too). It also keeps the worker's registration
    (a process that never forks, unlike the Celery parent)."""
    argv = [sys.executable, "-m", "worker.sweeper", "--parent", str(os.getpid())]
    if registration is not None:
        argv += registration.argv()
    if not sweeping:
        argv.append("--no-sweep")
    return subprocess.Popen(argv, env=env)


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent dies, even by SIGKILL."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the getppid() check in the loop does the same, more slowly


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parent = int(argv[argv.index("--parent") + 1]) if "--parent" in argv else None
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    )
    if parent is not None:
        _die_with_parent()
        if os.getppid() != parent:
            return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    settings = get_settings()
    log.info(
        "sweeper started: every %.1fs, stale after %.1fs, re-publish after %.0fs",
        settings.sweep_interval_seconds,
        settings.stale_after_seconds,
        settings.requeue_after_seconds,
    )
    registry = None
    if "--worker-id" in argv:
        memory = argv[argv.index("--memory-gb") + 1] if "--memory-gb" in argv else None
        registry = RegistryThread(
            settings,
            Registration(
                worker_id=argv[argv.index("--worker-id") + 1],
                queues=tuple(argv[argv.index("--queues") + 1].split(",")),
                gpus=int(argv[argv.index("--gpus") + 1]),
                memory_gb=float(memory) if memory is not None else None,
            ),
        )
        registry.start()
    try:
        run_forever(settings, stop, parent, sweeping="--no-sweep" not in argv)
    finally:
        if registry is not None:
            registry.deregister()
    assert "torch" not in sys.modules, "the sweeper must not import torch"


if __name__ == "__main__":
    main()
