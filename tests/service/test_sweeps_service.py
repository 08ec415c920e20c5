"""Sweeps for real: HTTP API (uvicorn) → PostgreSQL and Redis → Celery workers that
train every child on digits. The report the API gives must be the one computed
independently from the children's own summaries; cancel and retry reach every child;
a SIGKILLed worker mid-sweep costs nothing but time.

Timings come from ``service_env``: heartbeat 1 s, stale after 6 s, sweep every 1 s.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import httpx
import pytest
from conftest import finished, wait_for
from sqlalchemy import select

from service.db import session_scope
from service.execution import MetricRow, claim_job, finish_job, record_metrics
from service.models import Job, JobState
from service.sweeps import SweepSpec, report

pytestmark = pytest.mark.service

# Seconds on one CPU core per child: a tiny ResNet on 8 px digits.
BASE = {
    "method": "simclr",
    "backbone": "resnet18",
    "width": 4,
    "dataset": {"name": "digits", "image_size": 8},
    "epochs": 1,
    "batch_size": 32,
    "optimizer": {"name": "sgd", "lr": 0.05},
    "ldreg": {"k": 8},
    "eval": {"lid_k": [8], "knn_k": [5], "max_samples": 300},
}
# The baseline and one LDReg arm, two seeds (the control off, to keep it small).
SWEEP = {
    "base": BASE,
    "grid": {"ldreg.alpha": [0.1]},
    "seeds": [0, 1],
    "control": False,
    "metrics": ["knn_acc", "linear_probe_acc", "effective_rank"],
}
ARMS = ("baseline", "ldreg.alpha=0.1")


def submit_sweep(client: httpx.Client, spec: dict = SWEEP, name: str = "sweep") -> dict:
    r = client.post("/v1/jobs", json={"kind": "sweep", "name": name, "spec": spec})
    assert r.status_code == 201, r.text
    return r.json()


def children(client: httpx.Client, sweep_id: str) -> list[dict]:
    r = client.get("/v1/jobs", params={"parent": sweep_id, "limit": 200})
    assert r.status_code == 200, r.text
    return r.json()["jobs"]


def independent_report(client: httpx.Client, sweep: dict) -> dict:
    """service.sweeps.report over each child as GET /v1/jobs/{child} shows it."""
    results = []
    for listed in children(client, sweep["id"]):
        child = client.get(f"/v1/jobs/{listed['id']}").json()
        error = child["error"]
        results.append(
            {
                "arm": child["sweep_arm"],
                "seed": child["sweep_seed"],
                "state": child["state"],
                "metrics": child["summary"],
                "job_id": child["id"],
                "error": None if error is None else {k: error[k] for k in ("code", "message")},
            }
        )
    return report(SweepSpec.model_validate(sweep["spec"]), results)


def play_children(
    pg_url: str,
    sweep_id: str,
    outcome: Callable[[str, int], dict[str, float] | str],
    epochs: int = 3,
) -> None:
    """Be the worker of every child of the sweep, in process and without training: claim
    it, write a few epochs of ``loss`` and ``knn_acc``, and finish it with the summary
    ``outcome(arm, seed)`` chooses, or fail it with that error message (a string). The
    data layer's calls are the worker's own, so the sweep follows as it would."""
    with session_scope(pg_url) as s:
        kids = s.execute(
            select(Job.id, Job.sweep_arm, Job.sweep_seed)
            .where(Job.parent_id == sweep_id)
            .order_by(Job.created_at)
        ).all()
    for job_id, arm, seed in kids:
        with session_scope(pg_url) as s:
            attempt = claim_job(session=s, job_id=job_id, worker="test:1")
        assert attempt is not None
        result = outcome(arm, seed)
        final = result["knn_acc"] if isinstance(result, dict) else 0.1
        with session_scope(pg_url) as s:
            rows = [
                row
                for e in range(1, epochs + 1)
                for row in (
                    MetricRow("loss", e, 10 * e, 4.0 - (1 + final) * e / epochs + 0.1 * seed),
                    MetricRow("knn_acc", e, 10 * e, final * e / epochs),
                )
            ]
            assert record_metrics(
                session=s, job_id=job_id, attempt=attempt, rows=rows, progress_epoch=epochs
            )
        with session_scope(pg_url) as s:
            if isinstance(result, dict):
                finish_job(
                    session=s,
                    job_id=job_id,
                    attempt=attempt,
                    state=JobState.SUCCEEDED,
                    summary=result,
                )
            else:
                error = ("loss_not_finite", result)
                finish_job(
                    session=s, job_id=job_id, attempt=attempt, state=JobState.FAILED, error=error
                )


def chosen_outcome(arm: str, seed: int) -> dict[str, float] | str:
    """Results with a clear verdict: α = 0.1 lifts kNN accuracy by 5 points, the
    control by nothing (its ±0.001 is the noise floor), and α = 1 fails on seed 1."""
    if arm == "ldreg.alpha=1" and seed == 1:
        return "loss is NaN at step 12: lower ldreg.alpha"
    base = 0.5 + 0.02 * seed
    lift = {"control": 0.001 * (1 - 2 * seed), "ldreg.alpha=0.1": 0.049 + 0.002 * seed}
    knn = base + lift.get(arm, -0.1 if arm == "ldreg.alpha=1" else 0.0)
    return {"knn_acc": knn, "linear_probe_acc": knn - 0.05}


# baseline, control and two LDReg arms over two seeds: 8 children, a new team's limit.
VERDICT_SWEEP = {
    "base": {**BASE, "epochs": 3},
    "grid": {"ldreg.alpha": [0.1, 1]},
    "seeds": [0, 1],
    "metrics": ["knn_acc", "linear_probe_acc"],
}


def events(client: httpx.Client, job_id: str) -> list[tuple[str | None, str]]:
    evs = client.get(f"/v1/jobs/{job_id}/events").json()["events"]
    return [(e["from_state"], e["to_state"]) for e in evs]


def test_a_sweep_runs_its_children_on_workers_and_reports_a_verdict(
    client: httpx.Client, start_worker, new_team
) -> None:
    sweep = submit_sweep(client)
    assert sweep["kind"] == "sweep" and sweep["state"] == "queued" and sweep["children"] == 4
    kids = children(client, sweep["id"][:8])
    assert sorted((c["sweep_arm"], c["sweep_seed"]) for c in kids) == [
        (arm, seed) for arm in ARMS for seed in (0, 1)
    ]
    # Two workers take the children as they would any jobs; the sweep takes none.
    workers = [start_worker(), start_worker()]
    done = wait_for(client, sweep["id"], finished, timeout=400, worker=workers[0])
    assert done["state"] == "succeeded", done
    assert done["attempt"] == 0 and done["worker"] is None
    assert done["progress"]["epoch"] == done["progress"]["epochs"] == 4
    kids = children(client, sweep["id"])
    assert [c["state"] for c in kids] == ["succeeded"] * 4
    assert all(c["attempt"] == 1 and c["worker"] for c in kids)
    assert events(client, sweep["id"]) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]

    # The report: the API's equals one computed here from the children's summaries.
    r = client.get(f"/v1/jobs/{sweep['id'][:8]}/report")
    assert r.status_code == 200, r.text
    got = r.json()
    assert got == independent_report(client, sweep) == done["summary"]
    assert got["complete"] and got["children"]["by_state"] == {"succeeded": 4}
    ldreg_arm = next(a for a in got["arms"] if a["name"] == "ldreg.alpha=0.1")
    effect = ldreg_arm["effects"]["knn_acc"]
    assert effect["n"] == 2 and effect["seeds"] == [0, 1] and effect["verdict"]
    # Team-scoped: another team sees no such job; a pretrain job has no report.
    other, _ = new_team()
    assert other.get(f"/v1/jobs/{sweep['id']}/report").status_code == 404
    r = client.get(f"/v1/jobs/{kids[0]['id']}/report")
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_a_sweep"


def test_cancel_reaches_every_child_and_retry_runs_them_to_a_report(
    client: httpx.Client, start_worker
) -> None:
    sweep = submit_sweep(client, name="cancel me")
    r = client.post(f"/v1/jobs/{sweep['id']}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "cancelled"  # nothing had started: all at once
    assert [c["state"] for c in children(client, sweep["id"])] == ["cancelled"] * 4
    assert client.post(f"/v1/jobs/{sweep['id']}/cancel").status_code == 409
    partial = client.get(f"/v1/jobs/{sweep['id']}/report").json()
    assert partial["complete"] and partial["children"]["by_state"] == {"cancelled": 4}

    r = client.post(f"/v1/jobs/{sweep['id'][:8]}/retry")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "queued" and r.json()["summary"] is None
    assert [c["state"] for c in children(client, sweep["id"])] == ["queued"] * 4
    worker = start_worker()
    done = wait_for(client, sweep["id"], finished, timeout=400, worker=worker)
    assert done["state"] == "succeeded", done
    assert done["summary"]["complete"] and done["summary"]["children"]["by_state"] == {
        "succeeded": 4
    }
    assert done["summary"] == independent_report(client, sweep)
    assert events(client, sweep["id"]) == [
        (None, "queued"),
        ("queued", "cancelled"),
        ("cancelled", "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]


def test_a_sigkilled_worker_mid_sweep_still_ends_with_a_complete_report(
    client: httpx.Client, start_worker, pg_url: str
) -> None:
    # Three epochs: long enough that the kill lands while a child trains.
    sweep = submit_sweep(client, {**SWEEP, "base": {**BASE, "epochs": 3}}, name="kill")
    first = start_worker()
    deadline = time.monotonic() + 150
    victim = None
    while victim is None:
        with session_scope(pg_url) as s:
            victim = s.scalars(
                select(Job.id).where(
                    Job.parent_id == sweep["id"],
                    Job.state == "running",
                    Job.progress_fraction > 0,
                )
            ).first()
        assert time.monotonic() < deadline and first.alive(), first.log()[-4000:]
        time.sleep(0.1)
    first.kill(signal.SIGKILL)  # the worker's whole process group, no cleanup
    first.popen.wait(10)
    # As far as the database knows, the child still runs, and so does the sweep.
    assert client.get(f"/v1/jobs/{victim}").json()["state"] == "running"
    assert client.get(f"/v1/jobs/{sweep['id']}").json()["state"] == "running"

    second = start_worker()
    done = wait_for(client, sweep["id"], finished, timeout=400, worker=second)
    assert done["state"] == "succeeded", done
    got = client.get(f"/v1/jobs/{sweep['id']}/report").json()
    assert got["complete"] and got["children"]["by_state"] == {"succeeded": 4}
    assert got == independent_report(client, sweep)
    # The killed child resumed on the second worker, in a second attempt.
    resumed = client.get(f"/v1/jobs/{victim}").json()
    assert resumed["state"] == "succeeded" and resumed["attempt"] == 2
    reasons = [e["reason"] for e in client.get(f"/v1/jobs/{victim}/events").json()["events"]]
    assert any("heartbeat stale" in reason for reason in reasons), reasons


def test_the_team_limit_counts_every_child(new_team) -> None:
    client, _ = new_team()
    # 3 arms x 3 seeds = 9 children: over the limit of 8 whatever else runs.
    nine = {**SWEEP, "grid": {"ldreg.alpha": [0.1, 0.2]}, "seeds": [0, 1, 2]}
    r = client.post("/v1/jobs", json={"kind": "sweep", "spec": nine})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "too_many_children"
    assert r.json()["error"]["field"] == "spec.grid"
    assert "9 children" in r.json()["error"]["message"]
    # 5 queued jobs + a sweep of 4 children = 9 > 8: refused whole, nothing created.
    for i in range(5):
        r = client.post("/v1/jobs", json={"kind": "pretrain", "name": f"p{i}", "spec": BASE})
        assert r.status_code == 201, r.text
    r = client.post("/v1/jobs", json={"kind": "sweep", "spec": SWEEP})
    assert r.status_code == 429, r.text
    assert r.headers["Retry-After"]
    assert "4 children" in r.json()["error"]["message"]
    assert len(client.get("/v1/jobs").json()["jobs"]) == 5
    # With two of them cancelled, 3 + 4 = 7: the four children fit.
    for job in client.get("/v1/jobs").json()["jobs"][:2]:
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    r = client.post("/v1/jobs", json={"kind": "sweep", "spec": SWEEP})
    assert r.status_code == 201, r.text
    assert client.post(f"/v1/jobs/{r.json()['id']}/cancel").json()["state"] == "cancelled"


def test_dry_run_validates_a_sweep_and_creates_nothing(new_team) -> None:
    client, _ = new_team()
    r = client.post("/v1/jobs?dry_run=true", json={"kind": "sweep", "spec": SWEEP})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["valid"] and body["kind"] == "sweep" and body["children"] == 4
    assert body["spec"]["confidence"] == 0.95 and body["spec"]["baseline"] is True
    bad = {**SWEEP, "grid": {"ldreg.k": [8, 64]}}  # k must stay below batch_size (32)
    r = client.post("/v1/jobs?dry_run=true", json={"kind": "sweep", "spec": bad})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "spec.grid.ldreg.k.1"
    assert "batch_size" in r.json()["error"]["message"]
    r = client.post(
        "/v1/jobs?dry_run=true", json={"kind": "sweep", "spec": {**SWEEP, "seeds": [0, 0]}}
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "spec.seeds.1"
    assert client.get("/v1/jobs").json()["jobs"] == []
