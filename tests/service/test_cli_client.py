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


def new_team_key(pg_url: str) -> tuple[str, str]:
    """(team id, API key) of a new team, made in process."""
    from service import auth

    with session_scope(pg_url) as s:
        team, key = auth.create_team(session=s, name=f"team-{uuid.uuid4().hex[:10]}")
        return team.id, key


def test_short_prefixes_name_a_teams_jobs_and_never_anothers(api_server: str, pg_url: str) -> None:
    mine_team, mine = new_team_key(pg_url)
    theirs_team, theirs = new_team_key(pg_url)
    base = uuid.uuid4().hex[:8]
    rest = "0" * (32 - len(base) - 1)
    a, b, c = (base + "a" + rest, base + "b" + rest, base + "c" + rest)
    with session_scope(pg_url) as s:
        for job_id, team in ((a, mine_team), (b, mine_team), (c, theirs_team)):
            s.add(Job(id=job_id, team_id=team, kind="pretrain", spec={"epochs": 1},
                      state="cancelled", attempt=0))  # fmt: skip

    out = ldreg("status", a[:9], url=api_server, key=mine)
    assert out.returncode == 0, out.stderr
    assert a in out.stdout and "cancelled" in out.stdout

    # Two of mine share the prefix; their job with it is not counted.
    out = ldreg("status", base, url=api_server, key=mine)
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1
    assert f"job id prefix '{base}' matches 2 of your team's jobs" in out.stderr
    assert "HTTP 409 ambiguous_job_id" in out.stderr

    out = ldreg("metrics", base[:5], url=api_server, key=mine)
    assert out.returncode == 1 and "at least 6 characters" in out.stderr
    assert "HTTP 422 job_id_too_short" in out.stderr

    # Theirs: never mine, whether by its unique prefix or its full id.
    for ref in (c[:9], c):
        out = ldreg("status", ref, url=api_server, key=mine)
        assert out.returncode == 1 and "HTTP 404 not_found" in out.stderr
        assert c not in out.stderr or ref == c
    # For them the short prefix is unique: their one job.
    with LDRegClient(api_server, theirs) as api:
        assert api.job(base).id == c
        assert [e.to_state for e in api.events(base)] == []
    with LDRegClient(api_server, mine) as api:
        assert api.job(b[:9]).id == b
        with pytest.raises(ApiError) as ambiguous:
            api.job(base)
        assert (ambiguous.value.status, ambiguous.value.code) == (409, "ambiguous_job_id")
        assert {d["message"] for d in ambiguous.value.details} == {f"matches {a}", f"matches {b}"}


