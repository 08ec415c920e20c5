"""The ``ldreg`` client commands and ``LDRegClient`` against a real API (uvicorn,
PostgreSQL, Redis) and, for ``diagnose``, a real worker.

Each command runs as the installed console script in a subprocess, exactly as a
user types it; the server and key come from LDREG_URL / LDREG_API_KEY.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import ServiceProcess, create_team
from sqlalchemy import select

from client import ApiError, LDRegClient
from service.db import session_scope
from service.models import Artifact, Job, Metric

LDREG = str(Path(sys.executable).with_name("ldreg"))
SPEC_YAML = """\
method: simclr
backbone: resnet18
dataset: {name: digits}
epochs: 2
batch_size: 32
ldreg: {alpha: 0.01, k: 8}
"""


def ldreg(*args: str, url: str, key: str | None, cwd: Path | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDREG_")}
    env["LDREG_URL"] = url
    if key is not None:
        env["LDREG_API_KEY"] = key
    return subprocess.run(
        [LDREG, *args], env=env, capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "simclr.yaml"
    path.write_text(SPEC_YAML)
    return path


def test_submit_prints_the_id_and_jobs_status_cancel_follow_it(
    api_server: str, team_key: str, spec_file: Path
) -> None:
    out = ldreg("submit", str(spec_file), "--name", "cli-run", url=api_server, key=team_key)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    assert len(job_id) == 32 and job_id.isalnum()
    assert f"submitted pretrain job {job_id} (queued)" in out.stderr

    listed = ldreg("jobs", url=api_server, key=team_key)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if job_id in line)
    for cell in ("cli-run", "pretrain", "simclr", "α=0.01", "queued", "0/2"):
        assert cell in row

    as_json = ldreg("jobs", "--json", "--state", "queued", url=api_server, key=team_key)
    assert [json.loads(line)["id"] for line in as_json.stdout.splitlines()] == [job_id]

    status = ldreg("status", job_id, url=api_server, key=team_key)
    assert status.returncode == 0, status.stderr
    assert job_id in status.stdout and "queued" in status.stdout and "epoch 0/2" in status.stdout

    cancelled = ldreg("cancel", job_id, url=api_server, key=team_key)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"{job_id} cancelled"

    # Cancelling again is an illegal state change: one line, exit 1.
    again = ldreg("cancel", job_id, url=api_server, key=team_key)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "HTTP 409 conflict" in again.stderr

    retried = ldreg("retry", job_id, url=api_server, key=team_key)
    assert retried.returncode == 0 and retried.stdout.strip() == f"{job_id} queued"
    ldreg("cancel", job_id, url=api_server, key=team_key)


def test_bad_spec_is_one_stderr_line_naming_the_field_and_exit_1(
    api_server: str, team_key: str, tmp_path: Path
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC_YAML.replace("k: 8", "k: 64"))  # k must be < batch_size (32)
    out = ldreg("submit", str(spec), url=api_server, key=team_key)
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("ldreg: error: ")
    assert "batch_size" in lines[0] and "HTTP 422 invalid_input" in lines[0]

    spec.write_text(SPEC_YAML.replace("simclr", "simsiam"))
    out = ldreg("submit", str(spec), url=api_server, key=team_key)
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1
    assert "[field: spec.method]" in out.stderr


def test_missing_and_wrong_keys_are_clear_messages(api_server: str, spec_file: Path) -> None:
    out = ldreg("submit", str(spec_file), url=api_server, key=None)
    assert out.returncode == 2
    assert out.stderr.startswith("ldreg: error: no API key: pass --api-key or set LDREG_API_KEY")

    out = ldreg("jobs", url=api_server, key="ldr_not-a-real-key")
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1
    assert "invalid or revoked API key (HTTP 401 unauthorized)" in out.stderr


def test_another_teams_job_is_not_found(api_server: str, service_env, spec_file: Path) -> None:
    mine, theirs = create_team(service_env), create_team(service_env)
    job_id = ldreg("submit", str(spec_file), url=api_server, key=theirs).stdout.strip()
    out = ldreg("status", job_id, url=api_server, key=mine)
    assert out.returncode == 1 and "HTTP 404 not_found" in out.stderr
    ldreg("cancel", job_id, url=api_server, key=theirs)


def test_metrics_table_and_csv_and_artifact_download(
    api_server: str, team_key: str, spec_file: Path, pg_url: str, service_home: Path, tmp_path
) -> None:
    job_id = ldreg("submit", str(spec_file), url=api_server, key=team_key).stdout.strip()
    # What a worker would write: two epochs of metrics and a checkpoint.
    payload = os.urandom(3 * 1024 * 1024 + 7)
    art_path = service_home / "artifacts" / "jobs" / job_id / "backbone.pt"
    art_path.parent.mkdir(parents=True, exist_ok=True)
    art_path.write_bytes(payload)
    with session_scope(pg_url) as s:
        for epoch in (1, 2):
            for name, value in (("loss", 5.0 / epoch), ("lid_gmean_k32", 10.0 + epoch)):
                s.add(Metric(job_id=job_id, name=name, epoch=epoch, step=epoch * 10,
                             value=value, attempt=1))  # fmt: skip
        s.add(Artifact(job_id=job_id, name="backbone.pt", path=str(art_path), size=len(payload)))

    table = ldreg("metrics", job_id, url=api_server, key=team_key)
    assert table.returncode == 0, table.stderr
    assert "lid_gmean_k32" in table.stdout and "12" in table.stdout and "2.5" in table.stdout

    out = ldreg("metrics", job_id, "--csv", url=api_server, key=team_key)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [(r["series"], r["epoch"], r["step"], float(r["value"])) for r in rows] == [
        ("lid_gmean_k32", "1", "10", 11.0),
        ("lid_gmean_k32", "2", "20", 12.0),
        ("loss", "1", "10", 5.0),
        ("loss", "2", "20", 2.5),
    ]

    dest = tmp_path / "ckpt.pt"
    out = ldreg("download", job_id, "backbone.pt", "-o", str(dest), url=api_server, key=team_key)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(dest) and dest.read_bytes() == payload
    missing = ldreg(
        "download", job_id, "nope.pt", "-o", str(tmp_path), url=api_server, key=team_key
    )
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    assert not (tmp_path / "nope.pt").exists() and not (tmp_path / "nope.pt.part").exists()
    ldreg("cancel", job_id, url=api_server, key=team_key)


def test_python_client_pages_through_jobs_and_submits_idempotently(
    api_server: str, service_env
) -> None:
    key = create_team(service_env)
    spec = {"method": "byol", "epochs": 1, "batch_size": 32, "ldreg": None}
    with LDRegClient(api_server, key) as api:
        ids = [api.submit("pretrain", spec, name=f"p{i}").id for i in range(5)]
        assert [j.id for j in api.jobs(page_size=2)] == ids[::-1]
        assert [j.id for j in api.jobs(limit=3, page_size=2)] == ids[:1:-1]
        again = api.submit("pretrain", spec, name="p-idem", idempotency_key="k-1")
        assert api.submit("pretrain", spec, name="p-idem", idempotency_key="k-1").id == again.id
        assert api.job(again.id).ldreg_on is False
        with pytest.raises(ApiError) as bad:
            api.submit("pretrain", {**spec, "epochs": 0})
        assert (bad.value.status, bad.value.code, bad.value.field) == (
            422,
            "invalid_input",
            "spec.epochs",
        )
        for job_id in [*ids, again.id]:
            assert api.cancel(job_id).state == "cancelled"
        assert [e.to_state for e in api.events(ids[0])] == ["queued", "cancelled"]


def test_diagnose_uploads_waits_and_prints_the_lid_summary(
    api_server: str,
    service_env,
    pg_url: str,
    tmp_path: Path,
    start_worker: Callable[..., ServiceProcess],
) -> None:
    key = create_team(service_env)
    rng = np.random.default_rng(0)
    # 400 points on a 5-dimensional subspace of R^32: LID near 5 at every k.
    x = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 32))
    path = tmp_path / "emb.npy"
    np.save(path, x.astype(np.float32))
    worker = start_worker()

    out = ldreg(
        "diagnose", str(path), "--k", "16", "--k", "32", "--estimator", "mle",
        "--timeout", "120", url=api_server, key=key,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr + worker.log()[-3000:]
    assert "400 points × 32 dims" in out.stdout
    assert "geometric-mean LID" in out.stdout and "k=16" in out.stdout and "k=32" in out.stdout
    mle_row = next(line for line in out.stdout.splitlines() if line.strip("│ ").startswith("mle"))
    cells = mle_row.replace("│", " ").split()[1:]  # LID k=16, collapsed, LID k=32, collapsed
    lids = [float(cells[0]), float(cells[2])]
    assert all(3.5 < v < 6.5 for v in lids), mle_row
    assert cells[1].endswith("%") and cells[3].endswith("%")
    assert "effective_rank" in out.stdout

    # The worker's log lines for this job are JSON with job_id and attempt bound.
    with session_scope(pg_url) as s:
        job = s.scalars(select(Job).where(Job.kind == "diagnose").order_by(Job.created_at.desc()))
        job_id = job.first().id
    bound = [
        rec
        for line in worker.log().splitlines()
        if line.startswith("{") and (rec := json.loads(line)).get("job_id") == job_id
    ]
    assert bound, worker.log()[-6000:]
    assert all(rec["attempt"] == 1 and rec["service"] == "worker" for rec in bound)

    # watch on a finished job draws its final bar and exits at once, 0 for success.
    watched = ldreg("watch", job_id, url=api_server, key=key)
    assert watched.returncode == 0, watched.stderr
    assert "succeeded" in watched.stdout and f"job {job_id} succeeded" in watched.stderr

    status = ldreg("status", job_id, url=api_server, key=key)
    assert "succeeded" in status.stdout and "collapsed k=16" in status.stdout
    assert uuid.UUID(hex=job_id)
