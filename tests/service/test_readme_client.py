"""The README's Python client example, run verbatim against a real API and worker: it
must finish with a useful result on this machine in minutes."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import ServiceProcess

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_client_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (example,) = [b for b in blocks if "LDRegClient()" in b and "api.submit" in b]
    return example


def test_the_readme_client_example_trains_and_prints_its_result(
    api_server: str,
    team_key: str,
    service_env: dict[str, str],
    start_worker: Callable[..., ServiceProcess],
) -> None:
    start_worker()
    env = {**service_env, "LDREG_URL": api_server, "LDREG_API_KEY": team_key}
    done = subprocess.run(
        [sys.executable, "-c", readme_client_example()],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.fullmatch(r"kNN accuracy (\d\.\d\d), LID (\d+\.\d)\n", done.stdout)
    assert found, done.stdout
    assert float(found.group(1)) > 0.3  # 10 digit classes: well above chance
    assert float(found.group(2)) > 1.0
