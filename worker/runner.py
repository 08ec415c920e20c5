"""Run one job in this (freshly forked) worker process: claim, heartbeat, train, finish.

The Celery task is a thin wrapper around :func:`run_job`. Everything that decides a
job's fate lives here, and every database write goes through ``service.execution``,
fenced by the attempt this process claimed:

* claim (one conditional UPDATE); not claimable → a duplicate or stale message: return;
* a heartbeat thread renews the lease and picks up ``cancel_requested``; if the fence
  is lost (the sweeper gave the job to another attempt) or the lease expires, training
  stops at its next poll and this process writes nothing more (zombie protection);
* ``kind`` decides what runs; the outcome is classified:
  success → artifacts + ``succeeded`` with the summary;
  ``UserError`` (bad spec or data, NaN loss) → ``failed`` with its code, no retry;
  out of memory (over the job's limit below, or the GPU's) → ``failed`` with
  ``out_of_memory``, no retry: the same spec would need the same memory again;
  cancelled → ``cancelled``; SIGTERM (worker shutting down) → handed back to the queue;
  anything else (a lost device, a bug) → infrastructure: queued again to resume from
  the last checkpoint while attempts remain, then ``failed``.

Each job runs under a host-memory limit, the one its queue is configured with
(``Settings.queue_memory_gb``), set as this process's soft ``RLIMIT_DATA``: an
allocation past it fails in this process instead of the kernel's OOM killer taking
the worker or a neighbour, so one oversized job fails alone and the host survives.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import resource
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ldreg.errors import TrainingCancelled, UserError
from ldreg.spec import DiagnoseSpec, PretrainSpec, field_errors
from service.claiming import claim_next, retry_hint_soon, worker_id_of
from service.db import session_scope
from service.execution import (
    ArtifactFile,
    finish_job,
    requeue_for_retry,
    return_running_job,
    return_unstarted_job,
    sync_artifacts,
)
from service.logging import bind_job, configure_logging
from service.models import Job, JobState
from service.queue import enqueue_job
from service.settings import Settings

log = logging.getLogger(__name__)

MEDIA_TYPES = {
    ".json": "application/json",
    ".csv": "text/csv",
    ".log": "text/plain",
    ".txt": "text/plain",
    ".npy": "application/x-npy",
    ".npz": "application/x-npz",
    ".png": "image/png",
}


class RunOutcome(StrEnum):
    """What :func:`run_job` did with a job, for logs and tests: a final or queued
    state it left the job in, or why it left the job alone."""

    SKIPPED = "skipped"  # not claimable: a duplicate message, or finished elsewhere
    HANDED_BACK = "handed_back"  # accepted while shutting down; left queued
    LOST = "lost"  # another attempt owns the job now; this one wrote nothing more
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    QUEUED = "queued"  # handed back or re-queued to resume from its checkpoint


class JobNotImplemented(UserError):
    """A job kind this worker cannot run yet."""

    code = "not_implemented"


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# Set by worker.celery_app in each forked child, before it takes a job: whether torch
# was already in the process when it was forked. None outside Celery.
TORCH_BEFORE_FORK: bool | None = None


def assert_fresh_process() -> None:
    """CUDA must never be initialised in a process that forks. The worker's parent
    never imports torch, and every job runs in a fresh child, which imports the
    training code inside the task; if torch was already loaded *at the fork*, the
    parent imported it."""
    if TORCH_BEFORE_FORK:
        raise RuntimeError(
            "torch was imported before this worker process was forked; the worker's"
            " parent must not import torch (CUDA cannot survive a fork)"
        )


# Set by SIGTERM while this process runs a job (one job per process).
SHUTDOWN = threading.Event()


def run_job(
    job_id: str,
    settings: Settings,
    *,
    worker_name: str | None = None,
    worker_shutting_down: Callable[[], bool] = lambda: False,
) -> RunOutcome:
    """Run ``job_id`` if it is ours to run; returns what happened (:class:`RunOutcome`)."""
    with _sigterm_sets(SHUTDOWN):
        return _run_job(job_id, settings, worker_name, worker_shutting_down)


def _run_job(
    job_id: str,
    settings: Settings,
    worker_name: str | None,
    worker_shutting_down: Callable[[], bool],
) -> RunOutcome:
    from worker.sink import DatabaseSink, HeartbeatThread, Lease

    configure_logging("worker")  # JSON lines from the job's process (one per job)
    worker_name = worker_name or default_worker_name()
    url = settings.database_url
    if worker_shutting_down() or SHUTDOWN.is_set():
        # Accepted while the worker shuts down: do not start it here.
        with session_scope(url) as s:
            return_unstarted_job(session=s, job_id=job_id)
        log.info("job %s: worker shutting down; left queued for another worker", job_id)
        return RunOutcome.HANDED_BACK
    hint = job_id
    with session_scope(url) as s:
        # The policy picks the job (service/claiming.py); the message's is a hint.
        claim = claim_next(
            session=s,
            worker_id=worker_id_of(worker_name) or worker_name,
            worker_name=worker_name,
            hint=hint,
            stale_after=settings.stale_after_seconds,
        )
        job = s.get(Job, claim.job_id) if claim is not None else None
        if claim is None or job is None:
            # Nothing for this slot now; have the hint's message sent again soon.
            retry_hint_soon(
                session=s,
                job_id=hint,
                requeue_after=settings.requeue_after_seconds,
                delay=max(2 * settings.sweep_interval_seconds, 2.0),
            )
        else:
            kind, spec_data, queue = job.kind, dict(job.spec), job.queue
    if claim is None or job is None:
        log.info(
            "job %s not claimable (a duplicate message, or already running, finished or"
            " cancelled) or not this worker's to start now (the scheduler chose none that"
            " fits here): nothing to do",
            hint,
        )
        return RunOutcome.SKIPPED
    job_id, attempt = claim.job_id, claim.attempt
    if job_id != hint:
        log.info("woken for job %s; the scheduler chose job %s", hint, job_id)
    if queue == "gpu" and claim.devices:
        use_devices(claim.devices)
    bind_job(job_id=job_id, attempt=attempt)  # on every log line of this attempt
    log.info("job %s: attempt %d claimed by %s", job_id, attempt, worker_name)

    lease = Lease(
        settings,
        job_id,
        attempt,
        shutdown_requested=SHUTDOWN,
        worker_shutting_down=worker_shutting_down,
    )
    beat = HeartbeatThread(lease)
    beat.start()
    # A pretrain spec's batch_size is the global batch: images/s = steps/s x it.
    batch_size = spec_data.get("batch_size") if kind == "pretrain" else None
    sink = DatabaseSink(lease, images_per_step=batch_size if isinstance(batch_size, int) else None)
    run_dir = settings.job_dir(job_id)
    memory_limit_gb = settings.queue_memory_gb.get(queue)
    try:
        try:
            with _job_log(
                run_dir, attempt, f"job {job_id}: attempt {attempt} claimed by {worker_name}"
            ):
                limit_memory(memory_limit_gb)
                summary = _execute(kind, spec_data, settings, run_dir, sink)
        finally:
            # Before the outcome is written: a heartbeat still running would see this
            # attempt's own re-queue and log it as a lost lease.
            beat.stop()
    except TrainingCancelled as exc:
        return _stopped(lease, run_dir, str(exc))
    except (UserError, ValidationError) as exc:
        code, message = _user_error(exc)
        log.info("job %s failed: %s: %s", job_id, code, message)
        return _finish(lease, run_dir, JobState.FAILED, error=(code, message))
    except Exception as exc:
        if not is_out_of_memory(exc):
            return _infrastructure_failure(lease, exc)
        message = _out_of_memory_message(exc, memory_limit_gb, queue)
        log.info("job %s failed: out_of_memory: %s", job_id, message)
        return _finish(lease, run_dir, JobState.FAILED, error=("out_of_memory", message))
    if lease.lost.is_set():
        return RunOutcome.LOST
    return _finish(lease, run_dir, JobState.SUCCEEDED, summary=_json_safe(summary))


def _execute(
    kind: str, spec_data: dict[str, Any], settings: Settings, run_dir: Path, sink: Any
) -> dict[str, Any]:
    if kind == "pretrain":
        spec = PretrainSpec.model_validate(spec_data)
        assert_fresh_process()
        if spec.devices > 1:
            allow_child_processes()
        # Imported here, in the child, never in the forking parent (see above).
        from ldreg.train import pretrain

        return pretrain(spec, run_dir=run_dir, data_root=settings.data_root, sink=sink, resume=True)
    if kind == "diagnose":
        diagnose_spec = DiagnoseSpec.model_validate(spec_data)
        assert_fresh_process()
        from worker.diagnose_job import run_diagnose

        summary, _ = run_diagnose(
            spec=diagnose_spec,
            job_id=sink.lease.job_id,
            settings=settings,
            run_dir=run_dir,
            # The heartbeat thread carries the fraction to the job's row.
            report_progress=lambda f: setattr(sink.lease, "progress_fraction", f),
            should_stop=sink.should_stop,
        )
        return summary
    raise JobNotImplemented(f"unknown job kind {kind!r}")


def _user_error(exc: Exception) -> tuple[str, str]:
    if isinstance(exc, ValidationError):
        problems = field_errors(exc, "spec")
        if not problems:
            return "invalid_spec", f"spec: {exc}"
        field, reason = problems[0]
        return "invalid_spec", f"{field}: {reason}"
    return exc.code, exc.message  # type: ignore[attr-defined]


def _stopped(lease: Any, run_dir: Path, detail: str) -> RunOutcome:
    """Training stopped at our request; finish according to why."""
    if lease.lost.is_set():
        log.warning(
            "job %s attempt %d: lost the lease, wrote nothing more", lease.job_id, lease.attempt
        )
        return RunOutcome.LOST
    if lease.cancel_requested.is_set():
        return _finish(
            lease, run_dir, JobState.CANCELLED, reason=f"cancelled by request ({detail})"
        )
    url = lease.settings.database_url
    if lease.preempt_requested.is_set() and not lease.shutting_down():
        with session_scope(url) as s:
            job = s.get(Job, lease.job_id)
            by = job.preempted_for if job is not None else None
            state = return_running_job(
                session=s,
                job_id=lease.job_id,
                attempt=lease.attempt,
                reason=f"preempted for job {by or 'of higher priority'}; handed back to the queue",
            )
        # Published by the next sweep (PUBLISH_ASAP), like a SIGTERM hand-back.
        return RunOutcome.LOST if state is None else RunOutcome(state.value)
    if lease.shutting_down():
        with session_scope(url) as s:
            state = return_running_job(
                session=s,
                job_id=lease.job_id,
                attempt=lease.attempt,
                reason="worker shutting down (SIGTERM); handed back to the queue",
            )
        # Not published from here (this worker may still be consuming); the next
        # sweep of any live worker publishes it.
        return RunOutcome.LOST if state is None else RunOutcome(state.value)
    # The lease expired: the database was unreachable for too long. If it is back, hand
    # the job back now; if not, the sweeper will once the heartbeat is found stale.
    try:
        with session_scope(url) as s:
            state = requeue_for_retry(
                session=s,
                job_id=lease.job_id,
                attempt=lease.attempt,
                cause="worker lost contact with the database",
                code="worker_lost",
            )
    except Exception:
        log.warning("job %s: cannot reach the database; the sweeper will recover it", lease.job_id)
        return RunOutcome.LOST
    return _after_requeue(lease, state)


def allow_child_processes() -> None:
    """A Celery pool child is marked daemonic, and multiprocessing refuses to start
    children from a daemonic process; a multi-device job starts one process per extra
    device (ldreg/launch.py), which it joins or kills itself before it returns. The
    pool (billiard) also left its own kind of authkey, which the standard library's
    spawn cannot pickle: replaced by the standard one, same bytes."""
    import multiprocessing
    from multiprocessing.process import AuthenticationString  # type: ignore[attr-defined]

    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    config.pop("daemon", None)
    key = config.get("authkey")
    if key is not None and not isinstance(key, AuthenticationString):
        config["authkey"] = AuthenticationString(bytes(key))


def use_devices(devices: tuple[int, ...]) -> None:
    """The job's processes see only the GPUs it was given (indices among those this
    worker sees), before anything in this process initialises CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",")] if visible else None
    chosen = [names[d] if names and d < len(names) else str(d) for d in devices]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)


