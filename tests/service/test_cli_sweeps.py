"""``ldreg sweep`` and ``ldreg report`` as a user types them, against the real API
(uvicorn, PostgreSQL, Redis). The children are finished by the worker's own data-layer
calls with chosen results (tests/service/test_sweeps_service.py's ``play_children``),
so the verdicts are known; the same with real training: test_sweeps_service.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from test_cli_client import LDREG, ldreg
from test_sweeps_service import VERDICT_SWEEP, chosen_outcome, play_children

from client import LDRegClient

pytestmark = pytest.mark.service


@pytest.fixture
def sweep_file(tmp_path: Path) -> Path:
    path = tmp_path / "alpha.yaml"
    path.write_text(yaml.safe_dump(VERDICT_SWEEP, sort_keys=False))
    return path


def test_sweep_submits_and_report_prints_the_verdicts(
    api_server: str, team_key: str, pg_url: str, sweep_file: Path
) -> None:
    out = ldreg("sweep", str(sweep_file), url=api_server, key=team_key)
    assert out.returncode == 0, out.stderr
    sweep_id = out.stdout.strip()
    assert len(sweep_id) == 32
    assert f"submitted sweep {sweep_id} (queued): 8 children, 4 arms × 2 seeds" in out.stderr

    listed = ldreg("jobs", "--parent", sweep_id[:8], "--json", url=api_server, key=team_key)
    assert listed.returncode == 0, listed.stderr
    kids = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(kids) == 8 and {k["parent_id"] for k in kids} == {sweep_id}
    table = ldreg("jobs", url=api_server, key=team_key).stdout
    assert "0/8 children" in next(line for line in table.splitlines() if sweep_id in line)

    # Before any child ran: the report so far, nothing paired.
    early = ldreg("report", sweep_id[:8], url=api_server, key=team_key)
    assert early.returncode == 0, early.stderr
    assert "incomplete" in early.stdout and "8 queued" in early.stdout

    play_children(pg_url, sweep_id, chosen_outcome)
    out = ldreg("report", sweep_id[:8], url=api_server, key=team_key)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"sweep {sweep_id}  succeeded  complete" in text
    rows = {
        (line.split("│")[1].strip(), line.split("│")[2].strip()): line
        for line in text.splitlines()
        if line.count("│") > 8
    }
    improves = rows[("ldreg.alpha=0.1", "knn_acc (higher)")]
    assert "improves" in improves and "+0.05" in improves and "yes" in improves
    assert "no effect detectable at 2 seeds" in rows[("control", "knn_acc (higher)")]
    assert "not enough paired seeds" in rows[("ldreg.alpha=1", "knn_acc (higher)")]
    assert "noise floor knn_acc: ±" in text
    # The failed child is listed with its error, not hidden.
    failed = next(line for line in text.splitlines() if "loss_not_finite" in line)
    assert "ldreg.alpha=1" in failed and "failed" in failed

    as_json = ldreg("report", sweep_id, "--json", url=api_server, key=team_key)
    with LDRegClient(api_server, team_key) as api:
        assert json.loads(as_json.stdout) == api.report(sweep_id)
        status = ldreg("status", sweep_id, url=api_server, key=team_key)
        assert (
            "8/8 children finished" in status.stdout
            and f"ldreg report {sweep_id[:8]}" in status.stderr
        )

    # A pretrain job has no report: one line, exit 1.
    child = ldreg("report", kids[0]["id"], url=api_server, key=team_key)
    assert child.returncode == 1 and "HTTP 409 not_a_sweep" in child.stderr
    assert len(child.stderr.splitlines()) == 1


def test_sweep_wait_follows_the_children_and_prints_the_report(
    api_server: str, pg_url: str, sweep_file: Path
) -> None:
    from test_cli_client import new_team_key

    _, key = new_team_key(pg_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDREG_")}
    env.update(LDREG_URL=api_server, LDREG_API_KEY=key)
    waiting = subprocess.Popen(
        [LDREG, "sweep", str(sweep_file), "--wait", "--interval", "0.2"],
        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert waiting.stdout is not None
        sweep_id = waiting.stdout.readline().strip()
        assert len(sweep_id) == 32, waiting.stderr.read()  # type: ignore[union-attr]
        play_children(pg_url, sweep_id, chosen_outcome)
        rest, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    assert "8 queued" in err and "succeeded  7 succeeded, 1 failed" in err
    assert "complete" in rest and "improves" in rest and "loss_not_finite" in rest
