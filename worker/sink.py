"""The worker's side of a running job: its lease (heartbeat) and its database sink.

``Lease`` is shared by three parties in the worker's child process: the heartbeat
thread renews it, the training loop asks it (through the sink's ``should_stop``)
whether to go on, and the runner reads why training stopped.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

from service.db import session_scope
from service.execution import MetricRow, StepProgress, heartbeat, record_metrics
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
        # The scheduler asked for this job's GPUs (a higher-priority job): stop and go
        # back to the queue (worker/runner.py), resuming later from the checkpoint.
        self.preempt_requested = threading.Event()
        # Set when this process gets SIGTERM (worker.runner._sigterm_sets).
        self.shutdown_requested = shutdown_requested or threading.Event()
        # The Celery worker's shared "shutting down" flag (worker.celery_app), read at
        # every poll: a warm shutdown stops training without signalling the child.
        self.worker_shutting_down = worker_shutting_down
        # Monotonic time at which the last *confirmed* heartbeat was taken (before its
        # UPDATE ran, so it never overstates how fresh the row is).
        self.confirmed_at = time.monotonic()
        self.progress_fraction: float | None = None
        # Set by the training loop at every step (an immutable value, replaced whole);
        # the heartbeat carries the latest to the job's row.
        self.step_progress: StepProgress | None = None

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
            or self.preempt_requested.is_set()
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
                step_progress=self.step_progress,
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
        if result.preempt_requested and not self.preempt_requested.is_set():
            log.info("job %s: preempted for a higher-priority job", self.job_id)
            self.preempt_requested.set()


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


# Per-step metric points: at most this many steps of an epoch are kept per series (every
# k-th step of a longer epoch), written every STEP_FLUSH_SECONDS and at the epoch's end.
STEP_POINTS_PER_EPOCH = 200
STEP_FLUSH_SECONDS = 2.0
# A line with the step's values in the log at most this often.
STEP_LOG_SECONDS = 10.0
# What an epoch's log line shows, when the epoch has it.
EPOCH_LOGGED = (
    "loss",
    "ssl_loss",
    "ldreg_loss",
    "ldreg_lid_gmean",
    "lid_gmean_k32",
    "effective_rank",
    "knn_acc",
    "online_probe_acc",
    "linear_probe_acc",
    "epoch_seconds",
)


def _brief(values: dict[str, float], names: tuple[str, ...]) -> str:
    return " ".join(f"{n}={values[n]:.4g}" for n in names if isinstance(values.get(n), float | int))


# Training throughput is measured over windows of at least this many seconds, so the
# images/s and the ETA the heartbeat reports are smoothed rather than one step's.
RATE_WINDOW_SECONDS = 3.0


class DatabaseSink:
    """A ``ldreg.sink.TrainingSink`` that writes epoch metrics and progress to the job's
    row, fenced by the attempt, and stops training when the lease says so.

    Per-step values (the loss terms, lr, ``ldreg_lid_gmean``) are kept in memory and
    written in batches: every ``STEP_FLUSH_SECONDS``, and with the epoch's own rows
    (one transaction), at most ``STEP_POINTS_PER_EPOCH`` steps of an epoch per series.
    An epoch's rows sit at the step that ends it, so at that step the epoch's value
    (its mean, or its evaluation) replaces the step's own: a series' last point in an
    epoch is that epoch's value. Per-step progress (step, images/s, ETA) only updates
    memory; the heartbeat thread carries it to the database every
    ``heartbeat_seconds``. The epoch lines and, every ``STEP_LOG_SECONDS``, a step line
    go to the log (the attempt's log file, ``worker.joblog``).
    """

    def __init__(
        self,
        lease: Lease,
        *,
        images_per_step: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease = lease
        self.epochs = 0
        self.steps_per_epoch = 0
        self.start_epoch = 1
        self.last_epoch = 0
        self.last_checkpoint: tuple[int, Path] | None = None
        self.summary: dict[str, float] = {}
        self._step_rows: list[MetricRow] = []  # per-step points not yet written
        self._step_stride = 1
        self._flushed_at = self._logged_at = time.monotonic()
        # The global batch: images/s = steps/s x this (None: not reported).
        self.images_per_step = images_per_step
        self._clock = clock
        self._window: tuple[float, int] | None = None  # (time, step) the window began at
        self._steps_per_second: float | None = None  # of the last complete window
        self._last_step: tuple[float, int] | None = None  # (time, epoch) of the last step
        # Seconds between an epoch's last step and the next one's first: evaluation,
        # checkpoint and loader start, which the step rate does not see.
        self._epoch_gaps: list[float] = []

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
        if epochs * steps_per_epoch > 0:
            self.lease.step_progress = StepProgress(
                step=(start_epoch - 1) * steps_per_epoch, steps=epochs * steps_per_epoch
            )
        self._step_stride = max(1, math.ceil(steps_per_epoch / STEP_POINTS_PER_EPOCH))
        log.info("training epochs %d to %d, %d steps each", start_epoch, epochs, steps_per_epoch)
        self._write([], progress_epoch=start_epoch - 1)

    def on_step(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        total = self.epochs * self.steps_per_epoch
        if total > 0:
            self.lease.progress_fraction = min(step / total, 1.0)
            self._measure(epoch, step)
            self.lease.step_progress = self._step_progress(epoch, step, total)
        self._record_step(epoch, step, metrics)

    def _measure(self, epoch: int, step: int) -> None:
        """Track the step rate over windows of ``RATE_WINDOW_SECONDS``; a window never
        spans an epoch's end (its evaluation is timed apart, as a gap)."""
        now = self._clock()
        last = self._last_step
        self._last_step = (now, epoch)
        if last is not None and last[1] != epoch:
            self._epoch_gaps.append(now - last[0])
            self._window = None
        if self._window is None:
            self._window = (now, step)
            return
        began, first = self._window
        if now - began >= RATE_WINDOW_SECONDS and step > first:
            self._steps_per_second = (step - first) / (now - began)
            self._window = (now, step)

    def _rate(self, step: int) -> float | None:
        """Steps per second: the last complete window's, else the current one's so far."""
        if self._steps_per_second is not None:
            return self._steps_per_second
        if self._window is None or self._last_step is None:
            return None
        began, first = self._window
        elapsed = self._last_step[0] - began
        return (step - first) / elapsed if step > first and elapsed > 0 else None

    def _step_progress(self, epoch: int, step: int, total: int) -> StepProgress:
        rate = self._rate(step)
        images = rate * self.images_per_step if rate and self.images_per_step else None
        eta = None
        if rate:
            gaps = self._epoch_gaps[-5:]
            per_epoch_end = sum(gaps) / len(gaps) if gaps else 0.0
            # This epoch's end is still ahead of it (its last step comes before it).
            eta = max(total - step, 0) / rate + max(self.epochs - epoch + 1, 0) * per_epoch_end
        return StepProgress(step=step, steps=total, images_per_second=images, eta_seconds=eta)

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
        log.info("epoch %d/%d done: %s", epoch, self.epochs, _brief(self.summary, EPOCH_LOGGED))
        # The step rows first: at the epoch's last step its own value wins the upsert.
        step_rows, self._step_rows = self._step_rows, []
        self._write(step_rows + rows, progress_epoch=epoch)
        self._flushed_at = time.monotonic()

    def on_checkpoint(self, *, epoch: int, path: Path) -> None:
        self.last_checkpoint = (epoch, Path(path))

    def should_stop(self) -> bool:
        return self.lease.must_stop()

    def _record_step(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """Keep the step's values (every ``_step_stride``-th step of an epoch), write
        what is kept every ``STEP_FLUSH_SECONDS``, log a step line now and then."""
        spe = self.steps_per_epoch
        in_epoch = step - (epoch - 1) * spe if spe else step
        if in_epoch % self._step_stride == 0:
            for name, value in metrics.items():
                try:
                    self._step_rows.append(
                        MetricRow(name=name, epoch=epoch, step=step, value=float(value))
                    )
                except (TypeError, ValueError):
                    continue
        now = time.monotonic()
        if now - self._logged_at >= STEP_LOG_SECONDS:
            self._logged_at = now
            log.info(
                "epoch %d/%d, step %d/%d: %s",
                epoch,
                self.epochs,
                in_epoch,
                spe,
                _brief(metrics, tuple(metrics)),
            )
        # Never the epoch's last step alone: the rows at the step that ends an epoch are
        # all written at once, with the epoch's (a reader that asks for the steps after
        # the last one it has never misses an epoch's values).
        if self._step_rows and in_epoch < spe and now - self._flushed_at >= STEP_FLUSH_SECONDS:
            rows, self._step_rows = self._step_rows, []
            self._flushed_at = now
            self._write(rows, progress_epoch=None)

    def _write(self, rows: list[MetricRow], *, progress_epoch: int | None) -> None:
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