def limit_memory(limit_gb: float | None) -> None:
    """This process's soft RLIMIT_DATA (heap and private mappings) for the next job;
    no limit (up to the hard one) when the queue has none."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = hard if limit_gb is None else int(limit_gb * 1024**3)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def is_out_of_memory(exc: BaseException) -> bool:
    """numpy's MemoryError, torch's CPU allocator refusing (a RuntimeError), or CUDA's
    OutOfMemoryError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _out_of_memory_message(exc: BaseException, limit_gb: float | None, queue: str) -> str:
    where = "the GPU" if type(exc).__name__ == "OutOfMemoryError" else "host memory"
    limit = f" (a job on queue '{queue}' may use {limit_gb:g} GiB)" if limit_gb else ""
    return (
        f"out of {where}{limit}: {type(exc).__name__}: {str(exc)[:300]}. Lower batch_size,"
        " dataset.image_size, eval.max_samples or the backbone's size"
    )


def _infrastructure_failure(lease: Any, exc: BaseException) -> RunOutcome:
    code = "worker_error"
    cause = f"unexpected error: {type(exc).__name__}: {exc}"
    log.exception("job %s attempt %d: %s", lease.job_id, lease.attempt, cause)
    if lease.lost.is_set():
        return RunOutcome.LOST
    try:
        with session_scope(lease.settings.database_url) as s:
            state = requeue_for_retry(
                session=s, job_id=lease.job_id, attempt=lease.attempt, cause=cause[:2000], code=code
            )
    except Exception:
        log.exception("job %s: could not record the failure; the sweeper will", lease.job_id)
        return RunOutcome.LOST
    return _after_requeue(lease, state)


