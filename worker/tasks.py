"""The Celery task: thin. The message carries only the job id; the runner does the rest."""

from __future__ import annotations

import os

from service.queue import TASK_NAME
from service.settings import get_settings
from worker.celery_app import SHUTTING_DOWN, app

# Imported here, in the parent, so every forked child starts with it loaded: the
# runner and the sink import no torch (the runner loads the training code itself,
# in the child); tests check the parent never maps libtorch.
from worker.runner import run_job as run
from worker.sink import DatabaseSink  # noqa: F401  (preloaded for the children)


@app.task(name=TASK_NAME, bind=True, ignore_result=True, acks_late=False)
def run_job(self, job_id: str) -> str:
    return run(
        job_id,
        get_settings(),
        worker_name=f"{self.request.hostname}:{os.getpid()}",
        worker_shutting_down=lambda: bool(SHUTTING_DOWN.value),
    )
