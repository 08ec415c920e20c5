"""The worker's side of a running job: its lease (heartbeat) and its database sink.

``Lease`` is shared by three parties in the worker's child process: the heartbeat
thread renews it, the training loop asks it (through the sink's ``should_stop``)
whether to go on, and the runner reads why training stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

from service.db import session_scope
from service.execution import MetricRow, heartbeat, record_metrics
from service.settings import Settings

log = logging.getLogger(__name__)


T = TypeVar("T")


def while_leased(lease: Lease, write: Callable[[], T], what: str) -> T:
    """``write()``, retried while the database is away and the lease still holds.

    For writes fenced by the attempt, which are safe to repeat: a database restart or
    failover shorter than the lease then costs the job nothing, instead of an attempt
    and a restart from its last checkpoint. Once the lease has expired the sweeper may
    already have given the job to another attempt, so the error goes up.
    """
    delay = 0.25
    while True:
        try:
            return write()
        except (OperationalError, InterfaceError) as exc:
            if lease.expired():
                raise
            log.warning(
                "job %s: database unavailable (%s); retrying %s",
                lease.job_id,
                type(exc.orig or exc).__name__,
                what,
            )
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


class Lease:
    """This attempt's ownership of a job, as far as this process knows."""

    def __init__(
        self,
        settings: Settings,
        job_id: str,
        attempt: int,
        *,
        shutdown_requested: threading.Event | None = None,
        worker_shutting_down: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self.lost = threading.Event()  # the database says another attempt owns the job
        self.cancel_requested = threading.Event()
        # Set when this process gets SIGTERM (worker.runner._sigterm_sets).
        self.shutdown_requested = shutdown_requested or threading.Event()
        # The Celery worker's shared "shutting down" flag (worker.celery_app), read at
        # every poll: a warm shutdown stops training without signalling the child.
        self.worker_shutting_down = worker_shutting_down
        # Monotonic time at which the last *confirmed* heartbeat was taken (before its
        # UPDATE ran, so it never overstates how fresh the row is).
        self.confirmed_at = time.monotonic()
        self.progress_fraction: float | None = None

    def expired(self) -> bool:
        """True once the sweeper may already consider us dead (no confirmed heartbeat
        for stale_after minus one interval): a worker cut off from the database stops
        itself instead of training on next to the attempt that replaces it."""
        budget = self.settings.stale_after_seconds - self.settings.heartbeat_seconds
        return time.monotonic() - self.confirmed_at > budget

    def shutting_down(self) -> bool:
        return self.shutdown_requested.is_set() or self.worker_shutting_down()

    def must_stop(self) -> bool:
        return (
            self.lost.is_set()
            or self.cancel_requested.is_set()
            or self.shutting_down()
            or self.expired()
        )

    def beat(self) -> None:
        """One heartbeat: renew the lease, learn about cancellation or a lost fence."""
        taken = time.monotonic()
        with session_scope(self.settings.database_url) as s:
            result = heartbeat(
                session=s,
                job_id=self.job_id,
                attempt=self.attempt,
                progress_fraction=self.progress_fraction,
            )
        if not result.alive:
            log.warning(
                "job %s attempt %d lost its lease (re-queued or finished elsewhere): stopping",
                self.job_id,
                self.attempt,
            )
            self.lost.set()
            return
        self.confirmed_at = taken
        if result.cancel_requested and not self.cancel_requested.is_set():
            log.info("job %s: cancellation requested", self.job_id)
            self.cancel_requested.set()


class HeartbeatThread(threading.Thread):
    """Renews the lease every ``heartbeat_seconds`` until stopped or the lease is lost."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(name=f"heartbeat-{lease.job_id}", daemon=True)
        self.lease = lease
        self._stop_event = threading.Event()

    def run(self) -> None:
        interval = self.lease.settings.heartbeat_seconds
        while not self._stop_event.wait(interval):
            try:
                self.lease.beat()
            except Exception:
                # The database may be briefly unreachable; the lease expires on its
                # own (Lease.expired) if that lasts, so keep trying.
                log.warning("heartbeat for job %s failed", self.lease.job_id, exc_info=True)
            if self.lease.lost.is_set():
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


class DatabaseSink:
    """A ``ldreg.sink.TrainingSink`` that writes epoch metrics and progress to the job's
    row, fenced by the attempt, and stops training when the lease says so.

    Only epoch-level values become metric rows (one batch, one transaction per epoch:
    the database costs a few milliseconds per epoch, not per step). Per-step progress
    only updates memory; the heartbeat thread carries it to the database.
    """

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.epochs = 0
        self.steps_per_epoch = 0
        self.start_epoch = 1
        self.last_epoch = 0
        self.last_checkpoint: tuple[int, Path] | None = None
        self.summary: dict[str, float] = {}

    def on_train_start(self, *, start_epoch: int, epochs: int, steps_per_epoch: int) -> None:
        self.start_epoch, self.epochs, self.steps_per_epoch = start_epoch, epochs, steps_per_epoch
        if start_epoch > 1:
            log.info(
                "job %s attempt %d: resuming from the checkpoint of epoch %d (of %d)",
                self.lease.job_id,
                self.lease.attempt,
                start_epoch - 1,
                epochs,
            )
        self.lease.progress_fraction = (start_epoch - 1) / max(epochs, 1)
        self._write([], progress_epoch=start_epoch - 1)

    def on_step(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        total = self.epochs * self.steps_per_epoch
        if total > 0:
            self.lease.progress_fraction = min(step / total, 1.0)

    def on_epoch_end(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        rows = []
        for name, value in metrics.items():
            try:
                rows.append(MetricRow(name=name, epoch=epoch, step=step, value=float(value)))
            except (TypeError, ValueError):
                continue  # not a number (e.g. a label); metrics are numeric series
        self.last_epoch = epoch
        self.summary = {r.name: r.value for r in rows}
        if self.epochs:
            self.lease.progress_fraction = epoch / self.epochs
        self._write(rows, progress_epoch=epoch)

    def on_checkpoint(self, *, epoch: int, path: Path) -> None:
        self.last_checkpoint = (epoch, Path(path))

    def should_stop(self) -> bool:
        return self.lease.must_stop()

    def _write(self, rows: list[MetricRow], *, progress_epoch: int) -> None:
        """Write the rows (an upsert fenced by the attempt; :func:`while_leased`)."""
        if self.lease.lost.is_set():
            return

        def write() -> bool:
            with session_scope(self.lease.settings.database_url) as s:
                return record_metrics(
                    session=s,
                    job_id=self.lease.job_id,
                    attempt=self.lease.attempt,
                    rows=rows,
                    progress_epoch=progress_epoch,
                    progress_epochs=self.epochs or None,
                )

        owned = while_leased(self.lease, write, "the metrics write")
        if not owned:
            log.warning("job %s: metrics refused, the attempt lost its lease", self.lease.job_id)
            self.lease.lost.set()
