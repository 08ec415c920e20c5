"""The API side of jobs: submit, list, read, cancel, retry, metrics, events, artifacts.

Keyword-only functions over a SQLAlchemy session. Every read is scoped to a team: a
job of another team is simply not found, so the HTTP layer answers 404 and never
reveals that it exists. The worker side (claim, heartbeat, fenced writes) lives in
service/execution.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ldreg.data_layout import layout_problem
from ldreg.spec import (
    SPEC_MODELS,
    DatasetSpec,
    DiagnoseSpec,
    JobSource,
    PretrainSpec,
    field_errors,
    storable_text,
)
from service import job_ids, sweep_jobs
from service.admission import check_admission
from service.claiming import check_fits
from service.errors import Conflict, InvalidInput, LimitExceeded, NotFound
from service.models import (
    ACTIVE_STATES,
    FINISHED_STATES,
    SWEEP_KIND,
    Artifact,
    IdempotencyKey,
    Job,
    JobEvent,
    JobState,
    Metric,
    Team,
    Upload,
    utcnow,
)
from service.settings import Settings
from service.sweeps import Arm, SweepSpec, arms, expand

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 200
# The spec model of every job kind: ldreg's, and the service's sweep (service/sweeps.py).
JOB_SPEC_MODELS: dict[str, type[BaseModel]] = {**SPEC_MODELS, SWEEP_KIND: SweepSpec}
JobSpec = PretrainSpec | DiagnoseSpec | SweepSpec


def _validation_details(exc: ValidationError, prefix: str) -> list[dict[str, str]]:
    return [{"field": f, "message": m} for f, m in field_errors(exc, prefix)]


def validate_spec(kind: str, spec: BaseModel | dict[str, Any]) -> JobSpec:
    """The spec as its pydantic model (the one definition shared with the worker)."""
    model = JOB_SPEC_MODELS.get(kind)
    if model is None:
        raise InvalidInput(
            f"unknown job kind {kind!r}; expected one of {sorted(JOB_SPEC_MODELS)}", field="kind"
        )
    if isinstance(spec, model):
        return spec  # type: ignore[return-value]
    try:
        raw = spec.model_dump() if isinstance(spec, BaseModel) else spec
        return model.model_validate(raw)  # type: ignore[return-value]
    except ValidationError as exc:
        details = _validation_details(exc, "spec")
        first = details[0]
        raise InvalidInput(first["message"], field=first["field"], details=details) from None


def _check_dataset_path(settings: Settings, dataset: DatasetSpec, field: str) -> None:
    """Resolve a dataset path under the data root, following symlinks, and refuse an
    escape. ``ldreg.spec`` already refuses '..' and absolute paths; this also catches
    a symlink inside the root that points out of it."""
    if dataset.path is None:
        return
    root = Path(settings.data_root).resolve()
    resolved = (root / dataset.path).resolve()
    if not resolved.is_relative_to(root):
        raise InvalidInput("path must stay inside the server's data root", field=field)
    problem = layout_problem(dataset.name, resolved, dataset.path)
    if problem is not None:
        raise InvalidInput(problem, field=field, code="dataset_not_found")


def _arm_field(field: str | None, arm: Arm) -> str:
    """Where a problem of an arm's pretrain spec lies in the sweep's spec: on the grid
    value that set the field (``spec.grid.ldreg.k.1``), else on the base's field."""
    path = (field or "spec").removeprefix("spec").lstrip(".")
    for key, index in arm.indices.items():
        if path and (path == key or path.startswith(key + ".") or key.startswith(path + ".")):
            return f"spec.grid.{key}.{index}"
    return f"spec.base.{path}" if path else "spec.base"


