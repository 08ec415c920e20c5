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

from client import (
    ApiError,
    Job,
    JobTimeout,
    LDRegClient,
    MetricPoint,
    MissingApiKey,
    ServiceUnreachable,
)

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
        "submit", "jobs", "status", "watch", "logs", "metrics", "cancel", "retry",
        "artifacts", "download", "diagnose", "compare",
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


def test_the_client_asks_for_its_key_in_python_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LDREG_API_KEY", raising=False)
    api = LDRegClient(url=f"http://127.0.0.1:{closed_port()}")
    with api, pytest.raises(MissingApiKey) as missing:
        next(api.jobs(limit=1))
    message = str(missing.value)
    assert "api_key=" in message and "LDREG_API_KEY" in message
    assert "--" not in message and "ldreg " not in message


def test_submit_takes_a_spec_file_or_from_and_checks_set_before_any_request(
    tmp_path: Path,
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("method: simclr\n")
    env = {"LDREG_API_KEY": "k", "LDREG_URL": f"http://127.0.0.1:{closed_port()}"}
    both = ldreg("submit", str(spec), "--from", "abcdef", env=env)
    assert both.returncode == 2 and "pick one: a spec file or --from JOB" in both.stderr
    neither = ldreg("submit", env=env)
    assert neither.returncode == 2 and "--from JOB" in neither.stderr
    for bad in ("ldreg.alpha", "=1", "ldreg..alpha=1", "x=[1,"):
        out = ldreg("submit", str(spec), "--set", bad, env=env)
        assert out.returncode == 2, (bad, out.stderr)
        assert len(out.stderr.splitlines()) == 1 and "--set" in out.stderr


def test_apply_overrides_sets_dotted_fields_on_a_copy() -> None:
    from client import apply_overrides

    spec = {"epochs": 2, "ldreg": {"alpha": 0.01, "k": 8}, "eval": {"lid_k": [32]}}
    out = apply_overrides(
        spec, [("ldreg.alpha", 0.05), ("epochs", 3), ("eval.lid_k", [16, 32]), ("x.y", True)]
    )
    assert out == {
        "epochs": 3,
        "ldreg": {"alpha": 0.05, "k": 8},
        "eval": {"lid_k": [16, 32]},
        "x": {"y": True},
    }
    assert spec["ldreg"] == {"alpha": 0.01, "k": 8}  # the original is untouched
    assert apply_overrides(spec, {"ldreg": None})["ldreg"] is None
    # A null section on the way becomes one holding the field (defaults for the rest).
    assert apply_overrides({"ldreg": None}, {"ldreg.alpha": 0.1}) == {"ldreg": {"alpha": 0.1}}
    with pytest.raises(ValueError, match="empty part"):
        apply_overrides(spec, {"ldreg.": 1})


def test_set_values_are_yaml_scalars_and_1e_5_is_a_number() -> None:
    from cli.remote import _parse_override

    assert _parse_override("ldreg.alpha=0.05") == ("ldreg.alpha", 0.05)
    assert _parse_override("ldreg.alpha=1e-5") == ("ldreg.alpha", 1e-5)
    assert _parse_override("ldreg=null") == ("ldreg", None)
    assert _parse_override("eval.lid_k=[16, 32]") == ("eval.lid_k", [16, 32])
    assert _parse_override("amp=true") == ("amp", True)
    assert _parse_override("dataset.path=a=b.npz") == ("dataset.path", "a=b.npz")


def test_cancel_says_how_long_the_trainer_takes_to_stop() -> None:
    from cli.remote import STOP_POLL_STEPS, _cancel_note
    from ldreg.train import STOP_POLL_STEPS as TRAINER_POLL

    assert STOP_POLL_STEPS == TRAINER_POLL
    running = Job.model_validate(
        {
            "id": "a" * 32,
            "kind": "pretrain",
            "state": "cancelling",
            "progress": {"epoch": 1, "epochs": 4, "images_per_second": 400.0},
            "spec": {"batch_size": 256},
        }
    )
    note = _cancel_note(running)
    assert "next heartbeat" in note and "at the end of its current training step" in note
    assert f"~{TRAINER_POLL * 256 / 400:.1f}s" in note and "ldreg watch aaaaaaaa" in note
    queued = Job.model_validate({"id": "b" * 32, "kind": "pretrain", "state": "cancelled"})
    assert "cancelled at once" in _cancel_note(queued)


def test_a_progress_line_says_where_a_run_is_within_its_epoch() -> None:
    from cli.remote import _progress_line

    job = Job.model_validate(
        {
            "id": "c" * 32,
            "kind": "pretrain",
            "state": "running",
            "progress": {
                "epoch": 1,
                "epochs": 4,
                "fraction": 0.3,
                "step": 12,
                "steps": 40,
                "images_per_second": 1234.4,
                "eta_seconds": 75.0,
            },
        }
    )
    assert job.progress.epoch_step == (2, 10)
    latest = {"loss": MetricPoint(epoch=1, step=10, value=4.25)}
    line = _progress_line(job, latest, 75.0)
    assert line == "running  epoch 2/4 step 2/10  30%  1,234 img/s  ETA 1m15s  loss=4.25"
    queued = Job.model_validate({"id": "d" * 32, "kind": "pretrain", "state": "queued"})
    assert _progress_line(queued, {}, None) == "queued"


def test_client_logs_reads_a_long_log_in_pieces_from_the_same_attempt() -> None:
    text = b"".join(f"line {i}\n".encode() for i in range(10))
    seen: list[dict[str, str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        seen.append(params)
        since = int(params.get("since", 0))
        chunk = text[since : since + 30]
        chunk = chunk[: chunk.rfind(b"\n") + 1]  # whole lines, as the server cuts them
        headers = {
            "X-Log-Attempt": "2",
            "X-Log-Offset": str(since + len(chunk)),
            "X-Log-Size": str(len(text)),
            "X-Log-Complete": "true",
        }
        return httpx.Response(200, content=chunk, headers=headers)

    with LDRegClient("http://x", "ldr_k", transport=httpx.MockTransport(answer)) as api:
        assert api.logs("abc") == text.decode()
    assert seen[0] == {}  # the latest attempt first, then that one from each offset
    assert all(p["attempt"] == "2" for p in seen[1:]) and len(seen) > 2
