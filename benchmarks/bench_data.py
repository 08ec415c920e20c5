"""Data-path speed: one augmented view of a batch, now against the implementation of
commit 5f3d2a6 (the baseline), in the same process, on the same images.

The baseline is ``ldreg/data/augment.py`` as it was at ``--baseline`` (read with
``git show`` into a temporary module), so the ratio is measured back to back: the
implementations take turns, view 1 then view 2 of a recipe, each repetition with fresh
generator seeds, and the reported time is the median over repetitions of the mean of
the two views (BYOL's two views differ: blur p = 1.0 / 0.1, solarize p = 0 / 0.2).
Input: uint8 ``(B, 3, S, S)`` synthetic images (:func:`ldreg.data.generate_synthetic`),
as the loader's workers get them; output: the normalised float32 view. One thread
(``torch.set_num_threads(1)``): the figure is per core, as a DataLoader worker runs.
Time is the thread's CPU time (``time.thread_time``: user + system, so page faults
count), which other jobs on a shared machine inflate far less than wall-clock time;
wall-clock medians are reported alongside (and are the measure on a GPU).

kornia (``kornia.augmentation``, ``same_on_batch=False``) is timed as another row when
it is installed: the same recipe from its operations (it draws from torch's global RNG,
not from a generator it is given).

    .venv/bin/python benchmarks/bench_data.py                      # SimCLR + BYOL, 64 x 224 px
    .venv/bin/python benchmarks/bench_data.py --reps 3 --size 96   # quicker
    .venv/bin/python benchmarks/bench_data.py --device cuda        # on a GPU (batch path)
    .venv/bin/python benchmarks/bench_data.py --json out.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ldreg.data import BatchViewAugment, generate_synthetic, view_augmentations
from ldreg.data.augment import ViewAugmentation

ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

View = Callable[[Tensor, int], Tensor]  # (uint8 images, seed) → normalised view


def load_baseline(revision: str) -> ModuleType:
    """``ldreg/data/augment.py`` at ``revision``, imported as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:ldreg/data/augment.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_augment.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_augment", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_augment"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def ldreg_views(module: ModuleType, kind: str, size: int) -> list[View]:
    views = module.view_augmentations(kind, size)
    augments = [module.BatchViewAugment(view, MEAN, STD) for view in views]
    return [
        lambda images, seed, a=a: a(images, torch.Generator().manual_seed(seed)) for a in augments
    ]


def kornia_views(kind: str, size: int, device: torch.device) -> list[View] | None:
    try:
        import kornia.augmentation as K
    except ImportError:
        return None

    def build(view: ViewAugmentation) -> torch.nn.Module:
        ops: list[torch.nn.Module] = [
            K.RandomResizedCrop((size, size), scale=view.crop_scale),
            K.RandomHorizontalFlip(p=view.flip_p),
        ]
        if view.jitter is not None:
            ops.append(K.ColorJitter(*view.jitter, p=view.jitter_p))
        if view.gray_p:
            ops.append(K.RandomGrayscale(p=view.gray_p))
        if view.blur_p:
            ops.append(K.RandomGaussianBlur(view.blur_kernel, view.blur_sigma, p=view.blur_p))
        if view.solarize_p:
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=view.solarize_p))
        ops.append(K.Normalize(mean=torch.tensor(MEAN), std=torch.tensor(STD)))
        return torch.nn.Sequential(*ops).to(device)

    def run(module: torch.nn.Module, images: Tensor, seed: int) -> Tensor:
        torch.manual_seed(seed)
        return module(images.float() / 255.0)

    return [
        lambda images, seed, m=build(view): run(m, images, seed)
        for view in view_augmentations(kind, size)
    ]


def time_view(fn: View, images: Tensor, seed: int, device: torch.device) -> tuple[float, float]:
    """(CPU seconds of this thread, wall-clock seconds) of one view."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cpu, wall = time.thread_time(), time.perf_counter()
    fn(images, seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.thread_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["simclr", "byol"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--baseline", default="5f3d2a6", help="git revision of the baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-kornia", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(1)
    device = torch.device(args.device)
    baseline = load_baseline(args.baseline)
    images, _ = generate_synthetic(args.batch, 10, args.size, seed=0)
    images = images.to(device)
    load_before = os.getloadavg()
    results = []
    for kind in args.recipes:
        rows: dict[str, list[View]] = {
            f"baseline ({args.baseline})": ldreg_views(baseline, kind, args.size),
            "now": [
                lambda images, seed, a=a: a(images, torch.Generator().manual_seed(seed))
                for a in (
                    BatchViewAugment(v, MEAN, STD) for v in view_augmentations(kind, args.size)
                )
            ],
        }
        kornia = None if args.no_kornia else kornia_views(kind, args.size, device)
        if kornia is not None:
            rows[f"kornia {importlib.metadata.version('kornia')}"] = kornia
        for views in rows.values():  # warm-up (first-call allocations, kernel caches)
            for fn in views:
                fn(images, 0)
        cpu: dict[str, list[float]] = {name: [] for name in rows}
        wall: dict[str, list[float]] = {name: [] for name in rows}
        for rep in range(args.reps):
            for name, views in rows.items():
                per_view = [
                    time_view(fn, images, 1000 * rep + i, device) for i, fn in enumerate(views)
                ]
                cpu[name].append(sum(c for c, _ in per_view) / len(per_view))
                wall[name].append(sum(w for _, w in per_view) / len(per_view))
        # On a GPU the host's CPU time is not the cost: rank by wall-clock time there.
        primary = cpu if device.type == "cpu" else wall
        base = statistics.median(primary[f"baseline ({args.baseline})"])
        base_wall = statistics.median(wall[f"baseline ({args.baseline})"])
        for name in rows:
            seconds = statistics.median(primary[name])
            results.append(
                {
                    "recipe": kind,
                    "implementation": name,
                    "seconds_per_view": seconds,
                    "image_views_per_s": args.batch / seconds,
                    "speedup": base / seconds,
                    "range": [min(primary[name]), max(primary[name])],
                    "wall_seconds_per_view": statistics.median(wall[name]),
                    "wall_speedup": base_wall / statistics.median(wall[name]),
                }
            )
    load_after = os.getloadavg()

    print(
        f"\n{args.batch} images x {args.size} px, device {device}, 1 thread, {args.reps} reps; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}; "
        f"1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n"
    )
    measure = "CPU s" if device.type == "cpu" else "s"
    print(
        f"| recipe | implementation | {measure} per {args.batch}-image view (range) |"
        f" image-views/s{' per core' if device.type == 'cpu' else ''} | vs baseline |"
        " wall s (vs baseline) |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        low, high = r["range"]
        print(
            f"| {r['recipe']} | {r['implementation']} | {r['seconds_per_view']:.3f}"
            f" ({low:.3f}–{high:.3f}) | {r['image_views_per_s']:.0f} | {r['speedup']:.2f}x"
            f" | {r['wall_seconds_per_view']:.3f} ({r['wall_speedup']:.2f}x) |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "batch": args.batch,
                    "size": args.size,
                    "device": str(device),
                    "reps": args.reps,
                    "load_average": [load_before[0], load_after[0]],
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