def _after_requeue(lease: Any, state: JobState | None) -> RunOutcome:
    if state is None:
        return RunOutcome.LOST
    if state is JobState.QUEUED:
        with session_scope(lease.settings.database_url) as s:
            job = s.get(Job, lease.job_id)
            queue = job.queue if job is not None else lease.settings.default_queue
        try:
            enqueue_job(lease.settings, lease.job_id, queue)
        except Exception:
            log.warning("job %s: re-publish failed; the sweeper will re-send it", lease.job_id)
    return RunOutcome(state.value)


def _finish(
    lease: Any,
    run_dir: Path,
    state: JobState,
    *,
    summary: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
    reason: str | None = None,
) -> RunOutcome:
    from worker.sink import while_leased

    files = list(_artifact_files(run_dir))

    def write() -> bool:
        with session_scope(lease.settings.database_url) as s:
            # Artifacts and the final state in one transaction: a finished job always
            # lists the files it left.
            owned = sync_artifacts(
                session=s, job_id=lease.job_id, attempt=lease.attempt, files=files
            ) and finish_job(
                session=s,
                job_id=lease.job_id,
                attempt=lease.attempt,
                state=state,
                summary=summary,
                error=error,
                reason=reason,
            )
            if not owned:
                s.rollback()
            return owned

    owned = while_leased(lease, write, "the final state")
    if not owned:
        log.warning("job %s attempt %d: not ours any more at finish", lease.job_id, lease.attempt)
        return RunOutcome.LOST
    log.info("job %s attempt %d: %s", lease.job_id, lease.attempt, state.value)
    return RunOutcome(state.value)


