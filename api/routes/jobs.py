"""/v1/jobs: submit, list, read, cancel, retry, metrics, events, artifacts."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, Header, Query, Request, Response
from fastapi.responses import FileResponse

from api.deps import (
    CurrentTeam,
    SessionDep,
    SettingsDep,
    bearer_token,
    get_reads,
    invalid_key,
)
from api.errors import ApiError
from api.reads import Reads
from api.schemas import (
    JOB_ROUTE_ERRORS,
    ArtifactList,
    ArtifactOut,
    ErrorOut,
    EventList,
    EventOut,
    JobCreate,
    JobKindName,
    JobList,
    JobOut,
    JobStateName,
    JobValidation,
    MetricsOut,
    json_response,
)
from service import claiming, job_ids, jobs
from service.sweeps import SweepSpec, arms

router = APIRouter(
    prefix="/jobs",
    tags=["jobs"],
    responses=JOB_ROUTE_ERRORS,
)


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    responses={
        200: {"model": JobValidation, "description": "dry_run=true: the spec is valid"},
        409: {"model": ErrorOut},
        422: {"model": ErrorOut},
        429: {"model": ErrorOut},
    },
)
def submit_job(
    body: Annotated[JobCreate, Body()],
    session: SessionDep,
    settings: SettingsDep,
    team: CurrentTeam,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="retrying with the same key and body returns the original job",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        Query(
            description="only validate: the same checks as a submit (422 naming the"
            " field), 200 with the normalised spec, nothing created"
        ),
    ] = False,
) -> Response:
    """Submit a job. It is queued at once and runs when a worker is free."""
    if dry_run:
        model = jobs.validate_job(
            session=session, settings=settings, team=team, kind=body.kind, spec=body.spec
        )
        checked = JobValidation(
            kind=body.kind,
            name=body.name,
            spec=model.model_dump(mode="json"),
            children=len(arms(model)) * len(model.seeds) if isinstance(model, SweepSpec) else None,
        )
        return json_response(checked)
    job, created = jobs.create_job(
        session=session,
        settings=settings,
        team=team,
        kind=body.kind,
        name=body.name,
        spec=body.spec,
        idempotency_key=idempotency_key,
    )
    headers = {}
    out = JobOut.from_job(job)
    if created:
        jobs.publish_queued(session=session, settings=settings, job=job)  # a sweep: its children
    else:
        # The same answer as the first time, so a client's retry looks like success.
        headers["Idempotent-Replayed"] = "true"
    return json_response(out, status_code=201, headers=headers)


@router.get("", response_model=JobList, responses={422: {"model": ErrorOut}})
def list_jobs(
    session: SessionDep,
    settings: SettingsDep,
    team: CurrentTeam,
    state: Annotated[list[JobStateName] | None, Query(description="repeat for several")] = None,
    kind: JobKindName | None = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=jobs.MAX_PAGE_SIZE)] = 50,
    parent: Annotated[
        str | None,
        Query(max_length=64, description="only the children of this sweep (an id or short id)"),
    ] = None,
) -> Response:
    """The team's jobs, newest first."""
    page = jobs.list_jobs(
        session=session,
        team=team,
        states=state,
        kind=kind,
        cursor=cursor,
        limit=limit,
        parent=parent,
    )
    positions = jobs.queue_positions(session=session, jobs=page.jobs)
    reasons = (
        claiming.queued_reasons(session, stale_after=settings.stale_after_seconds)
        if positions
        else {}
    )
    jobs_out = [
        JobOut.from_job(j, queue_position=positions.get(j.id), queue_reason=reasons.get(j.id))
        for j in page.jobs
    ]
    return json_response(JobList(jobs=jobs_out, next_cursor=page.next_cursor))


async def get_job(request: Request) -> Response:
    """One job: state, progress, error and summary.

    What dashboards and ``ldreg watch`` poll, so it is the cheapest route: matched
    ahead of the routers, no parameters or dependencies to resolve, and the key check
    and the fetch are one query on the event loop (api/reads.py), serialized once.
    """
    job_id = request.path_params["job_id"]
    reads = await get_reads(request)
    token = bearer_token(request)
    asked = job_id
    if job_ids.is_prefix(job_id):
        # A short id: resolved first (service.job_ids), a query of its own; a full
        # id goes straight to the one-query poll below.
        job_id = await _resolve_prefix(reads, token, job_id)
    found = await reads.job_for_key(token, job_id)
    if found.team_id is None:
        raise invalid_key()
    if found.job is None:
        raise ApiError(404, f"no job {asked} in your team", field="id")
    return json_response(JobOut.from_job(found.job))


async def _resolve_prefix(reads: Reads, token: str, prefix: str) -> str:
    """The full id of the team's one job whose id starts with ``prefix`` (401 for a key
    that is not live, then 422 / 404 / 409 as ``service.job_ids.resolve`` says)."""
    if len(prefix) < job_ids.MIN_PREFIX_LENGTH:
        if await reads.team_for_key(token) is None:
            raise invalid_key()
        raise job_ids.too_short(prefix)
    found = await reads.jobs_for_prefix(token, prefix)
    if found.team_id is None:
        raise invalid_key()
    return job_ids.resolve(prefix, found.job_ids)


