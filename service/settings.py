"""One ``Settings`` object, read from the environment (``LDREG_*``).

The embedded default keeps everything under ``LDREG_HOME`` (``./var``): a SQLite
database, a filesystem broker that needs no server, artifacts and datasets. Pointing
``LDREG_DATABASE_URL`` at PostgreSQL and ``LDREG_BROKER_URL`` at Redis switches any
process (api, worker, admin) to production services.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LDREG_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    home: Path = Field(default=Path("var"), description="root of the embedded default's state")
    database_url: str = ""
    broker_url: str = ""
    # Unset: under ``home`` (filled in by the validator below).
    data_root: Path = Path()
    artifact_root: Path = Path()

    # Limits per team (over a limit: 429 for counts, 413/422 for sizes).
    max_active_jobs_per_team: int = Field(default=8, ge=1)
    max_epochs: int = Field(default=1000, ge=1)
    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1024)

    # Crash safety: a running job heartbeats; a sweeper re-queues it when stale.
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    stale_after_seconds: float = Field(default=45.0, gt=0)
    sweep_interval_seconds: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    # A queued job whose message was published longer ago than this is published
    # again: the message may have been lost (a non-persistent Redis restarted, a
    # publish failed after commit). A duplicate message is harmless: claims are
    # conditional. Keep it well above the normal wait of a job in the queue.
    requeue_after_seconds: float = Field(default=600.0, gt=0)
    # Redis re-delivers a message a dead worker had reserved after this long; with
    # early acks only such never-started messages can be re-delivered (see worker/).
    visibility_timeout_seconds: int = Field(default=12 * 3600, ge=60)

    # Queues: jobs go to "gpu" when a worker has CUDA, "cpu" otherwise (see worker/).
    default_queue: str = "cpu"
    # What one job may use on a worker of each queue (docs/operations.md, "Job sizes"):
    # host memory, and GPU memory where the queue's workers have GPUs. The API refuses
    # a spec whose estimate exceeds them (service/admission.py); the worker runs each
    # job under the host limit (RLIMIT_DATA), so a job that still exceeds it fails
    # alone with "out_of_memory" and the host survives. JSON in the environment:
    # LDREG_QUEUE_MEMORY_GB='{"cpu": 16, "gpu": 64}'. A queue not named has no limit.
    queue_memory_gb: dict[str, float] = Field(default_factory=lambda: {"cpu": 16.0, "gpu": 64.0})
    queue_device_memory_gb: dict[str, float] = Field(default_factory=lambda: {"gpu": 40.0})

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        home = self.home.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{home / 'ldreg.sqlite'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if "data_root" not in self.model_fields_set:
            self.data_root = home / "data"
        if "artifact_root" not in self.model_fields_set:
            self.artifact_root = home / "artifacts"
        self.data_root = self.data_root.resolve()
        self.artifact_root = self.artifact_root.resolve()
        if self.stale_after_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError("stale_after_seconds must exceed two heartbeat intervals")
        if self.environment == "production":
            if self.database_url.startswith("sqlite"):
                raise ValueError("production needs LDREG_DATABASE_URL=postgresql+psycopg://...")
            if not self.broker_url.startswith(("redis://", "rediss://")):
                raise ValueError("production needs LDREG_BROKER_URL=redis://...")
        return self

    @property
    def broker_dir(self) -> Path:
        """Folder of the serverless filesystem broker (embedded default only)."""
        return self.home.resolve() / "broker"

    @property
    def upload_root(self) -> Path:
        return self.artifact_root / "uploads"

    def job_dir(self, job_id: str) -> Path:
        return self.artifact_root / "jobs" / job_id


@lru_cache
def get_settings() -> Settings:
    return Settings()
