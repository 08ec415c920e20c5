"""Training-step cost: LDReg's overhead, and the framework's overhead over a bare loop.

1. LDReg's added cost per training step: the same SimCLR step (ResNet-18, batch 256,
   32 px, LARS) with the LDReg term on and off, on one model, steps interleaved so
   that drifting machine load hits both alike. Target: ≤ 3 %.
2. Framework overhead: ``pretrain`` (sink calls, NaN/stop checks, lr schedule, online
   probe bookkeeping) against a hand-written PyTorch loop over the same loader doing the
   same forward/backward (backbone, projector, NT-Xent, online probe, LARS). Per-step
   times come from the sink's ``on_step`` timestamps for ``pretrain`` and from the loop
   itself for the bare version. Target: ≤ 5 %.

Ratios are medians of per-step times. Not a test; run by hand::

    .venv/bin/python benchmarks/bench_train.py                  # the targets' settings
    .venv/bin/python benchmarks/bench_train.py --width 16 --steps 6   # quicker
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ldreg.backbones import build_backbone
from ldreg.data import build_datasets, make_ssl_loader
from ldreg.evaluation import OnlineLinearProbe
from ldreg.methods.base import mlp
from ldreg.methods.simclr import nt_xent_loss
from ldreg.optim import build_optimizer, cosine_lr, scaled_lr, set_lr
from ldreg.spec import PretrainSpec
from ldreg.train import build_train_module, pretrain


def simclr_spec(args: argparse.Namespace, *, ldreg: bool, steps: int) -> PretrainSpec:
    return PretrainSpec.model_validate(
        {
            "method": "simclr",
            "backbone": "resnet18",
            "width": args.width,
            "batch_size": args.batch,
            "epochs": 1,
            "dataset": {
                "name": "synthetic",
                "image_size": args.image_size,
                "num_samples": int(args.batch * steps / 0.8) + args.batch,
                "num_classes": 10,
            },
            "optimizer": {"name": "lars", "lr": 0.3},
            "ldreg": {"k": min(64, args.batch - 1), "warmup_epochs": 0} if ldreg else None,
            "eval": {"lid_k": [8], "knn_k": [5], "max_samples": 64},
            "method_options": {"proj_hidden_dim": 2048, "proj_dim": 128},
        }
    )


def bench_ldreg_cost(args: argparse.Namespace) -> dict[str, float]:
    spec = simclr_spec(args, ldreg=True, steps=args.steps)
    model = build_train_module(spec, image_size=args.image_size, num_classes=10)
    optimizer = build_optimizer(spec.optimizer, model.named_parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.image_size, args.image_size)
    view1, view2 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    labels = torch.randint(0, 10, (args.batch,), generator=g)

    def step(ldreg_on: bool) -> float:
        start = time.perf_counter()
        out = model(view1, view2, labels, ldreg_on)
        loss = out.ssl_loss + out.ldreg_loss + out.probe_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up: allocator, LARS buffers
    off, on = [], []
    for i in range(args.steps):
        # Alternate the order so neither variant always runs second.
        if i % 2:
            on.append(step(True))
            off.append(step(False))
        else:
            off.append(step(False))
            on.append(step(True))
    base, reg = statistics.median(off), statistics.median(on)
    # The term alone on features of the step's shape: a drift-free estimate of its cost,
    # since on a shared machine step-to-step noise can exceed the term itself.
    features = torch.randn(2 * args.batch, model.method.feat_dim, requires_grad=True)
    term = []
    for _ in range(args.steps + 2):
        start = time.perf_counter()
        model.ldreg(features).backward()
        term.append(time.perf_counter() - start)
    term_s = statistics.median(term[2:])
    return {
        "baseline_s": base,
        "ldreg_s": reg,
        "ratio": reg / base,
        "term_s": term_s,
        "term_ratio": (base + term_s) / base,
    }


class StepTimes:
    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_start(self, **kw) -> None:
        self.marks.append(time.perf_counter())

    def on_step(self, **kw) -> None:
        self.marks.append(time.perf_counter())

    def on_epoch_end(self, **kw) -> None:
        pass

    def on_checkpoint(self, **kw) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def bare_loop(spec: PretrainSpec, data_root: Path) -> list[float]:
    """The same computation written directly: no sink, checks, or module wrappers."""
    bundle = build_datasets(spec.dataset, data_root=data_root, seed=spec.seed)
    torch.manual_seed(spec.seed)
    backbone, dim = build_backbone(
        "resnet18", image_size=bundle.image_size, width=spec.width, small_stem=None
    )
    projector = mlp(dim, 2048, 128)
    probe = OnlineLinearProbe(dim, bundle.num_classes)
    params = [
        (f"b.{n}", p) for n, p in [*backbone.named_parameters(), *projector.named_parameters()]
    ] + [(f"p.{n}", p) for n, p in probe.named_parameters()]
    base_lr = scaled_lr(spec.optimizer, global_batch=spec.batch_size)
    optimizer = build_optimizer(spec.optimizer, params, lr=base_lr)
    loader = make_ssl_loader(
        bundle.train,
        kind="simclr",
        image_size=bundle.image_size,
        mean=bundle.mean,
        std=bundle.std,
        batch_size=spec.batch_size,
        seed=spec.seed,
        epoch=1,
    )
    total = len(loader)
    marks = [time.perf_counter()]
    for step, (view1, view2, labels) in enumerate(loader):
        set_lr(optimizer, cosine_lr(step, total_steps=total, warmup_steps=0, base_lr=base_lr))
        b = view1.shape[0]
        features = backbone(torch.cat([view1, view2]))
        z = projector(features)
        loss = nt_xent_loss(z[:b], z[b:], temperature=0.2)
        probe_loss = torch.nn.functional.cross_entropy(probe(features[:b].detach()), labels)
        optimizer.zero_grad(set_to_none=True)
        (loss + probe_loss).backward()
        optimizer.step()
        loss.item()
        marks.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(marks)]


def bench_framework(args: argparse.Namespace) -> dict[str, float]:
    spec = simclr_spec(args, ldreg=False, steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        sink = StepTimes()
        pretrain(spec, run_dir=Path(tmp), data_root=Path(tmp), sink=sink, device="cpu")
        framework = [b - a for a, b in zip(sink.marks, sink.marks[1:], strict=False)]
        bare = bare_loop(spec, Path(tmp))
    # The first step includes the loader's start-up in both; drop it.
    fw, hand = statistics.median(framework[1:]), statistics.median(bare[1:])
    return {"bare_s": hand, "framework_s": fw, "ratio": fw / hand, "steps": len(bare)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--width", type=int, default=64, help="ResNet-18 base width (64 = standard)"
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", choices=["ldreg", "framework"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"ResNet-18 width {args.width}, batch {args.batch}, {args.image_size} px, CPU,"
        f" {args.threads} thread(s), {args.steps} timed steps per variant",
        flush=True,
    )
    if args.only in (None, "ldreg"):
        r = bench_ldreg_cost(args)
        print(
            f"LDReg cost:  without {r['baseline_s']:.3f} s/step, with {r['ldreg_s']:.3f} s/step,"
            f" ratio {r['ratio']:.4f} (target <= 1.03)"
        )
        print(
            f"LDReg term alone (forward + backward): {r['term_s']:.3f} s,"
            f" i.e. ratio {r['term_ratio']:.4f} on the step without it"
        )
    if args.only in (None, "framework"):
        r = bench_framework(args)
        print(
            f"Framework:   bare loop {r['bare_s']:.3f} s/step, pretrain {r['framework_s']:.3f}"
            f" s/step, ratio {r['ratio']:.4f} (target <= 1.05; {r['steps']} steps)"
        )


if __name__ == "__main__":
    main()