def _check_sweep(*, session: Session, settings: Settings, team: Team, spec: SweepSpec) -> None:
    """A sweep's children are jobs like any other: each arm's spec (its children differ
    only in their seed) passes this server's limits, the dataset's files and the memory
    estimate, or the sweep is refused naming the arm and the grid value (or base field)
    at fault; and all its children must fit the team's limit of queued and running
    jobs, else no wait could ever admit it."""
    sweep_arms = arms(spec)
    n = len(sweep_arms) * len(spec.seeds)
    limit = settings.max_active_jobs_per_team
    if n > limit:
        raise InvalidInput(
            f"the sweep would run {n} children ({len(sweep_arms)} arms × {len(spec.seeds)}"
            f" seeds), over this server's limit of {limit} queued or running jobs per team:"
            " list fewer grid values or fewer seeds",
            field="spec.grid",
            code="too_many_children",
        )
    details: list[dict[str, str]] = []
    first: InvalidInput | None = None
    for arm in sweep_arms:
        try:
            child = PretrainSpec.model_validate(arm.spec)
            _check_limits_and_scope(session=session, settings=settings, team=team, spec=child)
        except InvalidInput as exc:
            detail = {"field": _arm_field(exc.field, arm), "message": f"arm {arm.name!r}: {exc}"}
            if detail not in details:
                details.append(detail)
            first = first or exc
    if first is not None:
        raise InvalidInput(
            details[0]["message"], field=details[0]["field"], code=first.code, details=details
        )


def _check_limits_and_scope(
    *, session: Session, settings: Settings, team: Team, spec: JobSpec
) -> None:
    if isinstance(spec, SweepSpec):
        _check_sweep(session=session, settings=settings, team=team, spec=spec)
        return
    if isinstance(spec, PretrainSpec):
        if spec.epochs > settings.max_epochs:
            raise InvalidInput(
                f"epochs ({spec.epochs}) is over this server's limit of {settings.max_epochs}",
                field="spec.epochs",
                code="limit_exceeded",
            )
        _check_dataset_path(settings, spec.dataset, "spec.dataset.path")
        check_admission(spec, queue=settings.default_queue, settings=settings)
        check_fits(session=session, settings=settings, spec=spec)
        return

    source = spec.source
    if isinstance(source, JobSource):
        _check_dataset_path(settings, source.dataset, "spec.source.dataset.path")
        src = get_job(session=session, team=team, job_id=source.job_id)
        if src is None or src.kind != "pretrain":
            raise InvalidInput(
                "no pretrain job with this id in your team", field="spec.source.job_id"
            )
        if src.state != JobState.SUCCEEDED:
            raise InvalidInput(
                f"job {src.id} is {src.state}; diagnose needs a succeeded pretrain job",
                field="spec.source.job_id",
            )
        return

    upload = session.scalars(
        select(Upload).where(Upload.id == source.upload_id, Upload.team_id == team.id)
    ).first()
    if upload is None:
        raise InvalidInput("no upload with this id in your team", field="spec.source.upload_id")
    # LID needs k neighbours besides the point itself.
    too_big = [k for k in spec.k if k >= upload.num_points]
    if too_big:
        raise InvalidInput(
            f"k={max(too_big)} needs more than {max(too_big)} points,"
            f" but upload {upload.id} has {upload.num_points}",
            field="spec.k",
        )


