"""Diagnose jobs end to end: HTTP upload → API → Redis → real Celery worker → PostgreSQL,
then the per-point LIDs downloaded and ``GET /v1/compare`` over the stored results."""

from __future__ import annotations

import io
import math

import httpx
import numpy as np
import pytest
import torch
from conftest import wait_for

from ldreg.lid import lid_mle, lid_mom

pytestmark = pytest.mark.service


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def collapsed_mixture(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """400 points of a 10-d Gaussian (class 0) and 200 on a 1-d segment (class 1)."""
    rng = np.random.default_rng(seed)
    line = np.zeros((200, 10))
    line[:, 0] = 25.0 + rng.uniform(0, 3, size=200)
    x = np.concatenate([rng.normal(size=(400, 10)), line]).astype(np.float32)
    return x, np.repeat([0, 1], [400, 200])


def upload(client: httpx.Client, content: bytes, filename: str) -> str:
    r = client.post("/v1/uploads", files={"file": (filename, content)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def submit_diagnose(client: httpx.Client, source: dict, **spec) -> str:
    body = {"kind": "diagnose", "name": "diag", "spec": {"source": source, **spec}}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def succeeded(job: dict) -> bool:
    if job["state"] in ("failed", "cancelled"):
        raise AssertionError(f"job ended {job['state']}: {job['error']}")
    return job["state"] == "succeeded"


def test_uploaded_embeddings_are_diagnosed_and_compared(client: httpx.Client, start_worker):
    x, labels = collapsed_mixture(seed=0)
    y = np.random.default_rng(1).normal(size=(500, 10)).astype(np.float32)
    first = upload(client, npz_bytes(embeddings=x, labels=labels), "mixture.npz")
    second = upload(client, npy_bytes(y), "gaussian.npy")
    worker = start_worker()
    spec = {"k": [8, 32], "estimators": ["mle", "mom"]}
    job_a = submit_diagnose(client, {"upload_id": first}, **spec)
    job_b = submit_diagnose(client, {"upload_id": second}, **spec)

    done_a = wait_for(client, job_a, succeeded, worker=worker, timeout=120)
    assert done_a["progress"]["fraction"] == 1.0  # diagnoses report points done
    summary = done_a["summary"]
    # docs/api.md's shape: estimator → k (as a string) → geometric-mean LID.
    assert set(summary["lid_gmean"]) == {"mle", "mom"}
    assert set(summary["lid_gmean"]["mle"]) == {"8", "32"}
    assert 1.0 < summary["effective_rank"] <= 10.0
    assert summary["pca_dim_90"] <= summary["pca_dim_99"] <= 10
    assert summary["reference"] == {"mode": "full", "size": 600}
    # The segment (a third of the points) raises the local-collapse alarm.
    assert summary["collapse_fraction"]["mle"]["32"] == pytest.approx(1 / 3, abs=0.05)
    assert summary["per_class"]["1"]["collapse_fraction"]["mle"]["32"] > 0.95
    assert summary["per_class"]["0"]["count"] == 400

    names = {a["name"] for a in client.get(f"/v1/jobs/{job_a}/artifacts").json()["artifacts"]}
    assert {"lids.npz", "histogram.json"} <= names
    r = client.get(f"/v1/jobs/{job_a}/artifacts/lids.npz")
    assert r.status_code == 200
    with np.load(io.BytesIO(r.content), allow_pickle=False) as lids:
        np.testing.assert_array_equal(lids["labels"], labels)
        for k in (8, 32):
            np.testing.assert_allclose(
                lids[f"mle_k{k}"], lid_mle(torch.from_numpy(x), k=k).numpy(), rtol=1e-5
            )
            np.testing.assert_allclose(
                lids[f"mom_k{k}"], lid_mom(torch.from_numpy(x), k=k).numpy(), rtol=1e-5
            )
    hist = client.get(f"/v1/jobs/{job_a}/artifacts/histogram.json").json()
    assert sum(hist["histograms"]["mle"]["32"]["counts"]) == 600

    done_b = wait_for(client, job_b, succeeded, worker=worker, timeout=60)
    r = client.get("/v1/compare", params={"jobs": f"{job_a},{job_b}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [j["id"] for j in body["jobs"]] == [job_a, job_b]
    (pair,) = body["distances"]
    assert pair["baseline_id"] == job_a and pair["job_id"] == job_b
    rows = {(row["estimator"], row["k"]): row for row in pair["lid"]}
    assert set(rows) == {("mle", 8), ("mle", 32), ("mom", 8), ("mom", 32)}
    for (est, k), row in rows.items():
        a = done_a["summary"]["lid_gmean"][est][str(k)]
        b = done_b["summary"]["lid_gmean"][est][str(k)]
        assert row["fisher_rao"] == pytest.approx(abs(math.log(a) - math.log(b)))
        assert row["log_ratio"] == pytest.approx(math.log(b / a))
        # A Gaussian against a mixture with a collapsed tail: W1 exceeds the shift.
        assert row["wasserstein_log_lid"] > row["fisher_rao"]

    assert client.get("/v1/compare", params={"jobs": job_a}).status_code == 422
    r = client.get("/v1/compare", params={"jobs": f"{job_a},{'0' * 32}"})
    assert r.status_code == 404


def test_a_pretrain_jobs_backbone_is_diagnosed_over_a_dataset(client: httpx.Client, start_worker):
    worker = start_worker()
    # A pretrain job that trains in seconds on one CPU core.
    spec = {
        "method": "simclr",
        "backbone": "resnet18",
        "width": 8,
        "dataset": {"name": "digits", "image_size": 8},
        "epochs": 1,
        "batch_size": 64,
        "optimizer": {"name": "sgd", "lr": 0.05},
        "ldreg": {"alpha": 0.01, "k": 16, "warmup_epochs": 0},
        "eval": {"lid_k": [8, 32], "knn_k": [5], "max_samples": 300},
    }
    r = client.post("/v1/jobs", json={"kind": "pretrain", "spec": spec})
    assert r.status_code == 201, r.text
    pretrain = r.json()["id"]
    wait_for(client, pretrain, succeeded, worker=worker, timeout=120)
    dataset = {"name": "digits", "image_size": 8}
    job = submit_diagnose(
        client, {"job_id": pretrain, "dataset": dataset}, k=[8, 32], estimators=["mle"]
    )
    done = wait_for(client, job, succeeded, worker=worker, timeout=120)
    summary = done["summary"]
    # digits' held-out split (20 % of 1797 images), labelled: per-class breakdown.
    assert 340 <= summary["num_points"] <= 380
    assert set(summary["per_class"]) == {str(c) for c in range(10)}
    assert sum(c["count"] for c in summary["per_class"].values()) == summary["num_points"]
    assert summary["lid_gmean"]["mle"]["8"] > 1.0

    # A pretrain job's lid_gmean_k{k} (MLE) is compared with the diagnosis at the same k.
    body = client.get("/v1/compare", params={"jobs": f"{pretrain},{job}"}).json()
    rows = {(r["estimator"], r["k"]): r for r in body["distances"][0]["lid"]}
    assert set(rows) == {("mle", 8), ("mle", 32)}
    assert rows[("mle", 8)]["wasserstein_log_lid"] is None  # no per-point LIDs
