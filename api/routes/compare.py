"""/v1/compare: pretrain and/or diagnose jobs side by side, with LID distances.

No torch here: the distances come from stored summaries and per-point LIDs (numpy), see
``service.compare``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from api.deps import CurrentTeam, SessionDep, SettingsDep
from api.schemas import JOB_ROUTE_ERRORS, JobOut, json_response
from service import compare

router = APIRouter(
    prefix="/compare",
    tags=["compare"],
    responses=JOB_ROUTE_ERRORS,
)

DEFINITIONS = {
    "fisher_rao": "|ln a - ln b| between the geometric-mean LIDs of the baseline (a) and"
    " the job (b): the Fisher-Rao distance between LIDs (Huang et al., LDReg, ICLR 2024)",
    "log_ratio": "ln(b / a): positive when the job's local dimensionality is higher",
    "wasserstein_log_lid": "1-D Wasserstein-1 distance between the two distributions of"
    " ln LID (per-point LIDs of diagnose jobs; null otherwise); >= fisher_rao, larger"
    " when the shapes differ",
}


class JobMetricsOut(BaseModel):
    final: bool = Field(
        description="true once the job has finished: no more values will come; false"
        " while it runs, the values being the latest as of as_of_epoch / as_of_step"
    )
    as_of_epoch: int | None
    as_of_step: int | None
    values: dict[str, float] = Field(
        description="each series' latest value; for a finished job, its summary's"
        " numbers on top (the final evaluation)"
    )


class DiagnosisOut(BaseModel):
    bins: str | None = None
    histograms: Any = Field(
        default=None,
        description="per estimator and k: the histogram of per-point LIDs (histogram.json)",
    )
    summaries: Any = Field(
        default=None, description="per estimator and k: gmean, mean, percentiles, ..."
    )


class CompareJob(JobOut):
    lid_gmean: dict[str, dict[str, float]] = Field(
        description="geometric-mean LIDs by estimator and k (a pretrain job's"
        " lid_gmean_k{k} is MLE)"
    )
    metrics: JobMetricsOut
    diagnosis: DiagnosisOut | None = Field(
        default=None,
        description="a diagnose job's LID histograms and summaries; null for a pretrain"
        " job, or a diagnosis that has not finished",
    )


class SpecDifferenceOut(BaseModel):
    field: str = Field(description="dotted spec field, e.g. ldreg.alpha")
    values: list[Any] = Field(description="each job's value, in the order of jobs")


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
    spec_diff: list[SpecDifferenceOut] = Field(
        description="only the spec fields that differ between the jobs"
    )
    distances: list[PairDistancesOut] = Field(description="each later job against the first")
    definitions: dict[str, str]


@router.get("", response_model=CompareOut)
def compare_jobs(
    session: SessionDep,
    settings: SettingsDep,
    team: CurrentTeam,
    jobs: Annotated[
        str,
        Query(
            description="comma-separated job ids (or unique prefixes of at least 6"
            " characters); the first is the baseline"
        ),
    ],
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
        diagnosis = result.diagnoses.get(job.id)
        out_jobs.append(
            CompareJob(
                **JobOut.from_job(job).model_dump(),
                lid_gmean=nested,
                metrics=JobMetricsOut(**vars(result.metrics[job.id])),
                diagnosis=DiagnosisOut(**diagnosis) if diagnosis is not None else None,
            )
        )
    out = CompareOut(
        baseline_id=result.jobs[0].id,
        jobs=out_jobs,
        spec_diff=[SpecDifferenceOut(field=d.field, values=d.values) for d in result.spec_diff],
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
