"""CUDA and mixed-precision checks, and the GPU speed measurements, in one go (< 10 min).

    python benchmarks/gpu_check.py [--out results.json] [--quick] [--only NAME]
    .venv/bin/python benchmarks/gpu_check.py --device cpu --smoke   # the CPU path, tiny sizes

(with the project installed, or ``PYTHONPATH=.`` from the checkout's root.) With
``--device cpu`` the checks that need CUDA (autocast dtypes, fp16, NCCL, the GPU JPEG
decoder) are reported as skipped and the rest run on the CPU; ``--smoke`` shrinks every
size so the whole script runs in a minute (tests/test_benchmarks.py runs it so).

Each check prints PASS or FAIL with what it measured; the exit status is 1 if any
failed. What it covers, because the CPU suite cannot:

* every method trains on CUDA under ``precision: auto`` (bf16 where supported) and
  fp16 (GradScaler on), with finite losses and the fixed metric names;
* fp32 on CUDA follows the same loss curve as on the CPU (same seed, same batches);
* a run checkpointed on the GPU resumes on the CPU (and its backbone loads there);
* exact k-NN / LID on CUDA equal the CPU's, the LDReg term's gradient too, and
  ``diagnose_embeddings(device="cuda")`` matches the CPU report;
* the NCCL path of ``ldreg.launch.launch`` (one rank: all the GPUs a one-GPU machine has);
* speed ratios GPU / CPU for exact k-NN and for training steps (the numbers reported in
  benchmarks/README.md);
* training at the ceiling: ``pretrain``'s images/s against the same model's bare step on
  device-resident batches (``bench_ceiling.py``), SimCLR ResNet-18 at 32 px and
  ResNet-50 at 224 px, target >= 90 %;
* exact diagnosis of 1 000 000 x 512 (k = 64, MLE + MoM) on the GPU, target < 2 min;
* the augmentation on the device (two views of 224 px batches, images/s against one CPU
  core) and the GPU JPEG decoder against the CPU's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldreg import launch
from ldreg.checkpoint import list_checkpoints
from ldreg.data import TwoViewAugment, decode_batch
from ldreg.diagnose import diagnose_embeddings
from ldreg.lid import knn, lid_mle, lid_mom
from ldreg.regularizer import LDReg
from ldreg.spec import METHODS, PretrainSpec
from ldreg.train import autocast_dtype, load_backbone, pretrain

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ceiling  # a sibling script

# The device under test and the size scale: --device / --smoke.
DEV = "cuda"
SMOKE = False
FIXED = {"loss", "ssl_loss", "ldreg_loss", "effective_rank", "knn_acc", "lr", "epoch_seconds"}
RESULTS: dict[str, dict] = {}
# VICReg's loss (weights 25/25/1) diverges at SGD lr 0.05 on this toy set, in fp32 on the
# CPU as well (NonFiniteLossError, as designed); 0.01 trains.
LR = {"vicreg": 0.01}


def check(name: str, *, cuda_only: bool = False):
    def wrap(fn):
        def run() -> None:
            if cuda_only and DEV != "cuda":
                RESULTS[name] = {"ok": True, "skipped": "needs CUDA"}
                print(f"SKIP {name}: needs CUDA", flush=True)
                return
            started = time.perf_counter()
            try:
                detail = fn() or {}
                ok = True
            except Exception as exc:  # a check's failure is reported, the others still run
                detail = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
                ok = False
            detail["seconds"] = round(time.perf_counter() - started, 2)
            RESULTS[name] = {"ok": ok, **detail}
            shown = {k: v for k, v in detail.items() if k != "trace"}
            print(f"{'PASS' if ok else 'FAIL'} {name}: {json.dumps(shown)}", flush=True)
            if not ok:
                print(detail["trace"], flush=True)

        run.__name__ = name
        return run

    return wrap


def tiny_spec(method: str, **overrides) -> PretrainSpec:
    vit = method == "mae"
    spec = {
        "method": method,
        "backbone": "vit_tiny" if vit else "resnet18",
        "width": 8,
        "batch_size": 64,
        "epochs": 2,
        "seed": 3,
        "dataset": {"name": "synthetic", "image_size": 32, "num_samples": 512, "num_classes": 4},
        "optimizer": {"name": "sgd", "lr": LR.get(method, 0.05), "lr_scaling": "none"},
        "ldreg": {"k": 8, "warmup_epochs": 1},
        "eval": {"lid_k": [8], "knn_k": [5], "max_samples": 256},
    }
    spec.update(overrides)
    return PretrainSpec.model_validate(spec)


class Sink:
    def __init__(self) -> None:
        self.epochs: list[tuple[int, dict]] = []
        self.steps: list[dict] = []

    def on_train_start(self, **kw) -> None:
        pass

    def on_step(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.steps.append(metrics)

    def on_epoch_end(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.epochs.append((epoch, metrics))

    def on_checkpoint(self, **kw) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def train(spec: PretrainSpec, device: str, run_dir: Path) -> tuple[dict, Sink]:
    sink = Sink()
    summary = pretrain(spec, run_dir=run_dir, data_root=run_dir, sink=sink, device=device)
    return summary, sink


def assert_healthy(summary: dict, sink: Sink, epochs: int) -> None:
    assert [e for e, _ in sink.epochs] == list(range(1, epochs + 1)), sink.epochs
    missing = FIXED - set(sink.epochs[-1][1])
    assert not missing, f"metrics missing: {missing}"
    for epoch, metrics in sink.epochs:
        for name, value in metrics.items():
            assert math.isfinite(value), f"epoch {epoch}: {name} = {value}"


@check("autocast_auto_dtype", cuda_only=True)
def autocast_auto_dtype():
    dtype = autocast_dtype("auto", "cuda")
    # bf16 where the GPU has it (Ampere and later), else fp16 with a GradScaler.
    assert dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), dtype
    assert autocast_dtype("fp16", "cuda") == torch.float16
    assert autocast_dtype("auto", "cpu") is None
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "auto": str(dtype)}


def method_check(method: str, precision: str):
    @check(f"train_{method}_{precision}", cuda_only=precision == "fp16")
    def run():
        with tempfile.TemporaryDirectory() as tmp:
            spec = tiny_spec(method, precision=precision)
            summary, sink = train(spec, DEV, Path(tmp))
            assert_healthy(summary, sink, spec.epochs)
            backbone, _ = load_backbone(Path(tmp) / "backbone.pt", "cpu")
            assert next(backbone.parameters()).device.type == "cpu"
            return {
                "loss": [round(m["loss"], 4) for _, m in sink.epochs],
                "ldreg_loss": round(sink.epochs[-1][1]["ldreg_loss"], 4),
                "knn_acc": round(summary.get("knn_acc", float("nan")), 3),
            }

    return run


@check("fp32_cuda_follows_cpu")
def fp32_cuda_follows_cpu():
    spec = tiny_spec("simclr", precision="fp32", epochs=2)
    losses = {}
    for device in ("cpu", DEV):
        with tempfile.TemporaryDirectory() as tmp:
            _, sink = train(spec, device, Path(tmp))
            losses[device] = [m["loss"] for _, m in sink.epochs]
    rel = max(abs(a - b) / abs(a) for a, b in zip(losses["cpu"], losses[DEV], strict=True))
    assert rel < 0.02, losses
    return {"cpu": losses["cpu"], DEV: losses[DEV], "max_rel_diff": rel}


@check("resume_gpu_checkpoint_on_cpu")
def resume_gpu_checkpoint_on_cpu():
    spec = tiny_spec("byol", precision="fp16" if DEV == "cuda" else "fp32", epochs=2)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        _, first = train(spec, DEV, run_dir)
        last = list_checkpoints(run_dir / "checkpoints")[0]  # newest first
        last.unlink()
        last.with_name(last.name + ".sha256").unlink(missing_ok=True)
        _, second = train(spec, "cpu", run_dir)
        assert [e for e, _ in second.epochs] == [2], second.epochs
        assert math.isfinite(second.epochs[0][1]["loss"])
        return {
            "gpu_epoch2_loss": first.epochs[1][1]["loss"],
            "cpu_epoch2_loss": second.epochs[0][1]["loss"],
        }


@check("knn_lid_cuda_equals_cpu")
def knn_lid_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 64, generator=g) @ torch.randn(64, 64, generator=g)
    x[10] = x[11]  # a duplicate pair: zero distances must be handled the same way
    d_cpu, i_cpu = knn(x, 32)
    d_gpu, i_gpu = knn(x.to(DEV), 32)
    dist_err = (d_gpu.cpu() - d_cpu).abs().max().item() / d_cpu.max().item()
    same_idx = (i_gpu.cpu() == i_cpu).float().mean().item()
    assert dist_err < 1e-4 and same_idx > 0.999, (dist_err, same_idx)
    worst = {}
    for name, fn in (("mle", lid_mle), ("mom", lid_mom)):
        a, b = fn(x, 32), fn(x.to(DEV), 32).cpu()
        finite = torch.isfinite(a) & torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        worst[name] = ((a - b).abs() / a.abs().clamp_min(1e-6))[finite].max().item()
        assert worst[name] < 1e-3, worst
    return {"dist_rel_err": dist_err, "same_indices": same_idx, "lid_rel_err": worst}


@check("ldreg_gradient_cuda_equals_cpu")
def ldreg_gradient_cuda_equals_cpu():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(256, 32, generator=g)
    grads, losses = {}, {}
    for device in ("cpu", DEV):
        leaf = z.clone().to(device).requires_grad_(True)
        loss = LDReg(alpha=1.0, k=16)(leaf)
        loss.backward()
        grads[device], losses[device] = leaf.grad.cpu(), loss.item()
    rel = (grads["cpu"] - grads[DEV]).norm() / grads["cpu"].norm()
    assert abs(losses["cpu"] - losses[DEV]) < 1e-4 * max(1.0, abs(losses["cpu"])), losses
    assert rel < 1e-3, rel.item()
    return {"loss": losses, "grad_rel_err": rel.item()}


@check("diagnose_cuda_equals_cpu")
def diagnose_cuda_equals_cpu():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 48, generator=g)
    x[:500, 8:] = 0  # a locally collapsed cluster
    kw = {"k": [16, 64], "estimators": ["mle", "mom"], "labels": torch.arange(4000) % 5}
    cpu = diagnose_embeddings(x, **kw)
    gpu = diagnose_embeddings(x, device=DEV, **kw)
    worst = 0.0
    for key, want in cpu.lids.items():
        got = gpu.lids[key]
        assert (np.isfinite(want) == np.isfinite(got)).all(), key
        ok = np.isfinite(want)
        worst = max(worst, float((abs(got - want)[ok] / abs(want[ok]).clip(1e-6)).max()))
    assert worst < 1e-3, worst
    a, b = cpu.summary(), gpu.summary()
    assert a["collapse_fraction"] == b["collapse_fraction"], (a, b)
    assert math.isclose(a["effective_rank"], b["effective_rank"], rel_tol=1e-3)
    return {"worst_lid_rel_diff": worst, "collapse_fraction": b["collapse_fraction"]}


def _nccl_rank(rank: int, world_size: int) -> float:
    import torch.distributed as dist

    t = torch.full((4,), float(rank + 1), device="cuda")
    dist.all_reduce(t)
    assert dist.get_backend() == "nccl"
    return float(t.sum())


@check("nccl_launch_one_rank", cuda_only=True)
def nccl_launch_one_rank():
    total = launch.launch(_nccl_rank, 1, device_type="cuda")
    assert total == 4.0, total
    return {"all_reduce_sum": total}


@check("speed_knn_gpu_vs_cpu", cuda_only=True)
def speed_knn_gpu_vs_cpu():
    x = torch.randn(20000, 128)
    xc = x.cuda()
    knn(xc[:2000], 64)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    knn(xc, 64)
    torch.cuda.synchronize()
    gpu_s = time.perf_counter() - started
    started = time.perf_counter()
    knn(x, 64)
    cpu_s = time.perf_counter() - started
    return {
        "n": 20000,
        "dim": 128,
        "k": 64,
        "cpu_threads": torch.get_num_threads(),
        "gpu_s": gpu_s,
        "cpu_s": cpu_s,
        "speedup": cpu_s / gpu_s,
    }


@check("speed_train_gpu_vs_cpu", cuda_only=True)
def speed_train_gpu_vs_cpu():
    out = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "auto")):
        spec = tiny_spec("simclr", width=64, batch_size=256, epochs=2, precision=precision)
        with tempfile.TemporaryDirectory() as tmp:
            _, sink = train(spec, device, Path(tmp))
        # epoch 2 (no first-epoch warm-up) has the LDReg term on.
        out[f"{device}_{precision}_epoch_s"] = sink.epochs[1][1]["epoch_seconds"]
    out["speedup_fp32"] = out["cpu_fp32_epoch_s"] / out["cuda_fp32_epoch_s"]
    out["speedup_amp"] = out["cpu_fp32_epoch_s"] / out["cuda_auto_epoch_s"]
    return out


def ceiling_check(preset: str):
    @check(f"speed_ceiling_{preset}")
    def run():
        name = "cpu-smoke" if SMOKE else preset
        steps, warmup = (4, 2) if SMOKE else (30, 10)
        workers = 0 if SMOKE else min(8, os.cpu_count() or 1)
        options = argparse.Namespace(precision="auto", compile=False, workers=workers)
        result = bench_ceiling.run(name, DEV, steps, warmup, options)
        if DEV == "cuda":
            # The target; on a CPU the data path is the bottleneck by design.
            assert result["real_over_ceiling"] >= 0.9, result
        return result

    return run


@check("speed_exact_diagnosis_1m")
def speed_exact_diagnosis_1m():
    # 1 000 000 x 512 (100 clusters of 16-d Gaussians in R^512 plus noise, as
    # bench_diagnose.py), exact k-NN over all points, MLE + MoM; target < 2 min.
    n, dim = (20_000, 64) if SMOKE else (1_000_000, 512)
    g = torch.Generator(device=DEV).manual_seed(0)
    centres = torch.randn(100, dim, device=DEV, generator=g) * 4
    basis = torch.randn(100, 16, dim, device=DEV, generator=g) / 4
    label = torch.arange(n, device=DEV) % 100
    x = centres[label] + torch.einsum(
        "nl,nld->nd", torch.randn(n, 16, device=DEV, generator=g), basis[label]
    )
    x += 0.01 * torch.randn(n, dim, device=DEV, generator=g)
    if DEV == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    report = diagnose_embeddings(x, k=[64], estimators=["mle", "mom"], device=DEV)
    seconds = time.perf_counter() - started
    summary = report.summary()
    if not SMOKE:
        assert seconds < 120, seconds
    return {
        "n": n,
        "dim": dim,
        "k": 64,
        "seconds": round(seconds, 1),
        "lid_gmean": summary["lid_gmean"],
        "collapse_fraction": summary["collapse_fraction"],
    }


def _jpeg_blobs(n: int, size: int) -> list[torch.Tensor]:
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(5)
    blobs = []
    for i in range(n):
        h, w = size + 37 * (i % 3), size + 23 * (i % 4)  # mixed sizes, as in a folder
        smooth = torch.nn.functional.interpolate(
            torch.rand(1, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bilinear"
        )
        blobs.append(encode_jpeg((smooth[0] * 255).to(torch.uint8), quality=90))
    return blobs


@check("jpeg_decode_device_equals_cpu")
def jpeg_decode_device_equals_cpu():
    # nvJPEG on CUDA against libjpeg-turbo on the CPU: the same pixels up to the
    # decoders' rounding (a grey level or two).
    blobs = _jpeg_blobs(8, 64 if SMOKE else 256)
    cpu = decode_batch(blobs, "cpu")
    dev = decode_batch(blobs, DEV)
    worst = max(int((a.int() - b.cpu().int()).abs().max()) for a, b in zip(cpu, dev, strict=True))
    assert all(a.shape == b.shape for a, b in zip(cpu, dev, strict=True))
    assert worst <= 3, worst
    return {"images": len(blobs), "max_abs_diff_grey_levels": worst}


@check("speed_augment_on_device")
def speed_augment_on_device():
    # Two SimCLR views (+ clean images) of 224 px batches made on the device from a
    # uint8 batch in pinned memory, against the same on one CPU thread; the views must
    # agree to float rounding.
    size, batch, reps = (32, 16, 2) if SMOKE else (224, 256, 20)
    g = torch.Generator().manual_seed(6)
    images = torch.randint(0, 256, (batch, 3, size + 32, size + 32), generator=g, dtype=torch.uint8)
    if DEV == "cuda":
        images = images.pin_memory()
    augment = TwoViewAugment("simclr", size, (0.5,) * 3, (0.25,) * 3, with_clean=True)
    on_cpu = augment(images[:8], 123, device="cpu")
    on_dev = augment(images[:8], 123, device=DEV)
    diff = max(
        float((a - b.cpu()).abs().max()) for a, b in zip(on_cpu[:2], on_dev[:2], strict=True)
    )
    assert diff < 1e-3, diff

    def rate(device: str, n: int) -> float:
        augment(images, 0, device=device)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for seed in range(n):
            augment(images, seed, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        return batch * n / (time.perf_counter() - started)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu_rate = rate("cpu", 1 if SMOKE else 2)
    finally:
        torch.set_num_threads(threads)
    dev_rate = rate(DEV, reps)
    return {
        "image_size": size,
        "batch": batch,
        "max_abs_diff_vs_cpu": diff,
        "device_images_per_s": round(dev_rate, 1),
        "cpu_one_thread_images_per_s": round(cpu_rate, 1),
        "device_over_one_core": round(dev_rate / cpu_rate, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="skip the speed checks")
    parser.add_argument("--only", default="", help="run the checks whose name contains this")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the script's own test")
    args = parser.parse_args()
    global DEV, SMOKE
    DEV, SMOKE = args.device, args.smoke
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: these checks need a GPU (--device cpu runs the CPU path)")
    checks = [autocast_auto_dtype]
    checks += [method_check(m, "auto") for m in METHODS]
    checks += [method_check(m, "fp16") for m in ("simclr", "vicreg", "mae")]
    checks += [
        fp32_cuda_follows_cpu,
        resume_gpu_checkpoint_on_cpu,
        knn_lid_cuda_equals_cpu,
        ldreg_gradient_cuda_equals_cpu,
        diagnose_cuda_equals_cpu,
        nccl_launch_one_rank,
        jpeg_decode_device_equals_cpu,
    ]
    if not args.quick:
        checks += [speed_knn_gpu_vs_cpu, speed_train_gpu_vs_cpu]
        checks += [speed_augment_on_device, ceiling_check("r18-32"), ceiling_check("r50-224")]
        checks += [speed_exact_diagnosis_1m]
    for run in checks:
        if args.only in run.__name__:
            run()
    if args.out:
        args.out.write_text(json.dumps(RESULTS, indent=2, default=str))
    failed = [name for name, r in RESULTS.items() if not r["ok"]]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed {failed or ''}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
