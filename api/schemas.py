"""Request and response bodies of HTTP API v1 (shapes documented in docs/api.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from api.reads import JobRow
from ldreg.spec import DiagnoseSpec, PretrainSpec, storable_text
from service.errors import error_kind
from service.models import SWEEP_KIND, Artifact, Job
from service.sweeps import SweepSpec

JobStateName = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
JobKindName = Literal["pretrain", "diagnose", "sweep"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_blank(name: str) -> str:
    if not name.strip():
        raise ValueError("must not be blank")
    return name


# What the jobs table can hold (String(200)), and something a person can read.
JobName = Annotated[
    str,
    Field(min_length=1, max_length=200),
    AfterValidator(storable_text),
    AfterValidator(_not_blank),
]


class PretrainJobCreate(_Request):
    kind: Literal["pretrain"]
    name: JobName | None = None
    spec: PretrainSpec


class DiagnoseJobCreate(_Request):
    kind: Literal["diagnose"]
    name: JobName | None = None
    spec: DiagnoseSpec


class SweepJobCreate(_Request):
    """A sweep (docs/sweeps.md): one pretrain job per arm and seed, and a report."""

    kind: Literal["sweep"]
    name: JobName | None = None
    spec: SweepSpec


# Tagged by "kind", so a bad spec is reported against the right model's fields.
JobCreate = Annotated[
    PretrainJobCreate | DiagnoseJobCreate | SweepJobCreate, Field(discriminator="kind")
]


class JobValidation(BaseModel):
    """The answer to ``POST /v1/jobs?dry_run=true``: the request as a submit would store
    it (defaults spelled out); nothing was created."""

    valid: Literal[True] = True
    kind: JobKindName
    name: str | None
    spec: dict[str, Any]
    children: int | None = Field(
        default=None, description="for a sweep: how many pretrain jobs it would run"
    )


class Progress(BaseModel):
    epoch: int = Field(description="epochs finished")
    epochs: int
    # Finer than epochs: steps of a training run, or points done in a diagnosis
    # (which has no epochs); null until the worker first reports.
    fraction: float | None = None
    step: int | None = Field(
        default=None,
        description="training steps done, counted across epochs (the metrics' step);"
        " null until a run reports it, and for a diagnosis",
    )
    steps: int | None = Field(default=None, description="training steps of the whole run")
    images_per_second: float | None = Field(
        default=None, description="recent training throughput (global batch x steps/s)"
    )
    eta_seconds: float | None = Field(
        default=None,
        description="estimated seconds left, as of updated_at; null unless running",
    )
    updated_at: datetime | None = Field(
        default=None,
        description="when the worker last reported progress (every heartbeat while it runs)",
    )


class JobError(BaseModel):
    code: str
    message: str
    kind: Literal["user", "infrastructure"] = Field(
        default="infrastructure",
        description="user: the job's own input failed it (a retry as it is fails the same"
        " way; change the spec); infrastructure: a lost worker or an unexpected error"
        " (a retry may succeed)",
    )


class JobOut(BaseModel):
    id: str
    kind: JobKindName
    name: str | None
    state: JobStateName
    attempt: int
    progress: Progress
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobError | None
    summary: dict[str, Any] | None
    spec: dict[str, Any]
    worker: str | None = Field(
        default=None, description="the worker that claimed the job's latest attempt"
    )
    queue_position: int | None = Field(
        default=None,
        description="in GET /v1/jobs, for a queued job: 1 when it is the next to run in"
        " its queue (every team's queued jobs, in the order they entered it); else null",
    )
    queue_reason: str | None = Field(
        default=None,
        description="in GET /v1/jobs, for a queued job: why it is not running yet (the"
        " scheduler's reason, as in GET /v1/queue); else null",
    )
    parent_id: str | None = Field(
        default=None, description="for a sweep's child: the sweep's id (else null)"
    )
    sweep_arm: str | None = Field(default=None, description="for a sweep's child: its arm")
    sweep_seed: int | None = Field(default=None, description="for a sweep's child: its seed")
    children: int | None = Field(
        default=None,
        description="for a sweep: how many children it runs (its progress counts the"
        " finished ones in epoch of epochs); else null",
    )

    @classmethod
    def from_job(
        cls,
        job: Job | JobRow,
        *,
        queue_position: int | None = None,
        queue_reason: str | None = None,
    ) -> JobOut:
        """From a ``Job``, or a ``JobRow`` of the poll (api/reads.py), which selects
        exactly the columns read here (``JOB_OUT_COLUMNS``)."""
        running = job.state in ("running", "cancelling")
        error = None
        if job.error_code is not None or job.error_message is not None:
            code = job.error_code or "error"
            error = JobError(
                code=code,
                message=job.error_message or "",
                kind=error_kind(code),  # type: ignore[arg-type]
            )
        return cls(
            id=job.id,
            kind=job.kind,  # type: ignore[arg-type]
            name=job.name,
            state=job.state,  # type: ignore[arg-type]
            attempt=job.attempt,
            progress=Progress(
                epoch=job.progress_epoch,
                epochs=job.progress_epochs,
                fraction=job.progress_fraction,
                step=job.progress_step,
                steps=job.progress_steps,
                images_per_second=job.progress_images_per_second,
                eta_seconds=job.progress_eta_seconds if running else None,
                updated_at=job.progress_updated_at,
            ),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            error=error,
            summary=job.summary,
            spec=job.spec,
            worker=job.worker,
            queue_position=queue_position,
            queue_reason=queue_reason,
            parent_id=job.parent_id,
            sweep_arm=job.sweep_arm,
            sweep_seed=job.sweep_seed,
            children=job.progress_epochs if job.kind == SWEEP_KIND else None,
        )


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next (older) page; null on the last page"
    )


class MetricPoint(BaseModel):
    epoch: int
    step: int
    value: float


class MetricsOut(BaseModel):
    series: dict[str, list[MetricPoint]]


class EventOut(BaseModel):
    """A ``JobEvent`` row (``EventOut.model_validate(event)``)."""

    model_config = ConfigDict(from_attributes=True)

    at: datetime
    from_state: str | None
    to_state: str
    attempt: int
    reason: str


class EventList(BaseModel):
    events: list[EventOut]


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str | None
    media_type: str
    created_at: datetime
    url: str

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> ArtifactOut:
        return cls(
            name=artifact.name,
            size=artifact.size,
            sha256=artifact.sha256,
            media_type=artifact.media_type,
            created_at=artifact.created_at,
            url=f"/v1/jobs/{artifact.job_id}/artifacts/{artifact.name}",
        )


class ArtifactList(BaseModel):
    artifacts: list[ArtifactOut]


class UploadOut(BaseModel):
    """An ``Upload`` row (``UploadOut.model_validate(upload)``)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    size: int
    sha256: str
    n: int = Field(validation_alias="num_points", description="number of points (rows)")
    d: int = Field(validation_alias="dim", description="dimensions (columns)")
    dtype: str
    has_labels: bool
    created_at: datetime


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(description="'ok', or why the dependency is not usable")


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorInfo(BaseModel):
    code: str
    message: str
    field: str | None = None
    details: list[ErrorDetail] | None = None


class ErrorOut(BaseModel):
    """The shape of every error response."""

    error: ErrorInfo


def json_response(
    body: BaseModel, *, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """``body`` as the JSON response, serialized here, in the route's own thread hop.

    Sync routes with an ORM session return this rather than the model, so that no
    second threadpool hop runs with their connection held (docs/architecture.md, "The
    API's request path"; tests/service/test_reads.py). The route's ``response_model``
    keeps the OpenAPI schema; the body is the same JSON.
    """
    return Response(
        body.model_dump_json(),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


# The errors every route naming jobs may answer: 409 / 422 because a job id may be a
# short prefix (service.job_ids) that names several jobs, or is too short.
JOB_ROUTE_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut} for status in (401, 404, 409, 422, 503)
}