def _request_sha256(kind: str, name: str | None, spec: dict[str, Any]) -> str:
    # Hash the normalised request, so key order and spelled-out defaults do not matter.
    canonical = json.dumps({"kind": kind, "name": name, "spec": spec}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(
    *, session: Session, team: Team, idempotency_key: str, request_sha256: str
) -> Job | None:
    """The job an earlier request with this key created, if the request is the same."""
    row = session.get(IdempotencyKey, (team.id, idempotency_key))
    if row is None:
        return None
    if row.request_sha256 != request_sha256:
        raise InvalidInput(
            "this Idempotency-Key was already used with a different request;"
            " use a new key for a new job",
            field="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return session.get(Job, row.job_id)


def create_job(
    *,
    session: Session,
    settings: Settings,
    team: Team,
    kind: str,
    spec: BaseModel | dict[str, Any],
    name: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Validate and store a queued job; returns ``(job, created)``.

    ``created`` is False when ``idempotency_key`` replays an earlier identical request.
    The caller publishes the job to the broker *after* this commits (see
    :func:`publish_job`), so a worker never receives an id the database does not have.
    """
    model = validate_spec(kind, spec)
    normalised = model.model_dump(mode="json")
    request_sha256 = _request_sha256(kind, name, normalised)

    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 200:
            raise InvalidInput(
                "Idempotency-Key must be 1 to 200 characters", field="Idempotency-Key"
            )
        earlier = _replay(
            session=session,
            team=team,
            idempotency_key=idempotency_key,
            request_sha256=request_sha256,
        )
        if earlier is not None:
            return earlier, False

    _check_limits_and_scope(session=session, settings=settings, team=team, spec=model)
    # A sweep's children: ordinary pretrain jobs, each counted against the team's limit
    # (the sweep itself runs nothing and is not counted).
    children = expand(model) if isinstance(model, SweepSpec) else []

    # Lock the team's row so two concurrent submissions cannot both pass the count.
    session.execute(select(Team.id).where(Team.id == team.id).with_for_update())
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.team_id == team.id,
            Job.state.in_([s.value for s in ACTIVE_STATES]),
            Job.kind != SWEEP_KIND,
        )
    )
    if children and (active or 0) + len(children) > settings.max_active_jobs_per_team:
        session.rollback()
        raise LimitExceeded(
            f"this sweep's {len(children)} children and your team's {active} queued or"
            f" running jobs would be over the limit of {settings.max_active_jobs_per_team};"
            " wait for some to finish, or cancel some"
        )
    if (active or 0) >= settings.max_active_jobs_per_team:
        session.rollback()
        raise LimitExceeded(
            f"your team has {active} queued or running jobs, the limit is"
            f" {settings.max_active_jobs_per_team}; wait for one to finish or cancel one"
        )

    job = Job(
        team_id=team.id,
        kind=kind,
        name=name,
        spec=normalised,
        queue=settings.default_queue,
        attempt=0,
        max_attempts=settings.max_attempts,
        progress_epoch=0,
        progress_epochs=model.epochs if isinstance(model, PretrainSpec) else len(children),
        # Set with the commit that makes it queued (service/queue.py's contract): the
        # sweeper re-publishes a queued job whose message is older than it should be.
        # A sweep is never published: its children are.
        enqueued_at=None if isinstance(model, SweepSpec) else utcnow(),
    )
    job.transition(JobState.QUEUED, "submitted")
    session.add(job)
    if isinstance(model, SweepSpec):
        session.flush()  # the sweep's id, for its children
        session.add_all(
            sweep_jobs.new_children(
                parent=job,
                children=children,
                queue=settings.default_queue,
                max_attempts=settings.max_attempts,
            )
        )
    if idempotency_key is not None:
        session.flush()
        session.add(
            IdempotencyKey(
                team_id=team.id, key=idempotency_key, request_sha256=request_sha256, job_id=job.id
            )
        )
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key won the race: answer as its replay.
        session.rollback()
        if idempotency_key is None:
            raise
        earlier = _replay(
            session=session,
            team=team,
            idempotency_key=idempotency_key,
            request_sha256=request_sha256,
        )
        if earlier is None:
            raise
        return earlier, False
    return job, True


def validate_job(
    *,
    session: Session,
    settings: Settings,
    team: Team,
    kind: str,
    spec: BaseModel | dict[str, Any],
) -> JobSpec:
    """A dry run of :func:`create_job`: the same validation and admission checks
    (the spec, this server's limits, the dataset's files, the memory estimate, the
    team's uploads and source jobs), nothing stored or published. Returns the
    normalised spec; raises what a submit would (422)."""
    model = validate_spec(kind, spec)
    try:
        _check_limits_and_scope(session=session, settings=settings, team=team, spec=model)
    finally:
        session.rollback()
    return model


def publish_job(*, settings: Settings, job: Job) -> bool:
    """Send the job's id to the broker. A failure is logged, not raised: the job is
    committed as queued and the sweeper re-publishes queued jobs that were never
    picked up, so the client still gets its job."""
    # Imported here: Celery is heavy and only needed once a job is submitted.
    from service.queue import enqueue_job

    try:
        enqueue_job(settings, job.id, job.queue)
    except Exception:
        log.warning("could not publish job %s; the sweeper will re-send it", job.id, exc_info=True)
        return False
    return True


def publish_queued(*, session: Session, settings: Settings, job: Job) -> int:
    """:func:`publish_job` for a job just queued, or for a sweep every queued child (the
    sweep itself is never published). Returns how many were published."""
    if job.kind != SWEEP_KIND:
        return int(publish_job(settings=settings, job=job))
    targets = sweep_jobs.queued_children(session, job.id)
    session.rollback()  # ends the read's transaction before the broker round trips
    return sum(publish_job(settings=settings, job=Job(id=i, queue=q)) for i, q in targets)


def get_job(*, session: Session, team: Team, job_id: str, for_update: bool = False) -> Job | None:
    """The team's job with this id, or None (also for another team's job)."""
    query = select(Job).where(Job.id == job_id, Job.team_id == team.id)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query).first()


def resolve_job_id(*, session: Session, team: Team, job_id: str, field: str = "id") -> str:
    """The full id a job id or short prefix names among the team's jobs
    (``service.job_ids``): a full-length id is returned as given; a prefix shorter than
    the minimum is a 422, one naming several jobs a 409, one naming none a 404."""
    if not job_ids.is_prefix(job_id):
        return job_id
    matches: list[str] = []
    if len(job_id) >= job_ids.MIN_PREFIX_LENGTH:
        matches = list(
            session.scalars(
                select(Job.id).where(
                    Job.team_id == team.id,
                    Job.id.like(job_ids.like_pattern(job_id), escape=job_ids.LIKE_ESCAPE),
                )
            )
        )
    return job_ids.resolve(job_id, matches, field)


def require_job(
    *, session: Session, team: Team, job_id: str, for_update: bool = False, field: str = "id"
) -> Job:
    """The team's job named by ``job_id`` (a full id or a unique prefix of at least
    ``job_ids.MIN_PREFIX_LENGTH`` characters); 404 when the team has none."""
    full_id = resolve_job_id(session=session, team=team, job_id=job_id, field=field)
    job = get_job(session=session, team=team, job_id=full_id, for_update=for_update)
    if job is None:
        raise job_ids.not_found(job_id, field)
    return job


_require_job = require_job


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        created = datetime.fromisoformat(created_at)
        if created.tzinfo is None or not isinstance(job_id, str) or len(job_id) > 32:
            raise ValueError
        return created, storable_text(job_id)
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise InvalidInput(
            "invalid cursor; pass the next_cursor of a previous page", field="cursor"
        ) from None


@dataclass
class JobPage:
    jobs: list[Job]
    next_cursor: str | None


def list_jobs(
    *,
    session: Session,
    team: Team,
    states: Sequence[str] | None = None,
    kind: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
    parent: str | None = None,
) -> JobPage:
    """The team's jobs newest first, a page at a time; with ``parent`` (a sweep's id
    or short id), only that sweep's children.

    The cursor is the (created_at, id) of the last job of the previous page, so pages
    never repeat or skip a job even while new jobs arrive (keyset pagination on the
    ``ix_jobs_team_created`` index)."""
    limit = max(1, min(limit, MAX_PAGE_SIZE))
    query = select(Job).where(Job.team_id == team.id)
    if states:
        query = query.where(Job.state.in_(states))
    if kind:
        query = query.where(Job.kind == kind)
    if parent:
        parent_id = resolve_job_id(session=session, team=team, job_id=parent, field="parent")
        query = query.where(Job.parent_id == parent_id)
    if cursor:
        created, job_id = _decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id))
        )
    rows = list(
        session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return JobPage(jobs=rows, next_cursor=_encode_cursor(rows[-1]) if more else None)


def queue_positions(*, session: Session, jobs: Sequence[Job]) -> dict[str, int]:
    """``{job id: position}`` of the queued ones among ``jobs``: 1 for the next to run,
    counting every team's queued jobs in the same queue in the order they (last)
    entered it (their latest transition to ``queued``: a retried or re-queued job
    goes to the back). One query for the whole page, none without a queued job."""
    wanted = [
        job.id for job in jobs if job.state == JobState.QUEUED.value and job.kind != SWEEP_KIND
    ]
    if not wanted:
        return {}
    queued = JobState.QUEUED.value
    entered = (
        select(JobEvent.job_id, func.max(JobEvent.at).label("entered_at"))
        .join(Job, Job.id == JobEvent.job_id)
        .where(Job.state == queued, JobEvent.to_state == queued)
        .group_by(JobEvent.job_id)
        .subquery()
    )
    ranked = (
        select(
            Job.id,
            func.row_number()
            .over(
                partition_by=Job.queue,
                order_by=(func.coalesce(entered.c.entered_at, Job.created_at), Job.id),
            )
            .label("position"),
        )
        .outerjoin(entered, entered.c.job_id == Job.id)
        .where(Job.state == queued, Job.kind != SWEEP_KIND)  # a sweep waits in no queue
        .subquery()
    )
    rows = session.execute(select(ranked.c.id, ranked.c.position).where(ranked.c.id.in_(wanted)))
    return {job_id: int(position) for job_id, position in rows}


def downsample_indices(n: int, max_points: int) -> list[int]:
    """At most ``max_points`` evenly spread indices of ``range(n)``, first and last kept."""
    if n <= max_points:
        return list(range(n))
    if max_points == 1:
        return [n - 1]
    # Spacing (n-1)/(m-1) > 1, so rounding never maps two points to one index.
    return [round(i * (n - 1) / (max_points - 1)) for i in range(max_points)]


def thin_indices(epochs: Sequence[int], max_points: int) -> list[int]:
    """Indices of the points to keep of a series (``epochs``: each point's epoch, in
    step order): the last point of every epoch (the epoch's value; the newest point of
    a running one) always, and as many more as ``max_points`` leaves room for, evenly
    spread. So a series is at most ``max(max_points, its epochs)`` points long."""
    n = len(epochs)
    if n <= max_points:
        return list(range(n))
    ends = [i for i in range(n) if i == n - 1 or epochs[i + 1] != epochs[i]]
    room = max_points - len(ends)
    if room <= 0:
        return ends
    kept = set(ends)
    others = [i for i in range(n) if i not in kept]
    return sorted(kept.union(others[j] for j in downsample_indices(len(others), room)))


def list_metrics(
    *,
    session: Session,
    team: Team,
    job_id: str,
    names: list[str] | None = None,
    since: int | None = None,
    max_points: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Per-series points ordered by step: only steps after ``since`` (for pollers that
    pass the last step they have), each series thinned to ``max_points`` on read
    (:func:`thin_indices`: every epoch's value is kept)."""
    job = _require_job(session=session, team=team, job_id=job_id)
    query = select(Metric.name, Metric.epoch, Metric.step, Metric.value).where(
        Metric.job_id == job.id
    )
    if names:
        query = query.where(Metric.name.in_(names))
    if since is not None:
        query = query.where(Metric.step > since)
    series: dict[str, list[dict[str, Any]]] = {}
    for name, epoch, step, value in session.execute(query.order_by(Metric.name, Metric.step)):
        series.setdefault(name, []).append({"epoch": epoch, "step": step, "value": value})
    if max_points is not None:
        for name, points in series.items():
            epochs = [p["epoch"] for p in points]
            series[name] = [points[i] for i in thin_indices(epochs, max_points)]
    return series


def list_events(*, session: Session, team: Team, job_id: str) -> list[JobEvent]:
    job = _require_job(session=session, team=team, job_id=job_id)
    return list(
        session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id))
    )


