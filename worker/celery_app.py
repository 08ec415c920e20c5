"""The worker's Celery app: the shared configuration (service.queue) plus the task.

``celery -A worker.celery_app worker`` and ``ldreg worker`` both load this module in
the Celery *parent* process, which forks a child per job; so nothing here (or in
worker.tasks) may import torch. The child imports the training code inside the task.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys

from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from service.queue import celery_app
from service.settings import get_settings

log = logging.getLogger(__name__)

app = celery_app(get_settings())
app.conf.include = ["worker.tasks"]

# Shared memory created in the parent before any fork: children read it to learn that
# the worker is shutting down (a message accepted during shutdown is handed back).
SHUTTING_DOWN = multiprocessing.Value("b", 0, lock=False)


@worker_shutting_down.connect
def _hand_running_jobs_back(how: str = "Warm", **_: object) -> None:
    """Warm shutdown (SIGTERM/SIGINT to the main process, e.g. ``docker stop``): tell
    the children, so a running job stops at its next poll and goes back to the queue
    instead of being killed when the grace period ends."""
    SHUTTING_DOWN.value = 1
    if how != "Warm":
        return
    from billiard.process import active_children

    for child in active_children():
        if child.pid and child.pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)


@worker_ready.connect
def _parent_has_no_torch(**_: object) -> None:
    # The forking parent must never load torch/CUDA. If it did, say so loudly here;
    # each job's child also refuses to train (worker.runner.assert_fresh_process).
    if "torch" in sys.modules:
        log.critical("torch is imported in the Celery parent process; jobs will refuse to run")
    else:
        log.info("worker ready; the parent process has not imported torch")


@worker_process_init.connect
def _init_child(**_: object) -> None:
    """In each freshly forked child, before it takes a job."""
    import worker.runner

    worker.runner.TORCH_BEFORE_FORK = "torch" in sys.modules

    # A forked child must not reuse sockets of the parent's connection pool.
    from service.db import engine_for, session_factory

    engine_for.cache_clear()
    session_factory.cache_clear()
