"""The benchmark scripts that only a lent GPU runs in earnest, run here on the CPU path
at tiny sizes, so the day a GPU is lent the script works first time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = pytest.mark.slow


def test_gpu_check_runs_its_speed_checks_on_the_cpu_path(tmp_path):
    out = tmp_path / "results.json"
    script = str(BENCHMARKS / "gpu_check.py")
    done = subprocess.run(
        [
            sys.executable,
            script,
            "--device",
            "cpu",
            "--smoke",
            "--only",
            "speed",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    # CUDA-only checks say so instead of passing silently.
    assert results["speed_knn_gpu_vs_cpu"] == {"ok": True, "skipped": "needs CUDA"}
    for name in ("speed_ceiling_r18-32", "speed_ceiling_r50-224"):
        result = results[name]
        assert result["ok"], result
        assert result["ceiling_img_s"] > 0 and result["real_img_s"] > 0
        assert result["real_over_ceiling"] == pytest.approx(
            result["real_img_s"] / result["ceiling_img_s"], rel=0.01
        )
    augment = results["speed_augment_on_device"]
    assert augment["ok"] and augment["max_abs_diff_vs_cpu"] == 0.0  # the same device here
    assert augment["device_images_per_s"] > 0
    diagnosis = results["speed_exact_diagnosis_1m"]
    assert diagnosis["ok"] and diagnosis["n"] == 20_000
    assert diagnosis["lid_gmean"]["mle"]["64"] > 1.0
