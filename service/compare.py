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

import math
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from service.errors import InvalidInput, NotFound
from service.jobs import get_artifact, get_job
from service.models import Job, Team
from service.settings import Settings

MAX_COMPARE_JOBS = 20
LIDS_ARTIFACT = "lids.npz"
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
class Comparison:
    jobs: list[Job]
    lid_gmeans: dict[str, dict[LIDKey, float]]
    distances: list[PairDistances]


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
    not the team's)."""
    jobs = []
    for job_id in job_ids:
        job = get_job(session=session, team=team, job_id=job_id)
        if job is None:
            raise NotFound(f"no job {job_id} in your team", field="jobs")
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
    return Comparison(jobs=jobs, lid_gmeans=gmeans, distances=distances)
