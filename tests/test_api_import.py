"""The API process never imports torch (nor Celery) and starts in under a second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys, time
wall, cpu = time.perf_counter(), time.process_time()
import api.app
app = api.app.create_app()
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(json.dumps({"wall": wall, "cpu": cpu, "torch": "torch" in sys.modules,
                  "celery": "celery" in sys.modules, "paths": len(app.openapi()["paths"])}))
"""


def _probe(home: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "LDREG_HOME": str(home)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_api_app_never_imports_torch_and_starts_in_under_a_second(tmp_path: Path) -> None:
    runs = [_probe(tmp_path)]
    assert runs[0]["torch"] is False, "api/ must not import torch, even indirectly"
    assert runs[0]["celery"] is False, "Celery is imported only when a job is published"
    assert runs[0]["paths"] >= 11
    # Import + create_app, timed inside the process (interpreter start excluded) as the
    # CPU time it costs: the test machine is shared, and other processes stretch wall
    # time but not this one's own work. Best of three, since noise only adds. The wall
    # bound catches what CPU time cannot see: blocking on a socket or a lock.
    while len(runs) < 3 and min(r["cpu"] for r in runs) >= 1.0:
        runs.append(_probe(tmp_path))
    best = min(runs, key=lambda r: r["cpu"])
    assert best["cpu"] < 1.0, f"import + create_app cost {best['cpu']:.2f} s of CPU"
    assert best["wall"] < 5.0, f"import + create_app took {best['wall']:.2f} s: blocked?"