def _artifact_files(run_dir: Path) -> Iterator[ArtifactFile]:
    """Every finished file the job left (checkpoints, backbone, reports), not the
    temporary files of an interrupted write nor checksum sidecars."""
    if not run_dir.is_dir():
        return
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix in (".tmp", ".sha256"):
            continue
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        yield ArtifactFile(
            name=rel.as_posix(),
            path=str(path),
            size=path.stat().st_size,
            sha256=digest.hexdigest(),
            media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
        )


def _json_safe(value: Any) -> Any:
    """The summary goes into a JSON column and out over HTTP: finite numbers only."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return None
    return int(value) if isinstance(value, int) else number


@contextlib.contextmanager
def _sigterm_sets(event: threading.Event) -> Iterator[None]:
    """While a job runs, a SIGTERM sent to this process itself (a kill of the worker's
    whole process group; a warm shutdown of the main process uses a shared flag instead,
    worker.celery_app) sets ``event``: training stops at the next poll and the job is
    handed back, instead of the process dying mid-step."""
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
    except ValueError:  # not the main thread (e.g. a thread pool): nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _job_log(run_dir: Path, attempt: int, first_line: str | None = None) -> Iterator[None]:
    """This attempt's log lines, stdout and stderr in ``run_dir/logs/attempt-N.log``
    (an artifact, read live by ``GET /v1/jobs/{id}/logs``; ``worker.joblog``). How the
    attempt ended is its last line, written before the outcome reaches the database,
    so a reader that sees the job finished has every line."""
    from worker.joblog import attempt_log

    with attempt_log(run_dir, attempt) as job_log:
        if first_line:
            job_log.write_record(logging.INFO, first_line)
        try:
            yield
        except TrainingCancelled as exc:
            job_log.write_record(logging.INFO, f"training stopped: {exc}")
            raise
        except (UserError, ValidationError) as exc:
            code, message = _user_error(exc)
            job_log.write_record(logging.ERROR, f"failed: {code}: {message}")
            raise
        except BaseException as exc:
            job_log.write_record(logging.ERROR, f"attempt {attempt} ended by an error", exc=exc)
            raise
        job_log.write_record(logging.INFO, f"attempt {attempt} done; recording the result")
