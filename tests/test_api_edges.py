"""The API's edges, in process (TestClient on a migrated SQLite database): hostile and
careless input gets a clear 4xx, never a 5xx. The same inputs against PostgreSQL and
real processes are in tests/service/test_hostile_input.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.deps import parse_bearer
from service.auth import create_team
from service.db import migrate, session_scope
from service.settings import Settings


@pytest.fixture
def app_and_key(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    settings = Settings(home=tmp_path, max_active_jobs_per_team=1)
    migrate(settings.database_url)
    with session_scope(settings.database_url) as s:
        _, key = create_team(session=s, name="edges")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, key


@pytest.fixture
def api(app_and_key: tuple[TestClient, str]) -> TestClient:
    client, key = app_and_key
    client.headers["Authorization"] = f"Bearer {key}"
    return client


SMALL = {"method": "simclr", "width": 4, "batch_size": 16, "epochs": 1, "ldreg": {"k": 4}}


def test_one_bearer_parser_follows_rfc_6750() -> None:
    assert parse_bearer("Bearer ldr_abc-_.~+/=") == "ldr_abc-_.~+/="
    assert parse_bearer("bearer  ldr_x") == "ldr_x"  # case-insensitive, 1*SP
    for bad in (None, "", "Bearer", "Bearer ", "Basic ldr_x", "Bearer a b", "Bearerldr_x"):
        assert parse_bearer(bad) is None, bad


def test_every_route_reads_the_bearer_header_the_same_way(
    app_and_key: tuple[TestClient, str],
) -> None:
    client, key = app_and_key
    for header in (f"Bearer {key}", f"Bearer  {key}", f"bearer {key}"):
        auth = {"Authorization": header}
        assert client.get("/v1/jobs", headers=auth).status_code == 200, header
        # The poll route is served apart from the routers; same answer: no such job.
        assert client.get("/v1/jobs/abcdef12", headers=auth).status_code == 404, header
    for header in (f"Basic {key}", key, "Bearer"):
        auth = {"Authorization": header}
        assert client.get("/v1/jobs", headers=auth).status_code == 401
        assert client.get("/v1/jobs/abcdef12", headers=auth).status_code == 401


def test_nul_in_a_path_id_is_404_and_in_a_query_is_422_naming_it(api: TestClient) -> None:
    for method, path in (
        ("GET", "/v1/jobs/ab%00c"),
        ("GET", "/v1/jobs/ab%00c/events"),
        ("GET", "/v1/jobs/ab%00c/metrics"),
        ("GET", "/v1/jobs/ab%00c/artifacts"),
        ("GET", "/v1/jobs/abc/artifacts/a%00b"),
        ("POST", "/v1/jobs/ab%00c/cancel"),
        ("POST", "/v1/jobs/ab%00c/retry"),
    ):
        r = api.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert "NUL" in r.json()["error"]["message"]
    for path, field in (
        ("/v1/jobs?cursor=a%00b", "cursor"),
        ("/v1/jobs/abc/metrics?name=loss%00", "name"),
        ("/v1/compare?jobs=a%00b,c", "jobs"),
    ):
        r = api.get(path)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["field"] == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "pretrain", "name": "a\x00b", "spec": SMALL}, "name"),
        ({"kind": "pretrain", "name": "   ", "spec": SMALL}, "name"),
        ({"kind": "diagnose", "spec": {"source": {"upload_id": "u\x00"}}}, "spec.source"),
        ({"kind": "diagnose", "spec": {"source": {"job_id": "j\x00"}}}, "spec.source"),
        ({"kind": "pretrain", "spec": {**SMALL, "seed": 2**64}}, "spec.seed"),
        ({"kind": "pretrain", "spec": {**SMALL, "eval": {"every_epochs": 10**12}}}, "spec.eval"),
        ({"kind": "pretrain", "spec": {**SMALL, "eval": {"max_samples": 10**12}}}, "spec.eval"),
        (
            {"kind": "pretrain", "spec": {**SMALL, "optimizer": {"warmup_epochs": 10**12}}},
            "spec.optimizer.warmup_epochs",
        ),
        (
            {"kind": "pretrain", "spec": {**SMALL, "method_options": {"proj_hidden_dim": 10**12}}},
            "spec.method_options.proj_hidden_dim",
        ),
    ],
)
def test_unstorable_or_unbounded_spec_values_are_422_naming_the_field(
    api: TestClient, body: dict, field: str
) -> None:
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"].startswith(field), r.json()


@pytest.mark.parametrize(
    "path",
    ["method_options.temperature", "optimizer.grad_clip", "method_options.lambda_offdiag"],
)
@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
def test_non_finite_numbers_are_refused_in_every_float_field(
    api: TestClient, path: str, literal: str
) -> None:
    outer, inner = path.split(".")
    spec = f'{{"method": "barlow_twins", "{outer}": {{"{inner}": {literal}}}}}'
    body = f'{{"kind": "pretrain", "spec": {spec}}}'
    r = api.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == f"spec.{path}"
    assert "finite" in r.json()["error"]["message"]


@pytest.mark.parametrize("since", ["2147483648", "100000000000000000000", "-1", "-1e20"])
def test_integers_past_the_database_range_are_422(api: TestClient, since: str) -> None:
    r = api.get(f"/v1/jobs/abc/metrics?since={since}")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "since"


def test_a_job_too_large_for_the_queue_is_refused_at_submit_with_estimate_and_limit(
    api: TestClient,
) -> None:
    huge = {**SMALL, "dataset": {"name": "synthetic", "num_samples": 1_000_000, "image_size": 512}}
    r = api.post("/v1/jobs", json={"kind": "pretrain", "spec": huge})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "job_too_large"
    assert error["field"] == "spec.dataset.num_samples"
    assert "GiB" in error["message"] and "16 GiB" in error["message"]
    # The same job at a sane size is accepted.
    ok = {**SMALL, "dataset": {"name": "synthetic", "num_samples": 256, "image_size": 8}}
    assert api.post("/v1/jobs", json={"kind": "pretrain", "spec": ok}).status_code == 201


def test_malformed_json_is_the_documented_422_not_a_400(api: TestClient) -> None:
    for body in (b"{bad json", b"\xff\xfe", b"", b'{"kind": "\xc3("}', b"@\xc3,\xc3\x04N"):
        r = api.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["code"] == "invalid_input"
    responses = api.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["responses"]
    assert "422" in responses and "400" not in responses


def test_429_says_when_to_retry(api: TestClient) -> None:
    ok = {**SMALL, "dataset": {"name": "synthetic", "num_samples": 256, "image_size": 8}}
    assert api.post("/v1/jobs", json={"kind": "pretrain", "spec": ok}).status_code == 201
    r = api.post("/v1/jobs", json={"kind": "pretrain", "spec": ok})
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) > 0


def test_options_and_405_name_every_method_the_path_serves(api: TestClient) -> None:
    r = api.options("/v1/jobs")
    assert r.status_code == 204 and r.headers["Allow"] == "GET, POST, OPTIONS"
    assert api.options("/v1/jobs/abc/cancel").headers["Allow"] == "POST, OPTIONS"
    r = api.delete("/v1/jobs")
    assert r.status_code == 405 and r.headers["Allow"] == "GET, POST, OPTIONS"
    assert api.options("/v1/nothing-here").status_code == 404


def test_a_dataset_path_that_is_missing_or_misshapen_is_refused_at_submit(
    api: TestClient, tmp_path: Path
) -> None:
    data = tmp_path / "data"  # the fixture's data root (LDREG_HOME/data)
    data.mkdir(exist_ok=True)

    def submit(dataset: dict) -> dict:
        r = api.post("/v1/jobs", json={"kind": "pretrain", "spec": {**SMALL, "dataset": dataset}})
        return {"status": r.status_code, **(r.json().get("error") or {})}

    missing = submit({"name": "npz", "path": "nope.npz"})
    assert missing["status"] == 422 and missing["field"] == "spec.dataset.path"
    assert missing["code"] == "dataset_not_found" and "'nope.npz'" in missing["message"]

    (data / "cifar").mkdir()
    (data / "cifar" / "data_batch_1").write_bytes(b"")
    partial = submit({"name": "cifar10", "path": "cifar"})
    assert partial["status"] == 422 and "missing: data_batch_2" in partial["message"]

    (data / "flat").mkdir()
    (data / "flat" / "a.png").write_bytes(b"")
    flat = submit({"name": "image_folder", "path": "flat"})
    assert flat["status"] == 422 and "class sub-folders" in flat["message"]

    np.savez(data / "ok.npz", images=np.zeros((32, 8, 8), np.uint8))
    assert submit({"name": "npz", "path": "ok.npz"})["status"] == 201
