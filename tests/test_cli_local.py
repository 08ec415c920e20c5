"""``ldreg pretrain`` and ``ldreg lid``, run as the installed command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli.main import app
from ldreg.lid import geometric_mean, lid_mle, lid_mom
from ldreg.rank import effective_rank

LDREG = str(Path(sys.executable).with_name("ldreg"))


def invoke(*args: str, cwd: Path):
    """In-process run of the same Typer app, for the quick refusals."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        os.chdir(old)


def run(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [LDREG, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def write_spec(path: Path, **overrides) -> Path:
    spec = {
        "method": "simclr",
        "width": 4,
        "batch_size": 16,
        "epochs": 2,
        "dataset": {"name": "synthetic", "image_size": 8, "num_samples": 64, "num_classes": 4},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "ldreg": {"k": 5, "warmup_epochs": 1},
        "eval": {"lid_k": [4, 8], "knn_k": [3], "max_samples": 64},
        "method_options": {"proj_hidden_dim": 16, "proj_dim": 8},
    }
    spec.update(overrides)
    path.write_text(yaml.safe_dump(spec))
    return path


def test_pretrain_trains_and_prints_a_per_epoch_metric_table(tmp_path):
    spec = write_spec(tmp_path / "tiny.yaml")
    out = run("pretrain", str(spec), "--run-dir", "run", "--device", "cpu", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "per-epoch metrics" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("epoch ")]
    assert [r.split()[1] for r in rows] == ["1/2", "2/2"]
    assert "ldreg_loss 0 " in rows[0] and "knn_acc" in rows[1]
    assert "summary:" in out.stdout
    assert (tmp_path / "run" / "backbone.pt").is_file()
    assert (tmp_path / "run" / "checkpoints" / "epoch_0002.pt").is_file()


def test_pretrain_reports_each_invalid_field_with_its_reason(tmp_path):
    spec = write_spec(
        tmp_path / "bad.yaml", method="simclr2", ldreg={"k": 64, "alpha": -1.0}, epochs=0
    )
    out = run("pretrain", str(spec), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("ldreg: error: invalid spec")
    assert "  method: unknown method 'simclr2'; expected one of simclr" in out.stderr
    assert "  ldreg.alpha: Input should be greater than or equal to 0" in out.stderr
    assert "  epochs: Input should be greater than or equal to 1" in out.stderr
    assert "Traceback" not in out.stderr


def test_pretrain_refuses_devices_that_do_not_divide_the_batch(tmp_path):
    spec = write_spec(tmp_path / "s.yaml")
    out = invoke("pretrain", str(spec), "--devices", "3", cwd=tmp_path)
    assert out.exit_code == 2
    assert "batch_size (16) must be divisible by devices (3)" in out.stderr


def test_lid_reports_geometric_mean_lid_per_estimator_and_k_and_effective_rank(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    np.save(tmp_path / "emb.npy", x)
    out = invoke(
        "lid",
        "emb.npy",
        "--k",
        "10",
        "--k",
        "20",
        "--estimator",
        "mle",
        "--estimator",
        "mom",
        cwd=tmp_path,
    )
    assert out.exit_code == 0, out.stderr
    t = torch.from_numpy(x)
    rows = {
        line.split()[1]: line
        for line in out.stdout.splitlines()
        if line.split()[1:2] in (["mle"], ["mom"])
    }
    for name, fn in (("mle", lid_mle), ("mom", lid_mom)):
        expected = [f"{geometric_mean(fn(t, k=k)):.4f}" for k in (10, 20)]
        assert rows[name].split()[3:6:2] == expected
    assert f"effective rank: {float(effective_rank(t)):.4f}" in out.stdout


@pytest.mark.parametrize(
    ("array", "args", "message"),
    [
        (np.array([{"a": 1}, None], dtype=object), (), "object arrays are refused"),
        (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]), (), "1 NaN/inf values"),
        (np.zeros((10, 3)), ("--k", "10"), "--k 10 must be between 2 and 9"),
        (np.zeros(10), (), "2-D array (N, D), found shape (10,)"),
    ],
)
def test_lid_refuses_bad_input_with_a_clear_message(tmp_path, array, args, message):
    np.save(tmp_path / "bad.npy", array, allow_pickle=True)
    out = invoke("lid", "bad.npy", *args, cwd=tmp_path)
    assert out.exit_code == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_lid_names_the_format_it_needs_for_a_csv_and_reads_an_npz(tmp_path):
    (tmp_path / "emb.csv").write_text("0.1,0.2\n0.3,0.4\n")
    out = invoke("lid", "emb.csv", cwd=tmp_path)
    assert out.exit_code == 2
    assert "not a .npy or .npz file" in out.stderr and "numpy.save" in out.stderr
    assert "pickle" not in out.stderr

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "emb.npz", embeddings=rng.normal(size=(40, 5)), labels=np.arange(40))
    out = invoke("lid", "emb.npz", "--k", "5", cwd=tmp_path)
    assert out.exit_code == 0, out.stderr
    assert "effective rank" in out.stdout


def test_cli_entry_point_does_not_import_torch():
    probe = "import sys, cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"
