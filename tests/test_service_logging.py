"""JSON logs: one object per line, with job_id and attempt bound to a job's lines.

Each case runs in a fresh interpreter: logging configuration is process-global.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_logging(code: str, tmp_path: Path, **env: str) -> list[str]:
    script = "import logging, threading\nfrom service.logging import *\n" + code
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env},
        check=True,
    )
    return out.stderr.splitlines()


def test_every_line_is_json_with_the_fixed_keys_and_the_bound_job(tmp_path: Path) -> None:
    lines = run_logging(
        "configure_logging('worker')\n"
        "logging.getLogger('before').info('not bound yet')\n"
        "bind_job(job_id='j1', attempt=2)\n"
        "get_logger('worker.runner').info('epoch_finished', epoch=3, loss=0.5)\n"
        "logging.getLogger('celery.task').warning('stdlib %s', 'line')\n"
        "t = threading.Thread(target=lambda: logging.getLogger('heartbeat').info('beat'))\n"
        "t.start(); t.join()\n"
        "bind_job(job_id='j2', attempt=1)\n"
        "logging.getLogger('next').info('next job')\n",
        tmp_path,
    )
    records = [json.loads(line) for line in lines]
    assert [r["event"] for r in records] == [
        "not bound yet", "epoch_finished", "stdlib line", "beat", "next job",
    ]  # fmt: skip
    for r in records:
        assert {"timestamp", "level", "service", "logger", "event"} <= set(r)
        assert r["service"] == "worker"
    assert "job_id" not in records[0]
    assert records[1] | {"timestamp": None} == {
        "timestamp": None,
        "level": "info",
        "service": "worker",
        "logger": "worker.runner",
        "event": "epoch_finished",
        "job_id": "j1",
        "attempt": 2,
        "epoch": 3,
        "loss": 0.5,
    }
    # stdlib loggers and helper threads of the job's process carry the binding too.
    assert [(r["job_id"], r["attempt"]) for r in records[2:4]] == [("j1", 2), ("j1", 2)]
    assert (records[4]["job_id"], records[4]["attempt"]) == ("j2", 1)


def test_job_context_binds_for_a_block_and_exceptions_are_one_field(tmp_path: Path) -> None:
    lines = run_logging(
        "configure_logging('api')\n"
        "with job_context(job_id='j9', attempt=4):\n"
        "    logging.getLogger('api').info('inside')\n"
        "logging.getLogger('api').info('outside')\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n"
        "    logging.getLogger('api').exception('failed')\n",
        tmp_path,
    )
    inside, outside, failed = (json.loads(line) for line in lines)
    assert (inside["job_id"], inside["attempt"], inside["service"]) == ("j9", 4, "api")
    assert "job_id" not in outside
    assert failed["level"] == "error" and "ZeroDivisionError" in failed["exception"]


def test_console_format_for_people(tmp_path: Path) -> None:
    lines = run_logging(
        "configure_logging('api'); bind_job(job_id='j1', attempt=1)\n"
        "get_logger('x').info('hello', k=1)\n",
        tmp_path,
        LDREG_LOG_FORMAT="console",
    )
    assert lines[0].endswith("info    x: hello [job_id=j1 attempt=1 k=1]")


def test_uvicorns_coloured_copy_of_a_message_is_not_repeated(tmp_path: Path) -> None:
    lines = run_logging(
        "configure_logging('api')\n"
        "import logging\n"
        "logging.getLogger('uvicorn.error').info(\n"
        "    'Started server process [%d]', 7, extra={'color_message': '\\x1b[36m7\\x1b[0m'}\n"
        ")\n",
        tmp_path,
        LDREG_LOG_FORMAT="console",
    )
    assert lines[-1].endswith("uvicorn.error: Started server process [7]"), lines


def test_configuring_keeps_handlers_added_on_purpose(tmp_path: Path) -> None:
    run_logging(
        "logging.basicConfig()\n"
        "logging.getLogger().addHandler(logging.FileHandler('job.log'))\n"
        "configure_logging('worker'); configure_logging('worker')\n"
        "root = logging.getLogger()\n"
        "assert len(root.handlers) == 2, root.handlers\n"
        "logging.getLogger('x').warning('to both')\n",
        tmp_path,
    )
    assert (tmp_path / "job.log").read_text() == "to both\n"


def test_an_access_log_turned_off_stays_off(tmp_path: Path) -> None:
    """uvicorn's ``--no-access-log`` empties "uvicorn.access" and stops its propagation
    before the app (and so configure_logging) is loaded; uvicorn then logs access lines
    only if the logger has a handler up its chain. Ours must not give it one."""
    lines = run_logging(
        "import uvicorn.config\n"
        "uvicorn.config.Config('x:app', access_log=False).configure_logging()\n"
        "configure_logging('api')\n"
        "access = logging.getLogger('uvicorn.access')\n"
        "assert not access.hasHandlers(), access.handlers\n"
        "uvicorn.config.Config('x:app', access_log=True).configure_logging()\n"
        "configure_logging('api')\n"
        "assert access.hasHandlers() and access.propagate\n"
        "access.info('GET /v1/jobs 200')\n",
        tmp_path,
    )
    records = [json.loads(line) for line in lines]
    assert [(r["logger"], r["event"]) for r in records] == [("uvicorn.access", "GET /v1/jobs 200")]
