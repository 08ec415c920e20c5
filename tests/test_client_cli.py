"""The HTTP client and the ``ldreg`` client commands without a server.

What is checked here needs no service: failures that must be ONE clear stderr line
with a non-zero exit, how the client reads the API's error shape, spec files, and
that neither the client nor its commands load torch. The same commands against a
real API, database and worker: tests/service/test_cli_client.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from client import ApiError, Job, JobTimeout, LDRegClient, MissingApiKey, ServiceUnreachable

LDREG = str(Path(sys.executable).with_name("ldreg"))


def ldreg(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LDREG_")}
    full_env.update(env or {})
    return subprocess.run([LDREG, *args], env=full_env, capture_output=True, text=True, timeout=60)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_api_key_is_one_clear_line_and_exit_2() -> None:
    out = ldreg("jobs")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "no API key" in lines[0] and "LDREG_API_KEY" in lines[0] and "--api-key" in lines[0]
    assert "Traceback" not in out.stderr


def test_unreachable_server_is_one_line_naming_the_url_and_exit_3() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    out = ldreg("status", "abc", "--url", url, env={"LDREG_API_KEY": "k"})
    assert out.returncode == 3
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and lines[0].startswith("ldreg: error:")


def test_url_and_key_are_read_from_the_environment() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    out = ldreg("jobs", env={"LDREG_API_KEY": "k", "LDREG_URL": url})
    assert out.returncode == 3 and url in out.stderr


def test_missing_spec_file_is_exit_2_before_any_request(tmp_path: Path) -> None:
    out = ldreg("submit", str(tmp_path / "nope.yaml"), env={"LDREG_API_KEY": "k"})
    assert out.returncode == 2
    assert out.stderr.strip() == f"ldreg: error: spec file not found: {tmp_path / 'nope.yaml'}"


def test_spec_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("- just\n- a list\n")
    out = ldreg("submit", str(spec), env={"LDREG_API_KEY": "k"})
    assert out.returncode == 2 and "must hold a mapping" in out.stderr


def test_compare_needs_two_jobs() -> None:
    out = ldreg("compare", "only-one", env={"LDREG_API_KEY": "k"})
    assert out.returncode == 2 and "at least two" in out.stderr


def test_every_client_command_is_registered() -> None:
    out = ldreg("--help")
    assert out.returncode == 0
    for command in (
        "submit", "jobs", "status", "watch", "metrics", "cancel", "retry", "download",
        "diagnose", "compare",
    ):  # fmt: skip
        assert command in out.stdout


def test_neither_the_client_nor_its_commands_import_torch() -> None:
    code = "import sys, client, cli.remote, cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def response(status: int, body: object) -> httpx.Response:
    return httpx.Response(status, json=body, request=httpx.Request("GET", "http://x/v1/jobs"))


def test_api_error_reads_the_service_error_shape_with_field_and_details() -> None:
    body = {
        "error": {
            "code": "invalid_input",
            "message": "spec.ldreg.k: must be smaller than batch_size",
            "field": "spec.ldreg.k",
            "details": [{"field": "spec.ldreg.k", "message": "must be smaller"}],
        }
    }
    err = ApiError.from_response(response(422, body))
    assert (err.status, err.code, err.field) == (422, "invalid_input", "spec.ldreg.k")
    assert err.message == "spec.ldreg.k: must be smaller than batch_size"
    assert err.details == body["error"]["details"]
    assert str(err) == "422 invalid_input: spec.ldreg.k: must be smaller than batch_size" + (
        " (field spec.ldreg.k)"
    )


def test_api_error_reads_fastapi_default_shapes_too() -> None:
    err = ApiError.from_response(response(404, {"detail": "Not Found"}))
    assert (err.status, err.code, err.message, err.field) == (404, "not_found", "Not Found", None)
    detail = [{"loc": ["body", "spec", "epochs"], "msg": "must be >= 1", "type": "x"}]
    err = ApiError.from_response(response(422, {"detail": detail}))
    assert (err.code, err.field, err.message) == ("invalid_input", "spec.epochs", "must be >= 1")


def test_api_error_of_a_non_json_body_keeps_its_first_line() -> None:
    r = httpx.Response(502, text="Bad gateway\n<html>", request=httpx.Request("GET", "http://x"))
    err = ApiError.from_response(r)
    assert (err.status, err.code, err.message) == (502, "bad_gateway", "Bad gateway")


def test_client_without_a_key_refuses_before_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LDREG_API_KEY", raising=False)
    with LDRegClient(url=f"http://127.0.0.1:{closed_port()}") as api, pytest.raises(MissingApiKey):
        api.job("abc")


def test_client_reports_an_unreachable_server() -> None:
    with LDRegClient(f"http://127.0.0.1:{closed_port()}", "k") as api:
        with pytest.raises(ServiceUnreachable, match="cannot reach the LDReg API"):
            api.job("abc")
        with pytest.raises(ServiceUnreachable):
            api.healthz()


def test_wait_rides_out_an_unreachable_server_until_its_timeout() -> None:
    api = LDRegClient(f"http://127.0.0.1:{closed_port()}", "k")
    with api, pytest.raises(JobTimeout, match=r"job abc still unknown after 0\.3s"):
        api.wait("abc", poll=0.05, timeout=0.3)


def test_job_model_keeps_unknown_fields_and_reads_the_ldreg_switch() -> None:
    job = Job.model_validate(
        {
            "id": "j1",
            "kind": "pretrain",
            "state": "running",
            "progress": {"epoch": 3, "epochs": 6},
            "spec": {"method": "byol", "ldreg": None},
            "new_field": 1,
        }
    )
    assert (job.method, job.ldreg_on, job.finished, job.progress.done) == (
        "byol",
        False,
        False,
        0.5,
    )
    assert json.loads(job.model_dump_json())["new_field"] == 1
    on = Job.model_validate({"id": "j2", "kind": "pretrain", "state": "failed", "spec": {}})
    assert on.ldreg_on is True and on.finished
