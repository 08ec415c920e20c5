"""The worker's Celery app: the shared configuration (service.queue) plus the task.

``celery -A worker.celery_app worker`` and ``ldreg worker`` both load this module in
the Celery *parent* process, which forks a child per job; so nothing here (or in
worker.tasks) may import torch. The child imports the training code inside the task.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys

from celery import bootsteps
from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from service.queue import celery_app
from service.settings import get_settings

log = logging.getLogger(__name__)

app = celery_app(get_settings())
app.conf.include = ["worker.tasks"]

# How often the parent checks for exited children and forks their replacements.
RESPAWN_CHECK_SECONDS = 0.25


class PromptRespawn(bootsteps.StartStopStep):
    """Fork the replacement child as soon as the last one exits.

    Every child runs one job and exits (``worker_max_tasks_per_child=1``). Celery
    replaces it when the child's exit wakes the parent; but that wake-up can come a
    moment before the exited child can be reaped, and then nothing replaces it until
    the pool's 5 s maintenance timer. A job submitted meanwhile waited up to 5 s for a
    child (seen as 0.1-1.9 s submit-to-running in benchmarks/bench_service.py). A
    check every RESPAWN_CHECK_SECONDS (a waitpid per child when nothing exited) closes
    that gap.
    """

    requires = ("celery.worker.components:Hub", "celery.worker.components:Pool")

    def start(self, worker: object) -> None:
        hub = getattr(worker, "hub", None)
        pool = getattr(getattr(worker, "pool", None), "_pool", None)
        maintain = getattr(pool, "maintain_pool", None)
        if hub is not None and maintain is not None:
            hub.call_repeatedly(RESPAWN_CHECK_SECONDS, maintain)


app.steps["worker"].add(PromptRespawn)

# Shared memory created in the parent before any fork: children read it to learn that
# the worker is shutting down (a message accepted during shutdown is handed back).
SHUTTING_DOWN = multiprocessing.Value("b", 0, lock=False)


@worker_shutting_down.connect
def _hand_running_jobs_back(**_: object) -> None:
    """Warm or cold shutdown (SIGTERM/SIGINT to the main process, e.g. ``docker stop``):
    raise the flag the children share. A running job reads it at its next poll (the
    lease's ``must_stop``), stops and goes back to the queue instead of being killed
    when the grace period ends; a message accepted from now on is handed back at once.
    No child is signalled: an idle one is stopped by the pool as usual (a SIGTERM would
    kill it, and the pool would log that as an ERROR on every clean Ctrl-C)."""
    SHUTTING_DOWN.value = 1


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
