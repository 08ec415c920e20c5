"""A small typed Python client of the LDReg service's HTTP API (v1).

The ``ldreg`` command line is built on it; teams use it to script sweeps:

    from client import LDRegClient

    with LDRegClient(url="http://ldreg:8000", api_key="...") as api:
        ids = [api.submit("pretrain", {"method": "simclr", "ldreg": ldreg}).id
               for ldreg in (None, {"alpha": 0.01})]
        finished = [api.wait(i) for i in ids]
        print(api.compare(ids).spec_diff)

It imports httpx and pydantic only (never torch).
"""

from client.api import DEFAULT_URL, LDRegClient
from client.errors import ApiError, ClientError, JobTimeout, MissingApiKey, ServiceUnreachable
from client.models import (
    ACTIVE_STATES,
    FINISHED_STATES,
    Artifact,
    ComparedJob,
    Comparison,
    Event,
    Job,
    JobError,
    JobMetrics,
    MetricPoint,
    Progress,
    SpecDifference,
    Upload,
)
from client.spec import apply_overrides

__all__ = [
    "ACTIVE_STATES",
    "DEFAULT_URL",
    "FINISHED_STATES",
    "ApiError",
    "Artifact",
    "ClientError",
    "ComparedJob",
    "Comparison",
    "Event",
    "Job",
    "JobError",
    "JobMetrics",
    "JobTimeout",
    "LDRegClient",
    "MetricPoint",
    "MissingApiKey",
    "Progress",
    "ServiceUnreachable",
    "SpecDifference",
    "Upload",
    "apply_overrides",
]
