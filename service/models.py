"""The database schema: the truth about every team, key, job, event, metric and artifact.

Alembic migrations (migrations/) are the only way this schema reaches a database;
``tests`` check that the models and the migrations never drift apart.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING)

# The kind of a sweep's parent job: never published, never claimed; its state follows
# its children's (service/sweep_jobs.py).
SWEEP_KIND = "sweep"

# Constraint names are fixed so migrations are identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Its share of the GPUs under contention is proportional (``ldreg admin team-weight``).
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="team")


class ApiKey(Base):
    """A team's bearer token, stored as its SHA-256 (keys are 256-bit random, so a
    fast hash is enough: there is nothing to brute-force as with passwords)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    team: Mapped[Team] = relationship(back_populates="api_keys")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_team_created", "team_id", "created_at", "id"),
        Index("ix_jobs_state_heartbeat", "state", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    queue: Mapped[str] = mapped_column(String(32), default="cpu")

    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    # Bumped by every claim; every worker write is fenced by it.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    progress_epoch: Mapped[int] = mapped_column(Integer, default=0)
    progress_epochs: Mapped[int] = mapped_column(Integer, default=0)
    progress_fraction: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Step-level progress, carried by the heartbeat (worker/sink.py), never written per
    # step: global training steps done and in the whole run, throughput, and the time
    # left as estimated at progress_updated_at.
    progress_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_images_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress_eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Last time a message for this job was published; the sweeper re-publishes queued
    # jobs whose message may have been lost (Redis here keeps nothing on disk).
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    # A sweep (kind "sweep", service/sweep_jobs.py) runs as children: ordinary pretrain
    # jobs whose parent_id is the sweep's id, each recording its arm and seed.
    parent_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True, index=True
    )
    sweep_arm: Mapped[str | None] = mapped_column(Text, nullable=True)
    sweep_seed: Mapped[int | None] = mapped_column(Integer, nullable=True)

    # Scheduling (service/claiming.py): what the job needs (from spec.resources), the
    # start of its current run (set at each claim; cleared once the run is charged to
    # the team's usage), the device indices it holds on its worker, and a request to
    # stop and go back to the queue for a higher-priority job.
    gpus: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    memory_gb: Mapped[float | None] = mapped_column(Float, nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    preemptible: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    run_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    devices: Mapped[str | None] = mapped_column(String(200), nullable=True)
    preempt_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    preempted_for: Mapped[str | None] = mapped_column(String(32), nullable=True)

    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", order_by="JobEvent.id", cascade="all, delete-orphan"
    )

    def transition(self, to_state: JobState, reason: str, *, at: datetime | None = None) -> None:
        """Change state and record the event (with the attempt it happened in)."""
        at = at or utcnow()
        self.events.append(
            JobEvent(
                from_state=self.state,
                to_state=to_state.value,
                attempt=self.attempt,
                reason=reason,
                at=at,
            )
        )
        self.state = to_state.value
        if to_state in FINISHED_STATES:
            self.finished_at = at


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="events")


class Metric(Base):
    """One value of one series at one global step. Unique per (job, name, step), so a
    replayed epoch after a resume overwrites instead of duplicating."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "name", "step"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    epoch: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    attempt: Mapped[int] = mapped_column(Integer)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    media_type: Mapped[str] = mapped_column(String(100), default="application/octet-stream")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Upload(Base):
    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(300))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    num_points: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    has_labels: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class IdempotencyKey(Base):
    """Maps a team's ``Idempotency-Key`` to the job its first request created."""

    __tablename__ = "idempotency_keys"

    team_id: Mapped[str] = mapped_column(
        ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Worker(Base):
    """A live worker (``ldreg worker``): registered at start, heartbeated by its
    sweeper process, deleted at a clean stop; stale (ignored) once its heartbeat is
    older than ``stale_after_seconds``. ``id`` is its Celery node name; a job's
    ``worker`` column is ``{id}:{pid}``."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200))
    queues: Mapped[list[str]] = mapped_column(JSON)
    gpus: Mapped[int] = mapped_column(Integer)
    memory_gb: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class TeamUsage(Base):
    """A team's decayed GPU-seconds as of ``as_of`` (service/scheduling.py, Usage)."""

    __tablename__ = "team_usage"

    team_id: Mapped[str] = mapped_column(
        ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True
    )
    value: Mapped[float] = mapped_column(Float, default=0.0)
    as_of: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


@event.listens_for(Job, "before_insert")
def _resources_from_spec(_mapper: Any, _connection: Any, job: Job) -> None:
    """A new job's scheduling columns come from its spec's ``resources`` (a pretrain
    spec's; every path that creates a job: submit, a sweep's children, ...)."""
    resources = (job.spec or {}).get("resources") if isinstance(job.spec, dict) else None
    if not isinstance(resources, dict):
        return
    job.gpus = int(resources.get("gpus") or job.spec.get("devices") or 1)
    job.memory_gb = resources.get("memory_gb")
    job.priority = int(resources.get("priority") or 0)
    job.preemptible = bool(resources.get("preemptible", False))
