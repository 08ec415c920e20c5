"""/v1/workers and /v1/queue: the fleet's capacity and the queue in the scheduler's
order (service/claiming.py, service/scheduling.py).

Any team sees every live worker's capacity and whether its GPUs are busy, and the
whole queue's length; job ids, names and reasons only for its own jobs (other teams'
jobs appear as counts).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from api.deps import CurrentTeam, SessionDep, SettingsDep
from api.schemas import ErrorOut, json_response
from service import claiming

router = APIRouter(
    tags=["scheduling"],
    responses={401: {"model": ErrorOut}, 503: {"model": ErrorOut}},
)


class WorkerJobOut(BaseModel):
    id: str
    name: str | None
    gpus: int
    devices: str | None = Field(description="the device indices it holds on the worker")


class WorkerOut(BaseModel):
    id: str = Field(description="the worker's node name (a job's worker is {id}:{pid})")
    hostname: str
    queues: list[str]
    gpus: int = Field(description="GPUs (devices) it holds: its --devices")
    memory_gb: float | None
    busy_gpus: int
    free_gpus: int
    state: Literal["busy", "idle"]
    started_at: str
    heartbeat_at: str
    jobs: list[WorkerJobOut] = Field(description="your team's jobs running there")
    other_jobs: int = Field(description="other teams' jobs running there (no ids)")


class WorkerList(BaseModel):
    workers: list[WorkerOut]


class QueueJobOut(BaseModel):
    id: str
    name: str | None
    position: int | None = Field(description="1 = the next to start, over every team's jobs")
    reason: str = Field(description="why it is not running yet, in words")
    code: str = Field(description="the reason as a constant: starting, behind_priority, ...")
    estimated_start_seconds: float | None = Field(
        description="from now, when the running jobs' remaining times are known; else null"
    )
    others_ahead: int = Field(description="other teams' queued jobs ahead of it")
    gpus: int
    priority: int
    preemptible: bool
    queue: str


class QueueOut(BaseModel):
    jobs: list[QueueJobOut] = Field(description="your team's queued jobs, in start order")
    queued_total: int
    queued_other_teams: int
    running_total: int
    live_workers: int


@router.get("/workers", response_model=WorkerList)
def list_workers(session: SessionDep, settings: SettingsDep, team: CurrentTeam) -> Response:
    """Live workers: capacity, busy or idle, and which of your jobs runs where."""
    rows = claiming.workers_view(session, team_id=team.id, stale_after=settings.stale_after_seconds)
    return json_response(WorkerList.model_validate({"workers": rows}))


@router.get("/queue", response_model=QueueOut)
def get_queue(session: SessionDep, settings: SettingsDep, team: CurrentTeam) -> Response:
    """Your queued jobs with their position in the whole queue, why each waits and
    when it should start; other teams' jobs only as counts."""
    view = claiming.queue_view(session, team_id=team.id, stale_after=settings.stale_after_seconds)
    return json_response(QueueOut.model_validate(view))
