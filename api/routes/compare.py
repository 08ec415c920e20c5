"""/v1/compare: pretrain and/or diagnose jobs side by side, with LID distances.

No torch here: the distances come from stored summaries and per-point LIDs (numpy), see
``service.compare``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from api.deps import CurrentTeam, SessionDep, SettingsDep
from api.schemas import ErrorOut, JobOut, json_response
from service import compare

router = APIRouter(
    prefix="/compare",
    tags=["compare"],
    responses={
        401: {"model": ErrorOut},
        404: {"model": ErrorOut},
        422: {"model": ErrorOut},
        503: {"model": ErrorOut},
    },
)

DEFINITIONS = {
    "fisher_rao": "|ln a - ln b| between the geometric-mean LIDs of the baseline (a) and"
    " the job (b): the Fisher-Rao distance between LIDs (Huang et al., LDReg, ICLR 2024)",
    "log_ratio": "ln(b / a): positive when the job's local dimensionality is higher",
    "wasserstein_log_lid": "1-D Wasserstein-1 distance between the two distributions of"
    " ln LID (per-point LIDs of diagnose jobs; null otherwise); >= fisher_rao, larger"
    " when the shapes differ",
}


class CompareJob(JobOut):
    lid_gmean: dict[str, dict[str, float]] = Field(
        description="geometric-mean LIDs by estimator and k (a pretrain job's"
        " lid_gmean_k{k} is MLE)"
    )


class LIDDistanceOut(BaseModel):
    estimator: str
    k: int
    gmean_baseline: float
    gmean: float
    fisher_rao: float
    log_ratio: float
    wasserstein_log_lid: float | None


class PairDistancesOut(BaseModel):
    job_id: str
    baseline_id: str
    lid: list[LIDDistanceOut]


class CompareOut(BaseModel):
    baseline_id: str
    jobs: list[CompareJob]
    distances: list[PairDistancesOut] = Field(description="each later job against the first")
    definitions: dict[str, str]


@router.get("", response_model=CompareOut)
def compare_jobs(
    session: SessionDep,
    settings: SettingsDep,
    team: CurrentTeam,
    jobs: Annotated[str, Query(description="comma-separated job ids; the first is the baseline")],
) -> Response:
    """Two or more of the team's jobs side by side, each against the first."""
    result = compare.compare_jobs(
        session=session, settings=settings, team=team, job_ids=compare.parse_job_ids(jobs)
    )
    out_jobs = []
    for job in result.jobs:
        nested: dict[str, dict[str, float]] = {}
        for (estimator, k), value in sorted(result.lid_gmeans[job.id].items()):
            nested.setdefault(estimator, {})[str(k)] = value
        out_jobs.append(CompareJob(**JobOut.from_job(job).model_dump(), lid_gmean=nested))
    out = CompareOut(
        baseline_id=result.jobs[0].id,
        jobs=out_jobs,
        distances=[
            PairDistancesOut(
                job_id=pair.job_id,
                baseline_id=pair.baseline_id,
                lid=[LIDDistanceOut(**vars(row)) for row in pair.lid],
            )
            for pair in result.distances
        ],
        definitions=DEFINITIONS,
    )
    return json_response(out)