def add_poll_route(app: FastAPI, prefix: str) -> None:
    """Serve ``GET {prefix}/jobs/{job_id}`` (:func:`get_job`) from the app's own routes.

    Not through ``router``: FastAPI (0.16x) keeps an included router as one entry and
    matches its routes twice per request, once to pick the router and once inside it,
    and it resolves declared parameters even for a route with no dependencies. For the
    polled route both cost as much as the poll's own work, so it sits on the app,
    declares nothing, and documents here what the decorator would have (the path
    parameter, the Bearer requirement, the router's tags and error responses).
    """
    app.add_api_route(
        f"{prefix}{router.prefix}/{{job_id}}",
        get_job,
        methods=["GET"],
        response_model=JobOut,
        tags=router.tags,
        responses=router.responses,
        openapi_extra={
            "security": [{"HTTPBearer": []}],
            "parameters": [
                {
                    "name": "job_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "title": "Job Id"},
                    "description": "the job's id, or a prefix of at least"
                    f" {job_ids.MIN_PREFIX_LENGTH} characters naming one of the team's jobs",
                }
            ],
        },
    )


@router.get("/{job_id}/metrics", response_model=MetricsOut)
def get_job_metrics(
    job_id: str,
    session: SessionDep,
    team: CurrentTeam,
    name: Annotated[list[str] | None, Query(description="only these series")] = None,
    since: Annotated[
        int | None, Query(ge=0, le=2**31 - 1, description="only steps after this one")
    ] = None,
    max_points: Annotated[
        int | None, Query(ge=1, le=100_000, description="thin each series to at most this many")
    ] = None,
) -> Response:
    """Per-series metric points ordered by step."""
    series = jobs.list_metrics(
        session=session, team=team, job_id=job_id, names=name, since=since, max_points=max_points
    )
    return json_response(MetricsOut.model_validate({"series": series}))


@router.get("/{job_id}/events", response_model=EventList)
def list_job_events(job_id: str, session: SessionDep, team: CurrentTeam) -> Response:
    """Every state transition, with its reason and the attempt it happened in."""
    events = jobs.list_events(session=session, team=team, job_id=job_id)
    return json_response(EventList(events=[EventOut.model_validate(e) for e in events]))


@router.post("/{job_id}/cancel", response_model=JobOut, responses={409: {"model": ErrorOut}})
def cancel_job(job_id: str, session: SessionDep, team: CurrentTeam) -> Response:
    """Cancel: a queued job ends at once; a running one turns 'cancelling' until its
    worker stops it (within a few training steps)."""
    job = jobs.request_cancel(session=session, team=team, job_id=job_id)
    return json_response(JobOut.from_job(job))


@router.post("/{job_id}/retry", response_model=JobOut, responses={409: {"model": ErrorOut}})
def retry_job(
    job_id: str, session: SessionDep, settings: SettingsDep, team: CurrentTeam
) -> Response:
    """Queue a failed or cancelled job again; it resumes from its last checkpoint. A
    finished sweep: its failed and cancelled children, and the sweep re-opens."""
    job = jobs.retry_job(session=session, settings=settings, team=team, job_id=job_id)
    out = JobOut.from_job(job)
    jobs.publish_queued(session=session, settings=settings, job=job)
    return json_response(out)


@router.get(
    "/{job_id}/report",
    response_model=dict[str, Any],
    responses={409: {"model": ErrorOut, "description": "not a sweep (not_a_sweep)"}},
)
def get_sweep_report(job_id: str, session: SessionDep, team: CurrentTeam) -> Response:
    """A sweep's report (docs/sweeps.md, "Reading a report"): per arm and metric, the
    paired effect against the baseline with its interval, the verdict and the seeds
    needed, the control's noise floor, and the failed children. While children run,
    the verdicts so far (``complete`` false)."""
    report = jobs.sweep_report(session=session, team=team, job_id=job_id)
    return Response(json.dumps(report, allow_nan=False), media_type="application/json")


@router.get("/{job_id}/artifacts", response_model=ArtifactList)
def list_job_artifacts(job_id: str, session: SessionDep, team: CurrentTeam) -> Response:
    artifacts = jobs.list_artifacts(session=session, team=team, job_id=job_id)
    return json_response(ArtifactList(artifacts=[ArtifactOut.from_artifact(a) for a in artifacts]))


@router.get(
    "/{job_id}/artifacts/{name:path}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_job_artifact(
    job_id: str, name: str, session: SessionDep, settings: SettingsDep, team: CurrentTeam
) -> FileResponse:
    """The artifact's bytes, streamed from disk."""
    artifact, path = jobs.get_artifact(
        session=session, settings=settings, team=team, job_id=job_id, name=name
    )
    return FileResponse(path, media_type=artifact.media_type, filename=path.name)
