"""Uploads of embeddings: streamed to disk, validated without unpickling, size-limited."""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import LDREG, ServiceProcess, free_port, wait_http_ok
from sqlalchemy import update

from service.db import session_scope
from service.models import Job, Upload


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def upload(client: httpx.Client, content: bytes, filename: str = "emb.npy") -> httpx.Response:
    return client.post("/v1/uploads", files={"file": (filename, content)})


def team_upload_dir(service_home: Path, team_id: str) -> Path:
    return service_home / "artifacts" / "uploads" / team_id


class _Tripwire:
    """Unpickling this creates a file: proof that the server never unpickles."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_valid_npy_and_npz_are_stored_with_their_shape(
    new_team, pg_url: str, service_home: Path
) -> None:
    client, team_id = new_team()
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    content = npy_bytes(x)
    r = upload(client, content, "features.npy")
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["n"], body["d"], body["dtype"], body["has_labels"]) == (50, 8, "float32", False)
    assert body["filename"] == "features.npy" and body["size"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    with session_scope(pg_url) as s:
        row = s.get(Upload, body["id"])
        assert row.team_id == team_id
        assert Path(row.path).read_bytes() == content
        assert np.array_equal(np.load(row.path), x)

    r = upload(
        client,
        npz_bytes(embeddings=x.astype(np.float64), labels=np.arange(50) % 3),
        "with_labels.npz",
    )
    assert r.status_code == 201, r.text
    assert (r.json()["n"], r.json()["d"], r.json()["dtype"], r.json()["has_labels"]) == (
        50,
        8,
        "float64",
        True,
    )
    # Only the two finished files, no temporary leftovers.
    assert len(list(team_upload_dir(service_home, team_id).iterdir())) == 2


def test_bad_embeddings_are_422_with_the_reason_and_leave_nothing(
    new_team, service_home: Path, tmp_path: Path
) -> None:
    client, team_id = new_team()
    tripwire = tmp_path / "unpickled"
    objects = np.array([_Tripwire(str(tripwire)), 1], dtype=object)
    nan = np.ones((10, 4), dtype=np.float32)
    nan[7, 2] = np.nan
    cases = [
        (npy_bytes(nan), "NaN"),
        (npy_bytes(np.full((10, 4), np.inf)), "NaN or infinite"),
        (npy_bytes(np.ones(10, dtype=np.float32)), "2-D"),
        (npy_bytes(np.ones((10, 4), dtype=np.int64)), "float16, float32 or float64"),
        (npy_bytes(np.ones((2, 4), dtype=np.float32)), "at least 3 points"),
        (npy_bytes(objects, allow_pickle=True), "pickled"),
        (npz_bytes(embeddings=objects), "pickled"),
        (pickle.dumps(_Tripwire(str(tripwire))), "not a .npy or .npz"),
        (npz_bytes(embeddings=np.ones((10, 4)), labels=np.arange(9)), "length 10"),
        (npz_bytes(embeddings=np.ones((10, 4)), labels=np.ones(10)), "integers"),
        (npz_bytes(a=np.ones((10, 4)), b=np.ones((10, 4))), "'embeddings'"),
        # Headers that do not fit their data (a 500 before: OverflowError, TokenError).
        (npy_bytes(np.ones((4, 3), np.float32)).replace(b"(4, 3)", b"(-4,3)"), "not a readable"),
        (npy_bytes(np.ones((4, 3), np.float32)).replace(b"(4, 3)", b"(99999"), "not a readable"),
    ]
    for content, reason in cases:
        r = upload(client, content)
        assert r.status_code == 422, (reason, r.text)
        assert r.json()["error"]["field"] == "file"
        assert reason in r.json()["error"]["message"], (reason, r.json())
    assert not tripwire.exists()

    r = client.post("/v1/uploads", data={"other": "x"}, files={"notfile": ("a.npy", b"123")})
    assert r.status_code == 422 and "'file'" in r.json()["error"]["message"]
    r = client.post(
        "/v1/uploads", content=b"raw", headers={"Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 422 and "multipart/form-data" in r.json()["error"]["message"]

    folder = team_upload_dir(service_home, team_id)
    assert not folder.exists() or list(folder.iterdir()) == []


def test_diagnose_needs_an_upload_of_the_team_with_enough_points(new_team) -> None:
    client, _ = new_team()
    other, _ = new_team()
    up = upload(client, npy_bytes(np.random.default_rng(1).normal(size=(40, 5)))).json()

    spec = {"source": {"upload_id": up["id"]}, "k": [8, 16]}
    r = client.post("/v1/jobs", json={"kind": "diagnose", "spec": spec})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["source"] == {"upload_id": up["id"]}

    r = other.post("/v1/jobs", json={"kind": "diagnose", "spec": spec})
    assert r.status_code == 422 and r.json()["error"]["field"] == "spec.source.upload_id"

    r = client.post("/v1/jobs", json={"kind": "diagnose", "spec": {**spec, "k": [8, 64]}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "spec.k"
    assert "has 40" in r.json()["error"]["message"]


def test_diagnose_of_a_job_needs_a_succeeded_pretrain_job_of_the_team(
    new_team, pg_url: str
) -> None:
    client, _ = new_team()
    other, _ = new_team()
    pretrain = {"method": "simclr", "epochs": 1, "batch_size": 32, "ldreg": {"k": 8}}
    job = client.post("/v1/jobs", json={"kind": "pretrain", "spec": pretrain}).json()
    spec = {"source": {"job_id": job["id"], "dataset": {"name": "digits"}}, "k": [8]}

    r = client.post("/v1/jobs", json={"kind": "diagnose", "spec": spec})
    assert r.status_code == 422 and r.json()["error"]["field"] == "spec.source.job_id"
    assert "is queued" in r.json()["error"]["message"]

    with session_scope(pg_url) as s:
        s.execute(update(Job).where(Job.id == job["id"]).values(state="succeeded"))
    assert client.post("/v1/jobs", json={"kind": "diagnose", "spec": spec}).status_code == 201
    r = other.post("/v1/jobs", json={"kind": "diagnose", "spec": spec})
    assert r.status_code == 422 and r.json()["error"]["field"] == "spec.source.job_id"


LIMIT = 64 * 1024


@pytest.fixture
def small_limit_api(service_env: dict[str, str], service_home: Path) -> Iterator[str]:
    """A second API process (the real ``ldreg api``) with a 64 KiB upload limit."""
    port = free_port()
    proc = ServiceProcess(
        [LDREG, "api", "--host", "127.0.0.1", "--port", str(port)],
        {**service_env, "LDREG_MAX_UPLOAD_BYTES": str(LIMIT)},
        service_home / f"api-small-{port}.log",
    ).start()
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_upload_over_the_limit_is_413_and_leaves_no_partial_file(
    small_limit_api: str, new_team, service_home: Path
) -> None:
    client, team_id = new_team(small_limit_api)
    big = npy_bytes(np.zeros((400, 64), dtype=np.float32))  # ~100 KiB, over 64 KiB
    assert len(big) > LIMIT

    # Announced by Content-Length: refused before the body is read.
    r = upload(client, big)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    assert "64.0 KiB" in r.json()["error"]["message"]

    # Chunked, no Content-Length: refused while streaming, once past the limit.
    boundary = "ldregtestboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.npy"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]
        yield tail

    r = client.post(
        "/v1/uploads",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413, r.text

    folder = team_upload_dir(service_home, team_id)
    assert not folder.exists() or list(folder.iterdir()) == []

    # Under the limit the same server accepts (the limit is not refusing everything).
    small = npy_bytes(np.ones((100, 16), dtype=np.float32))
    assert len(small) < LIMIT
    r = upload(client, small)
    assert r.status_code == 201, r.text
    assert [p.suffix for p in folder.iterdir()] == [".npy"]
