"""Training throughput of the real ``pretrain`` path against the device's ceiling.

The ceiling is the same model's training step (``build_train_module``: backbone,
projector, LDReg term, online probe; the same optimizer, autocast dtype and memory
layout) run in a bare loop on device-resident synthetic batches: no loader, no
augmentation, no host sync until the end. The real path is ``pretrain`` on a generated
dataset of the preset's image size, views made the way the worker makes them; its rate
comes from the sink's ``on_step`` timestamps after ``--warmup`` steps (evaluation and
checkpoints at the epoch's end are outside the timed steps). Both rates are images
(two views each) per second; the ratio real / ceiling is the headline.

    python benchmarks/bench_ceiling.py --preset r18-32 --device cuda      # ResNet-18, 32 px
    python benchmarks/bench_ceiling.py --preset r50-224 --device cuda     # ResNet-50, 224 px
    .venv/bin/python benchmarks/bench_ceiling.py --preset cpu-smoke       # seconds, on a CPU

Target (issue "GPU-first speed"): real >= 90 % of the ceiling on a GPU. Not a test;
``benchmarks/gpu_check.py`` runs both GPU presets.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_train import StepTimes  # a sibling script: benchmarks/ is on sys.path

from ldreg import registry
from ldreg.data import build_datasets
from ldreg.optim import build_optimizer, scaled_lr
from ldreg.spec import PretrainSpec
from ldreg.train import autocast_dtype, build_train_module, pretrain


@dataclass(frozen=True)
class Preset:
    backbone: str
    image_size: int
    batch: int
    width: int | None = None
    proj_hidden: int = 2048


PRESETS = {
    "r50-224": Preset("resnet50", 224, 256),
    "r18-32": Preset("resnet18", 32, 512),
    # A few seconds on a CPU: exercises both paths end to end (tests/test_benchmarks.py).
    "cpu-smoke": Preset("resnet18", 16, 32, width=8, proj_hidden=64),
}


def make_spec(preset: Preset, steps: int, args: argparse.Namespace) -> PretrainSpec:
    return PretrainSpec.model_validate(
        {
            "method": "simclr",
            "backbone": preset.backbone,
            "width": preset.width,
            "batch_size": preset.batch,
            "epochs": 1,
            "dataset": {
                "name": "synthetic",
                "image_size": preset.image_size,
                "num_samples": preset.batch * steps + preset.batch // 2,
                "num_classes": 10,
            },
            "optimizer": {"name": "lars", "lr": 0.3},
            "ldreg": {"k": min(64, preset.batch - 1), "warmup_epochs": 0},
            "eval": {"lid_k": [8], "knn_k": [5], "max_samples": 64},
            "method_options": {"proj_hidden_dim": preset.proj_hidden, "proj_dim": 128},
            "precision": args.precision,
            "compile": args.compile,
            "num_workers": args.workers,
        }
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def real_rate(spec: PretrainSpec, device: str, warmup: int) -> float:
    """Images per second of ``pretrain``'s steps after ``warmup`` steps."""
    with tempfile.TemporaryDirectory() as tmp:
        sink = StepTimes()  # marks the start, then every step
        pretrain(spec, run_dir=Path(tmp), data_root=Path(tmp), sink=sink, device=device)
    marks = sink.marks[1 + warmup :]
    return spec.batch_size * (len(marks) - 1) / (marks[-1] - marks[0])


def ceiling_rate(spec: PretrainSpec, device_name: str, steps: int, warmup: int) -> float:
    """Images per second of the same model's step on device-resident batches."""
    device = torch.device(device_name)
    bundle = build_datasets(spec.dataset, data_root=Path("."), seed=spec.seed)
    model = build_train_module(spec, image_size=bundle.image_size, num_classes=bundle.num_classes)
    cnn = registry.BACKBONES[spec.backbone].family == "resnet"
    layout = torch.channels_last if device.type == "cuda" and cnn else torch.contiguous_format
    model = model.to(device).to(memory_format=layout)
    step_model = torch.compile(model) if spec.compile else model
    optimizer = build_optimizer(
        spec.optimizer,
        ((n, p) for n, p in model.named_parameters() if not n.startswith("probe.")),
        lr=scaled_lr(spec.optimizer, global_batch=spec.batch_size),
    )
    probe_opt = model.probe.make_optimizer(0.1) if model.probe is not None else None
    amp = autocast_dtype(spec.precision, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    size, batch = bundle.image_size, spec.batch_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    views = [
        torch.randn(batch, 3, size, size, generator=gen).to(device).contiguous(memory_format=layout)
        for _ in range(3)
    ]
    labels = torch.randint(0, bundle.num_classes, (batch,), generator=gen).to(device)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = step_model(views[0], views[1], labels, True, views[2])
        loss = out.ssl_loss.float() + out.ldreg_loss.float() + out.probe_loss.float()
        optimizer.zero_grad(set_to_none=True)
        if probe_opt is not None:
            probe_opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        if probe_opt is not None:
            scaler.step(probe_opt)
        scaler.update()

    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - started)


def run(preset_name: str, device: str, steps: int, warmup: int, args: argparse.Namespace) -> dict:
    preset = PRESETS[preset_name]
    spec = make_spec(preset, steps + warmup, args)
    ceiling = ceiling_rate(spec, device, steps, warmup)
    real = real_rate(spec, device, warmup)
    return {
        "preset": preset_name,
        "device": device,
        "backbone": preset.backbone,
        "image_size": preset.image_size,
        "batch": preset.batch,
        "precision": spec.precision,
        "compile": spec.compile,
        "num_workers": spec.num_workers,
        "ceiling_img_s": round(ceiling, 1),
        "real_img_s": round(real, 1),
        "real_over_ceiling": round(real / ceiling, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-smoke")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile both paths")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = run(args.preset, args.device, args.steps, args.warmup, args)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
