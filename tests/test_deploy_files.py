"""The deployment files name only things that exist.

No Docker engine runs here, so this checks what can be checked without one: every
``ldreg`` command the compose file runs parses (options included), every module it
names imports, every ``LDREG_*`` variable is a real setting and the production
settings it defines validate, and the GPU worker is wired to the GPU queue.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.queue import QUEUES
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
LDREG = str(Path(sys.executable).with_name("ldreg"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def ldreg_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("build") == "."}


def test_compose_has_the_whole_stack_with_health_checks(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    for name in ("postgres", "redis", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_every_ldreg_command_in_compose_exists(compose: dict) -> None:
    services = ldreg_services(compose)
    assert {"migrate", "api", "worker"} <= set(services)
    for name, svc in services.items():
        command = svc["command"]
        # --help after the real arguments: click parses them all first, so a missing
        # command or an unknown option fails (exit 2) instead of printing help.
        out = subprocess.run(
            [LDREG, *command, "--help"], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, (name, command, out.stdout[-2000:], out.stderr[-2000:])
        words = list(itertools.takewhile(lambda c: not c.startswith("-"), command))
        assert f"Usage: ldreg {' '.join(words)} " in out.stdout, out.stdout[:500]


def test_an_unknown_option_would_be_caught() -> None:
    # The check above is only meaningful if a wrong option fails.
    out = subprocess.run(
        [LDREG, "worker", "--no-such-option", "--help"], capture_output=True, timeout=120
    )
    assert out.returncode != 0


def test_modules_named_in_health_checks_exist(compose: dict) -> None:
    for name, svc in compose["services"].items():
        test = svc.get("healthcheck", {}).get("test", [])
        text = " ".join(test) if isinstance(test, list) else test
        for module in re.findall(r"-A\s+([\w.]+)", text):
            assert importlib.util.find_spec(module) is not None, (name, module)
        if "celery" in text:
            assert Path(sys.executable).with_name("celery").exists()


def test_every_ldreg_variable_is_a_setting_and_production_validates(compose: dict) -> None:
    fields = set(Settings.model_fields)
    for name, svc in ldreg_services(compose).items():
        env = svc["environment"]
        for var in env:
            assert var.startswith("LDREG_"), (name, var)
            assert var.removeprefix("LDREG_").lower() in fields, (name, var)
        settings = Settings(**{k.removeprefix("LDREG_").lower(): v for k, v in env.items()})
        assert settings.environment == "production"
        assert settings.database_url.startswith("postgresql+psycopg://")
        assert settings.broker_url.startswith("redis://")
        assert settings.default_queue in QUEUES


def test_worker_reserves_a_gpu_and_consumes_the_queue_jobs_go_to(compose: dict) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    command = worker["command"]
    queues = command[command.index("--queues") + 1].split(",")
    assert "gpu" in queues
    assert compose["services"]["api"]["environment"]["LDREG_DEFAULT_QUEUE"] in queues
    # Long enough for SIGTERM to hand the running job back before SIGKILL.
    assert worker["stop_grace_period"].endswith("s") and int(worker["stop_grace_period"][:-1]) >= 30


def test_dockerfile_runs_the_ldreg_command() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["ldreg"\]', text, re.M)
    assert re.search(r'^CMD \["api", "--host", "0.0.0.0"', text, re.M)
    assert "EXPOSE 8000" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "var" in ignored