def request_cancel(*, session: Session, team: Team, job_id: str) -> Job:
    """Cancel a job: a queued one at once; a running one cooperatively (the worker
    sees ``cancel_requested`` within a few steps and ends it ``cancelled``). A sweep:
    every unfinished child so (service/sweep_jobs.py); a sweep's child: the sweep follows."""
    job_id, is_sweep = _resolve_kind(session=session, team=team, job_id=job_id)
    if is_sweep:
        parent = sweep_jobs.cancel_sweep(session, job_id)
        session.commit()
        return parent
    # The row lock orders us against a worker's claim (a conditional UPDATE on state).
    job = _require_job(session=session, team=team, job_id=job_id, for_update=True)
    state = JobState(job.state)
    if state in FINISHED_STATES:
        session.rollback()
        raise Conflict(f"job {job.id} already {state.value}; nothing to cancel", field="state")
    job.cancel_requested = True
    if state == JobState.QUEUED:
        job.transition(JobState.CANCELLED, "cancelled by user before it started")
    elif state == JobState.RUNNING:
        job.transition(JobState.CANCELLING, "cancel requested by user")
    sweep_jobs.follow_parent(session, job)
    session.commit()
    return job


def _resolve_kind(*, session: Session, team: Team, job_id: str) -> tuple[str, bool]:
    """The full id of the team's job ``job_id`` names, and whether it is a sweep (read
    without a lock: a sweep is locked after its children, the lock order of every
    writer). 404 / 409 / 422 as :func:`require_job`."""
    full_id = resolve_job_id(session=session, team=team, job_id=job_id)
    kind = session.scalar(select(Job.kind).where(Job.id == full_id, Job.team_id == team.id))
    if kind is None:
        raise job_ids.not_found(job_id, "id")
    return full_id, kind == SWEEP_KIND


