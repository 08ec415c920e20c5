"""Side-by-side comparison of a team's jobs (``GET /v1/compare``): the data layer.

Everything comes from what the jobs stored -- summaries, and the per-point LIDs a
diagnose job leaves in ``lids.npz`` -- with numpy; nothing here imports torch.

Two distances, for each (estimator, k) both jobs measured, each job against the first:

* ``fisher_rao``: |ln a - ln b| between the geometric-mean LIDs a and b. The Fisher–Rao
  distance between two LIDs (Huang et al., "LDReg", ICLR 2024, Sec. 4), so "LDReg raised
  local dimensionality by X" reads as ``log_ratio`` = ln(b / a) (X = e^log_ratio).
* ``wasserstein_log_lid``: the 1-D Wasserstein-1 distance between the two jobs'
  distributions of ln LID (``ldreg.diagnose.log_lid_wasserstein``): the average
  Fisher–Rao distance the LIDs of one must move to become the other's; never below
  ``fisher_rao``, above it when the shapes differ (e.g. a collapsed tail). Only when
  both jobs left per-point LIDs (diagnose jobs); ``None`` otherwise.

A pretrain job's summary names its LIDs ``lid_gmean_k{k}`` (MLE, docs/science.md's metric
names); a diagnose job's holds ``{"lid_gmean": {estimator: {k: value}}}``. Both are
read into the same ``{(estimator, k): value}`` form.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.errors import InvalidInput, NotFound
from service.jobs import get_artifact, require_job
from service.models import FINISHED_STATES, Job, Metric, Team
from service.settings import Settings

MAX_COMPARE_JOBS = 20
LIDS_ARTIFACT = "lids.npz"
# A diagnose job's LID histograms and per-(estimator, k) summaries (worker/diagnose_job.py).
HISTOGRAM_ARTIFACT = "histogram.json"
# Larger histogram files are left out of a comparison (they are artifacts to download).
MAX_HISTOGRAM_BYTES = 8 << 20
_PRETRAIN_LID_KEY = re.compile(r"^lid_gmean_k(\d+)$")

LIDKey = tuple[str, int]


@dataclass
class LIDDistance:
    estimator: str
    k: int
    gmean_baseline: float
    gmean: float
    fisher_rao: float
    log_ratio: float
    wasserstein_log_lid: float | None


@dataclass
class PairDistances:
    job_id: str
    baseline_id: str
    lid: list[LIDDistance]


@dataclass
class SpecDifference:
    """A dotted spec field whose value differs between the jobs, with each job's value
    (in the order of the jobs; None where a job's spec lacks it)."""

    field: str
    values: list[Any]


@dataclass
class JobMetrics:
    """A job's metric values: each series' latest point, and for a finished job its
    summary's numbers. ``final`` is False while the job may still add points; the
    values are then the latest as of ``as_of_epoch`` / ``as_of_step``."""

    final: bool
    as_of_epoch: int | None
    as_of_step: int | None
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class Comparison:
    jobs: list[Job]
    lid_gmeans: dict[str, dict[LIDKey, float]]
    distances: list[PairDistances]
    spec_diff: list[SpecDifference] = field(default_factory=list)
    metrics: dict[str, JobMetrics] = field(default_factory=dict)
    # Diagnose jobs: their LID histograms and summaries (histogram.json), else None.
    diagnoses: dict[str, dict[str, Any] | None] = field(default_factory=dict)


def parse_job_ids(raw: str) -> list[str]:
    """``"A,B,C"`` → ``["A", "B", "C"]``: 2 to ``MAX_COMPARE_JOBS`` distinct ids."""
    ids = [part.strip() for part in raw.split(",") if part.strip()]
    if len(ids) < 2:
        raise InvalidInput("name at least two jobs: ?jobs=A,B", field="jobs")
    if len(ids) > MAX_COMPARE_JOBS:
        raise InvalidInput(f"compare at most {MAX_COMPARE_JOBS} jobs at once", field="jobs")
    if len(set(ids)) != len(ids):
        raise InvalidInput("each job may appear only once", field="jobs")
    return ids


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None


def lid_gmeans(summary: dict[str, Any] | None) -> dict[LIDKey, float]:
    """Geometric-mean LIDs of a job's summary as ``{(estimator, k): value}``."""
    out: dict[LIDKey, float] = {}
    if not summary:
        return out
    nested = summary.get("lid_gmean")
    if isinstance(nested, dict):
        for estimator, by_k in nested.items():
            if not isinstance(by_k, dict):
                continue
            for k, value in by_k.items():
                if str(k).isdigit() and (v := _positive(value)) is not None:
                    out[(str(estimator), int(k))] = v
    for name, value in summary.items():
        match = _PRETRAIN_LID_KEY.match(str(name))
        if match and (v := _positive(value)) is not None:
            out.setdefault(("mle", int(match.group(1))), v)
    return out


def _per_point_lids(
    session: Session, settings: Settings, team: Team, job: Job
) -> dict[LIDKey, Any] | None:
    """A diagnose job's per-point LIDs from ``lids.npz`` (never unpickled), or None."""
    if job.kind != "diagnose":
        return None
    try:
        _, path = get_artifact(
            session=session, settings=settings, team=team, job_id=job.id, name=LIDS_ARTIFACT
        )
    except NotFound:
        return None
    import numpy as np

    out: dict[LIDKey, Any] = {}
    try:
        with np.load(path, allow_pickle=False) as arrays:
            for name in arrays.files:
                estimator, sep, k = name.rpartition("_k")
                if sep and k.isdigit():
                    out[(estimator, int(k))] = arrays[name]
    except (OSError, ValueError):
        return None
    return out


def compare_jobs(
    *, session: Session, settings: Settings, team: Team, job_ids: list[str]
) -> Comparison:
    """The team's jobs side by side, each against the first (404 for a job that is
    not the team's). Each id may be a unique prefix (``service.job_ids``)."""
    jobs: list[Job] = []
    for job_id in job_ids:
        job = require_job(session=session, team=team, job_id=job_id, field="jobs")
        if any(job.id == seen.id for seen in jobs):
            raise InvalidInput(f"{job_id} names job {job.id} a second time", field="jobs")
        jobs.append(job)
    gmeans = {job.id: lid_gmeans(job.summary) for job in jobs}
    baseline = jobs[0]
    base_points = _per_point_lids(session, settings, team, baseline)
    distances = []
    for job in jobs[1:]:
        points = _per_point_lids(session, settings, team, job) if base_points else None
        rows = []
        for key in sorted(gmeans[baseline.id].keys() & gmeans[job.id].keys()):
            a, b = gmeans[baseline.id][key], gmeans[job.id][key]
            w1 = None
            if base_points and points and key in base_points and key in points:
                from ldreg.diagnose import log_lid_wasserstein  # numpy only

                w1 = log_lid_wasserstein(base_points[key], points[key])
            rows.append(
                LIDDistance(
                    estimator=key[0],
                    k=key[1],
                    gmean_baseline=a,
                    gmean=b,
                    # Fisher-Rao distance between LIDs: |ln a - ln b| (Huang et al. 2024).
                    fisher_rao=abs(math.log(b) - math.log(a)),
                    log_ratio=math.log(b / a),
                    wasserstein_log_lid=w1,
                )
            )
        distances.append(PairDistances(job_id=job.id, baseline_id=baseline.id, lid=rows))
    return Comparison(
        jobs=jobs,
        lid_gmeans=gmeans,
        distances=distances,
        spec_diff=spec_diff([job.spec or {} for job in jobs]),
        metrics=job_metrics(session, jobs),
        diagnoses={
            job.id: _diagnosis_curves(session, settings, team, job)
            for job in jobs
            if job.kind == "diagnose"
        },
    )


def spec_diff(specs: list[dict[str, Any]]) -> list[SpecDifference]:
    """The dotted fields whose values differ between ``specs``, in field order.

    Sections that are mappings in every spec are compared field by field; anywhere
    else the values are compared whole (a list, or ``ldreg: null`` against a section,
    is one difference at that field, its values as they are)."""
    out: list[SpecDifference] = []

    def walk(values: list[Any], path: str) -> None:
        if all(isinstance(v, dict) for v in values):
            keys = list(dict.fromkeys(k for v in values for k in v))
            for key in keys:
                walk([v.get(key) for v in values], f"{path}.{key}" if path else str(key))
            return
        first = values[0]
        if any(_differs(first, v) for v in values[1:]):
            out.append(SpecDifference(field=path, values=values))

    walk(list(specs), "")
    return out


def _differs(a: Any, b: Any) -> bool:
    # JSON values: ``True == 1`` and ``1 == 1.0`` in Python, not in a spec.
    return type(a) is not type(b) or a != b


def job_metrics(session: Session, jobs: list[Job]) -> dict[str, JobMetrics]:
    """Each job's latest value of every series (one query for all the jobs), and for a
    finished job its summary's numbers on top (a run's final evaluation)."""
    ids = [job.id for job in jobs]
    ranked = (
        select(
            Metric.job_id,
            Metric.name,
            Metric.epoch,
            Metric.step,
            Metric.value,
            func.row_number()
            .over(partition_by=(Metric.job_id, Metric.name), order_by=Metric.step.desc())
            .label("newest"),
        )
        .where(Metric.job_id.in_(ids))
        .subquery()
    )
    rows = session.execute(
        select(ranked.c.job_id, ranked.c.name, ranked.c.epoch, ranked.c.step, ranked.c.value)
        .where(ranked.c.newest == 1)
        .order_by(ranked.c.job_id, ranked.c.name)
    )
    out = {
        job.id: JobMetrics(
            final=job.state in {s.value for s in FINISHED_STATES}, as_of_epoch=None, as_of_step=None
        )
        for job in jobs
    }
    for job_id, name, epoch, step, value in rows:
        metrics = out[job_id]
        metrics.values[name] = value
        metrics.as_of_epoch = max(epoch, metrics.as_of_epoch or 0)
        metrics.as_of_step = max(step, metrics.as_of_step or 0)
    for job in jobs:
        if out[job.id].final:
            for name, value in (job.summary or {}).items():
                number = isinstance(value, int | float) and not isinstance(value, bool)
                if number and math.isfinite(value):
                    out[job.id].values[name] = float(value)
    return out


def _diagnosis_curves(
    session: Session, settings: Settings, team: Team, job: Job
) -> dict[str, Any] | None:
    """A diagnose job's LID histograms and per-(estimator, k) summaries from its
    ``histogram.json``, or None (still running, failed, or an oversized file)."""
    try:
        _, path = get_artifact(
            session=session, settings=settings, team=team, job_id=job.id, name=HISTOGRAM_ARTIFACT
        )
    except NotFound:
        return None
    try:
        if path.stat().st_size > MAX_HISTOGRAM_BYTES:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {
        "bins": data.get("bins"),
        "histograms": data.get("histograms"),
        "summaries": data.get("summaries"),
    }
