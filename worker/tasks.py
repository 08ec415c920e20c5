"""The Celery task: thin. The message carries only the job id; the runner does the rest."""

from __future__ import annotations

import os

from service.queue import TASK_NAME
from service.settings import get_settings
from worker.celery_app import SHUTTING_DOWN, app


@app.task(name=TASK_NAME, bind=True, ignore_result=True, acks_late=False)
def run_job(self, job_id: str) -> str:
    # Imported in the child (one per job): the runner loads the training code.
    from worker.runner import run_job as run

    return run(
        job_id,
        get_settings(),
        worker_name=f"{self.request.hostname}:{os.getpid()}",
        worker_shutting_down=lambda: bool(SHUTTING_DOWN.value),
    )