def retry_job(*, session: Session, settings: Settings, team: Team, job_id: str) -> Job:
    """Queue a failed or cancelled job again; the worker resumes it from its last
    checkpoint. The attempt counter and the events keep the earlier history; the job
    gets a fresh budget of automatic attempts. A finished sweep: each of its failed or
    cancelled children so, and the sweep re-opens (publish its queued children:
    :func:`publish_queued`); a sweep's child: the sweep follows (and re-opens)."""
    job_id, is_sweep = _resolve_kind(session=session, team=team, job_id=job_id)
    if is_sweep:
        parent, _ = sweep_jobs.retry_sweep(
            session, job_id, lambda child, state: _requeue(child, state, settings)
        )
        session.commit()
        return parent
    job = _require_job(session=session, team=team, job_id=job_id, for_update=True)
    state = JobState(job.state)
    if state not in (JobState.FAILED, JobState.CANCELLED):
        session.rollback()
        raise Conflict(
            f"job {job.id} is {state.value}; only failed or cancelled jobs can be retried",
            field="state",
        )
    _requeue(job, state, settings)
    sweep_jobs.follow_parent(session, job, reopen=True)
    session.commit()
    return job


def _requeue(job: Job, state: JobState, settings: Settings) -> None:
    """A user's retry of a failed or cancelled job: queued again, to resume."""
    job.transition(JobState.QUEUED, f"retried by user after {state.value}")
    job.cancel_requested = False
    job.error_code = None
    job.error_message = None
    job.finished_at = None
    job.worker = None
    job.heartbeat_at = None
    job.max_attempts = job.attempt + settings.max_attempts
    job.enqueued_at = utcnow()


