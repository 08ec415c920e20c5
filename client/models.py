"""Typed views of the API's JSON (docs/api.md).

Models accept fields they do not know (``extra="allow"``) so an older client keeps
working when the server adds fields; the fields named here are the fixed interface.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_STATES = frozenset({"queued", "running", "cancelling"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Progress(_Model):
    epoch: int = 0
    epochs: int = 0
    # The server's finer measure (steps of a run, points of a diagnosis), when reported.
    fraction: float | None = None

    @property
    def done(self) -> float:
        """Share of the work done: the server's fraction when known, else by epochs."""
        if self.fraction is not None:
            return self.fraction
        return self.epoch / self.epochs if self.epochs else 0.0


class JobError(_Model):
    code: str
    message: str


class Job(_Model):
    id: str
    kind: str
    name: str | None = None
    state: str
    attempt: int = 0
    progress: Progress = Field(default_factory=Progress)
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: JobError | None = None
    summary: dict[str, Any] | None = None
    spec: dict[str, Any] = Field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def method(self) -> str | None:
        """The SSL method of a pretrain job."""
        return self.spec.get("method") if self.kind == "pretrain" else None

    @property
    def ldreg_on(self) -> bool | None:
        """Whether a pretrain job trains with the LDReg term (``"ldreg": null`` is off)."""
        if self.kind != "pretrain":
            return None
        return self.spec.get("ldreg", {}) is not None


class MetricPoint(_Model):
    epoch: int
    step: int
    value: float


class Event(_Model):
    at: datetime | None = None
    from_state: str | None = None
    to_state: str
    attempt: int = 0
    reason: str = ""


class Artifact(_Model):
    name: str
    size: int | None = None
    media_type: str | None = None
    sha256: str | None = None
    created_at: datetime | None = None


class Upload(_Model):
    id: str
    filename: str | None = None
    size: int | None = None
    n: int | None = Field(default=None, description="number of points (rows)")
    d: int | None = Field(default=None, description="dimensions (columns)")
    dtype: str | None = None
    has_labels: bool | None = None
