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
    epoch: int = 0  # epochs finished
    epochs: int = 0
    # The server's finer measure (steps of a run, points of a diagnosis), when reported.
    fraction: float | None = None
    # A training run's steps done and in all, counted across epochs (as metrics' steps).
    step: int | None = None
    steps: int | None = None
    images_per_second: float | None = None
    eta_seconds: float | None = None  # as of updated_at; None unless running
    updated_at: datetime | None = None

    @property
    def done(self) -> float:
        """Share of the work done: the server's fraction when known, else by epochs."""
        if self.fraction is not None:
            return self.fraction
        return self.epoch / self.epochs if self.epochs else 0.0

    @property
    def steps_per_epoch(self) -> int | None:
        if not self.steps or not self.epochs:
            return None
        return self.steps // self.epochs

    @property
    def epoch_step(self) -> tuple[int, int] | None:
        """``(step, steps)`` within the epoch in progress (the one after ``epoch``)."""
        per_epoch = self.steps_per_epoch
        if self.step is None or not per_epoch:
            return None
        return min(max(self.step - self.epoch * per_epoch, 0), per_epoch), per_epoch


class JobError(_Model):
    code: str
    message: str
    # "user": the job's input failed it (retrying it unchanged fails again);
    # "infrastructure": a lost worker or an unexpected error (a retry may succeed).
    kind: str | None = None


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
    worker: str | None = None  # the worker that claimed its latest attempt
    queue_position: int | None = None  # in a job list, for a queued job: 1 = next to run
    # A sweep's child: the sweep's id, and the arm and seed it runs (docs/sweeps.md).
    parent_id: str | None = None
    sweep_arm: str | None = None
    sweep_seed: int | None = None
    children: int | None = None  # a sweep: how many children it runs

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


class JobMetrics(_Model):
    """A compared job's metric values: final once it has finished, else the latest
    as of ``as_of_epoch`` / ``as_of_step``."""

    final: bool = False
    as_of_epoch: int | None = None
    as_of_step: int | None = None
    values: dict[str, float] = Field(default_factory=dict)


class ComparedJob(Job):
    lid_gmean: dict[str, dict[str, float]] = Field(default_factory=dict)
    metrics: JobMetrics = Field(default_factory=JobMetrics)
    # A diagnose job's LID histograms and summaries (None for a pretrain job).
    diagnosis: dict[str, Any] | None = None


class SpecDifference(_Model):
    field: str  # dotted, e.g. "ldreg.alpha"
    values: list[Any] = Field(default_factory=list)  # each job's, in the order of jobs


class Comparison(_Model):
    """``GET /v1/compare``: the jobs (the first is the baseline), the spec fields that
    differ between them, and each job's LID distances to the baseline."""

    baseline_id: str
    jobs: list[ComparedJob] = Field(default_factory=list)
    spec_diff: list[SpecDifference] = Field(default_factory=list)
    distances: list[dict[str, Any]] = Field(default_factory=list)
    definitions: dict[str, str] = Field(default_factory=dict)