def test_artifacts_lists_and_download_writes_to_a_folder_or_stdout(
    api_server: str, team_key: str, spec_file: Path, pg_url: str, service_home: Path, tmp_path
) -> None:
    job_id = ldreg("submit", str(spec_file), url=api_server, key=team_key).stdout.strip()
    short = job_id[:8]
    # Every byte value, CR/LF and NULs included: stdout must pass them through as is.
    payload = bytes(range(256)) * 4096 + b"\r\n\x00\x1a"
    job_dir = service_home / "artifacts" / "jobs" / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "backbone.pt").write_bytes(payload)
    (job_dir / "lids.npz").write_bytes(b"small")
    with session_scope(pg_url) as s:
        for name in ("backbone.pt", "lids.npz"):
            size = (job_dir / name).stat().st_size
            s.add(Artifact(job_id=job_id, name=name, path=str(job_dir / name), size=size))

    listed = ldreg("artifacts", short, url=api_server, key=team_key)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows[0] == ["NAME", "SIZE", "CREATED"]
    assert rows[1][:3] == ["backbone.pt", "1.0", "MiB"] and rows[2][:3] == ["lids.npz", "5", "B"]
    as_json = ldreg("artifacts", short, "--json", url=api_server, key=team_key)
    assert [json.loads(line)["size"] for line in as_json.stdout.splitlines()] == [
        len(payload),
        5,
    ]

    # Without a NAME: what there is to download.
    offer = ldreg("download", short, url=api_server, key=team_key)
    assert offer.returncode == 0, offer.stderr
    assert "backbone.pt" in offer.stdout and "lids.npz" in offer.stdout
    assert "ldreg download JOB NAME" in offer.stderr

    # -o DIR/: into that folder (made when missing), under the artifact's name.
    folder = tmp_path / "new" / "dir"
    out = ldreg("download", short, "backbone.pt", "-o", f"{folder}/", url=api_server, key=team_key)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(folder / "backbone.pt")
    assert (folder / "backbone.pt").read_bytes() == payload
    out = ldreg("download", short, "lids.npz", "-o", str(folder), url=api_server, key=team_key)
    assert (folder / "lids.npz").read_bytes() == b"small"

    # -o -: the bytes on stdout, nothing else there.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDREG_")}
    env.update(LDREG_URL=api_server, LDREG_API_KEY=team_key)
    raw = subprocess.run(
        [LDREG, "download", short, "backbone.pt", "-o", "-"], env=env, capture_output=True,
        timeout=120,
    )  # fmt: skip
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == payload
    missing = subprocess.run(
        [LDREG, "download", short, "nope.pt", "-o", "-"], env=env, capture_output=True,
        timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1 and missing.stdout == b"" and b"HTTP 404" in missing.stderr
    ldreg("cancel", short, url=api_server, key=team_key)


def test_submit_from_a_job_with_set_changes_its_spec(
    api_server: str, team_key: str, spec_file: Path
) -> None:
    original = ldreg("submit", str(spec_file), url=api_server, key=team_key).stdout.strip()
    out = ldreg(
        "submit", "--from", original[:8], "--set", "ldreg.alpha=0.05", "--set", "epochs=3",
        "--set", "eval.lid_k=[8, 16]", "--name", "alpha-0.05", url=api_server, key=team_key,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    clone = out.stdout.strip()
    assert f"from {original} with ldreg.alpha=0.05, epochs=3, eval.lid_k=[8, 16]" in out.stderr
    off = ldreg("submit", "--from", original, "--set", "ldreg=null", url=api_server, key=team_key)
    assert off.returncode == 0, off.stderr
    from_file = ldreg("submit", str(spec_file), "--set", "epochs=1", url=api_server, key=team_key)
    assert from_file.returncode == 0, from_file.stderr
    with LDRegClient(api_server, team_key) as api:
        base, copy = api.job(original), api.job(clone)
        assert copy.kind == "pretrain" and copy.name == "alpha-0.05"
        assert copy.spec["ldreg"] == {**base.spec["ldreg"], "alpha": 0.05}
        assert (copy.spec["epochs"], copy.spec["eval"]["lid_k"]) == (3, [8, 16])
        changed = {"ldreg", "epochs", "eval"}
        assert {k: v for k, v in copy.spec.items() if k not in changed} == {
            k: v for k, v in base.spec.items() if k not in changed
        }
        assert api.job(off.stdout.strip()).spec["ldreg"] is None
        assert api.job(from_file.stdout.strip()).spec["epochs"] == 1
        for job_id in (original, clone, off.stdout.strip(), from_file.stdout.strip()):
            api.cancel(job_id)

    # An unknown field or a bad value: the API's 422 on exactly that field.
    for setting, field in (
        ("ldreg.alpah=0.05", "spec.ldreg.alpah"),
        ("epochs=many", "spec.epochs"),
    ):
        bad = ldreg("submit", "--from", original, "--set", setting, url=api_server, key=team_key)
        assert bad.returncode == 1 and bad.stdout == "", bad.stderr
        assert f"[field: {field}]" in bad.stderr and "HTTP 422" in bad.stderr
    both = ldreg("submit", str(spec_file), "--from", original, url=api_server, key=team_key)
    assert both.returncode == 2 and "pick one" in both.stderr


def test_compare_prints_the_spec_diff_first(
    api_server: str, team_key: str, spec_file: Path
) -> None:
    a = ldreg("submit", str(spec_file), "--name", "base", url=api_server, key=team_key)
    b = ldreg(
        "submit", str(spec_file), "--name", "strong", "--set", "ldreg.alpha=0.05",
        "--set", "epochs=3", url=api_server, key=team_key,
    )  # fmt: skip
    a_id, b_id = a.stdout.strip(), b.stdout.strip()
    out = ldreg("compare", a_id[:8], b_id[:8], url=api_server, key=team_key)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.index("spec differences") < text.index("first job = baseline")
    rows = {
        cells[0]: cells[1:]
        for line in text.splitlines()
        if len(cells := [c.strip() for c in line.strip("│┃ ").split("│")]) > 1
    }
    assert rows["ldreg.alpha"] == ["0.01", "0.05"] and rows["epochs"] == ["2", "3"]
    assert "method" not in rows or rows["method"][0] == rows["method"][1]
    assert rows["metrics"] == ["queued, no metrics yet"] * 2

    as_json = json.loads(
        ldreg("compare", a_id, b_id, "--json", url=api_server, key=team_key).stdout
    )
    assert as_json["spec_diff"] == [
        {"field": "epochs", "values": [2, 3]},
        {"field": "ldreg.alpha", "values": [0.01, 0.05]},
    ]
    assert [j["metrics"]["final"] for j in as_json["jobs"]] == [False, False]
    for job_id in (a_id, b_id):
        ldreg("cancel", job_id, url=api_server, key=team_key)


def test_watch_on_a_pipe_prints_a_plain_line_per_update(
    api_server: str, team_key: str, pg_url: str
) -> None:
    from service.execution import (
        MetricRow,
        StepProgress,
        claim_job,
        finish_job,
        heartbeat,
        record_metrics,
    )
    from service.models import JobState

    spec = {"method": "simclr", "epochs": 4, "batch_size": 32, "ldreg": {"k": 8}}
    with LDRegClient(api_server, team_key) as api:
        job_id = api.submit("pretrain", spec, name="piped").id
        waiting = api.submit("pretrain", spec, name="waiting").id
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDREG_")}
    env.update(LDREG_URL=api_server, LDREG_API_KEY=team_key)
    watch = subprocess.Popen(
        [LDREG, "watch", job_id[:8], "--interval", "0.2"], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert watch.stdout is not None
    lines: list[str] = []

    def until(text: str) -> str:
        while True:
            line = watch.stdout.readline()  # type: ignore[union-attr]
            assert line, f"watch ended before {text!r}: {lines} {watch.stderr.read()}"  # type: ignore[union-attr]
            lines.append(line)
            if text in line:
                return line

    try:
        assert "piped  queued" in until("queued")
        # What a worker writes, as a worker writes it: the claim, a heartbeat carrying
        # the step, an epoch's metrics, more steps, the end.
        with session_scope(pg_url) as s:
            assert claim_job(session=s, job_id=job_id, worker="test-worker@host") == 1
        listed = ldreg("jobs", url=api_server, key=team_key).stdout
        assert "test-worker@host" in next(line for line in listed.splitlines() if job_id in line)
        assert "in queue" in next(line for line in listed.splitlines() if waiting in line)
        with session_scope(pg_url) as s:
            heartbeat(session=s, job_id=job_id, attempt=1, progress_fraction=5 / 40,
                      step_progress=StepProgress(5, 40, images_per_second=320.0,
                                                 eta_seconds=95.0))  # fmt: skip
        line = until("step 5/10")
        assert "running  epoch 1/4 step 5/10  12%  320 img/s  ETA 1m" in line
        with session_scope(pg_url) as s:
            record_metrics(session=s, job_id=job_id, attempt=1, progress_epoch=1,
                           rows=[MetricRow("loss", 1, 10, 4.5)])  # fmt: skip
            heartbeat(session=s, job_id=job_id, attempt=1, progress_fraction=15 / 40,
                      step_progress=StepProgress(15, 40, images_per_second=330.0,
                                                 eta_seconds=60.0))  # fmt: skip
        line = until("step 5/10  38%")
        assert "epoch 2/4" in line and "330 img/s" in line and "loss=4.5" in line
        with session_scope(pg_url) as s:
            finish_job(session=s, job_id=job_id, attempt=1, state=JobState.SUCCEEDED)
        until("succeeded")
        assert watch.wait(timeout=30) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
        with LDRegClient(api_server, team_key) as api:
            api.cancel(waiting)
    rest = watch.stdout.read()
    lines += rest.splitlines(keepends=True)
    assert all("\x1b" not in line for line in lines)  # no terminal control codes
    assert f"job {job_id} succeeded" in watch.stderr.read()  # type: ignore[union-attr]
    # One line per change, not one per poll (it polled every 0.2 s throughout).
    assert len(lines) == len(set(line.split(" ", 1)[1] for line in lines)), lines


TINY_YAML = """\
method: simclr
backbone: resnet18
width: 8
dataset: {name: digits, image_size: 8}
epochs: 2
batch_size: 64
ldreg: {alpha: 0.01, k: 16, warmup_epochs: 1}
eval: {lid_k: [32], max_samples: 400, knn_k: [20]}
"""


def test_logs_follows_a_running_job_to_its_end_and_ctrl_c_stops_cleanly(
    api_server: str,
    service_env,
    tmp_path: Path,
    start_worker: Callable[..., ServiceProcess],
) -> None:
    import signal
    import time

    key = create_team(service_env)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDREG_")}
    env.update(LDREG_URL=api_server, LDREG_API_KEY=key, PYTHONUNBUFFERED="1")
    spec_file = tmp_path / "tiny.yaml"  # trains in seconds on one CPU core
    spec_file.write_text(TINY_YAML)
    job_id = ldreg("submit", str(spec_file), url=api_server, key=key).stdout.strip()

    # Ctrl-C while following a job that waits for a worker: exit 130, no traceback.
    waiting = subprocess.Popen(
        [LDREG, "logs", "-f", job_id], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    time.sleep(3)
    assert waiting.poll() is None, waiting.communicate()
    waiting.send_signal(signal.SIGINT)
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 130, err
    assert b"Traceback" not in err and out == b""

    # A worker runs the job: `logs -f` prints each line as it is written, and ends when
    # the job does.
    worker = start_worker()
    follow = subprocess.Popen(
        [LDREG, "logs", "-f", job_id],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = follow.stdout.readline()  # type: ignore[union-attr]
        assert f"job {job_id}: attempt 1 claimed by" in first, first + worker.log()[-3000:]
        with LDRegClient(api_server, key) as api:
            # It came while the job was still training, not at its end.
            assert api.job(job_id).state == "running"
        rest, err = follow.communicate(timeout=240)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 0, err
    assert f"job {job_id} succeeded" in err
    followed = first + rest
    for line in ("training epochs 1 to 2", "epoch 1/2 done: loss=", "epoch 2/2 done"):
        assert line in followed, followed
    assert followed.rstrip().endswith("attempt 1 done; recording the result")

    # The same log, read at once; its end; an attempt it never had.
    whole = ldreg("logs", job_id, url=api_server, key=key)
    assert whole.returncode == 0 and whole.stdout == followed
    last = ldreg("logs", "--tail", "1", job_id, url=api_server, key=key)
    assert last.stdout == followed.splitlines(keepends=True)[-1]
    missing = ldreg("logs", "--attempt", "2", job_id, url=api_server, key=key)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    assert len(missing.stderr.splitlines()) == 1
    # Once the job has finished, the log is one of its artifacts too.
    with LDRegClient(api_server, key) as api:
        assert "logs/attempt-1.log" in {a.name for a in api.artifacts(job_id)}
        assert api.logs(job_id) == followed
        assert list(api.logs(job_id, follow=True)) == followed.splitlines()