def list_artifacts(*, session: Session, team: Team, job_id: str) -> list[Artifact]:
    job = _require_job(session=session, team=team, job_id=job_id)
    return list(
        session.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name))
    )


def get_artifact(
    *, session: Session, settings: Settings, team: Team, job_id: str, name: str
) -> tuple[Artifact, Path]:
    """An artifact and its file, which must lie inside the job's folder."""
    job = _require_job(session=session, team=team, job_id=job_id)
    artifact = session.scalars(
        select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name)
    ).first()
    if artifact is None:
        raise NotFound(f"job {job.id} has no artifact {name!r}", field="name")
    job_dir = settings.job_dir(job.id).resolve()
    stored = Path(artifact.path)
    path = (stored if stored.is_absolute() else job_dir / stored).resolve()
    # Names and stored paths never lead out of the job's folder, even through symlinks.
    if not path.is_relative_to(job_dir) or not path.is_file():
        raise NotFound(f"artifact {name!r} of job {job.id} is not available", field="name")
    return artifact, path


def sweep_report(*, session: Session, team: Team, job_id: str) -> dict[str, Any]:
    """A sweep's report (docs/sweeps.md): once the sweep has finished, the one computed
    when its last child did (its summary); before, the verdicts so far, computed now
    (``complete`` false). 409 (``not_a_sweep``) for any other kind of job."""
    job = _require_job(session=session, team=team, job_id=job_id)
    if job.kind != SWEEP_KIND:
        raise Conflict(
            f"job {job.id} is a {job.kind} job, not a sweep: only a sweep has a report",
            field="id",
            code="not_a_sweep",
        )
    if JobState(job.state) in FINISHED_STATES and job.summary is not None:
        return job.summary
    spec, rows = job.spec, sweep_jobs.children_rows(session, job.id)
    session.rollback()  # the report's statistics need no open transaction
    return sweep_jobs.sweep_report(spec, rows)
