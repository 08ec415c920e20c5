"""The worker's Celery app: the shared configuration (service.queue) plus the task.

``celery -A worker.celery_app worker`` and ``ldreg worker`` both load this module in
the Celery *parent* process, which forks a child per job; so nothing here (or in
worker.tasks) may import torch. The child imports the training code inside the task.
"""

from __future__ import annotations

import logging
import sys

from celery.signals import worker_process_init, worker_ready

from service.queue import celery_app
from service.settings import get_settings

log = logging.getLogger(__name__)

app = celery_app(get_settings())
app.conf.include = ["worker.tasks"]


@worker_ready.connect
def _parent_has_no_torch(**_: object) -> None:
    # The forking parent must never load torch/CUDA. If it did, say so loudly here;
    # each job's child also refuses to train (worker.runner.assert_fresh_process).
    if "torch" in sys.modules:
        log.critical("torch is imported in the Celery parent process; jobs will refuse to run")
    else:
        log.info("worker ready; the parent process has not imported torch")


@worker_process_init.connect
def _fresh_database_connections(**_: object) -> None:
    # A forked child must not reuse sockets of the parent's connection pool.
    from service.db import engine_for, session_factory

    engine_for.cache_clear()
    session_factory.cache_clear()
