"""DDP on 2 CPU processes (gloo): the same global batch gives the same first step as one
process, and ``pretrain(devices=2)`` trains with only rank 0 writing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldreg import launch
from ldreg.spec import PretrainSpec
from ldreg.train import build_train_module

IMAGE_SIZE = 8
GLOBAL_BATCH = 16


def _spec(method: str) -> PretrainSpec:
    return PretrainSpec.model_validate(
        {
            "method": method,
            "width": 4,
            "batch_size": GLOBAL_BATCH,
            "dataset": {"name": "synthetic", "image_size": IMAGE_SIZE, "num_samples": 64},
            "ldreg": {"k": 5, "warmup_epochs": 0, "alpha": 0.5},
            "method_options": {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16},
            "eval": {"lid_k": [4], "knn_k": [3], "max_samples": 64},
            "sync_bn": True,
            "devices": 2,
        }
    )


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    view1 = torch.randn(GLOBAL_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    view2 = view1 + 0.3 * torch.randn(view1.shape, generator=g)
    labels = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    return view1, view2, labels


def first_step(rank: int, world_size: int, methods: list[str]) -> dict[str, dict]:
    """Loss (mean over ranks) and parameter gradients after one backward on the shard."""
    results = {}
    view1, view2, labels = _global_batch()
    shard = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    for method in methods:
        spec = _spec(method)
        model = build_train_module(spec, image_size=IMAGE_SIZE, num_classes=4)
        if world_size > 1:
            model = launch.convert_sync_batchnorm(model, "cpu")
        wrapped = launch.wrap_model(model, torch.device("cpu"))
        out = wrapped(view1[shard], view2[shard], labels[shard], True)
        (out.ssl_loss + out.ldreg_loss + out.probe_loss).backward()
        losses = torch.stack([out.ssl_loss.detach(), out.ldreg_loss.detach()])
        if world_size > 1:
            torch.distributed.all_reduce(losses)
            losses /= world_size
        grads = {
            n: p.grad.clone() for n, p in model.method.named_parameters() if p.grad is not None
        }
        results[method] = {"losses": losses, "grads": grads}
    return results


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_two_processes_match_one_process_on_the_same_global_batch():
    """SimCLR negatives, Barlow Twins / VICReg statistics, MoCo keys, the LDReg reference
    and sync-BN statistics all span the global batch, so DDP's averaged gradient equals
    the single-process gradient of the same 16 samples."""
    methods = ["simclr", "byol", "moco_v3", "barlow_twins", "vicreg"]
    single = first_step(0, 1, methods)
    double = launch.launch(first_step, 2, device_type="cpu", args=(methods,))
    for method in methods:
        one, two = single[method], double[method]
        torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-5, atol=1e-6)
        assert one["losses"][1] < 0, "the LDReg term was active"
        assert one["grads"].keys() == two["grads"].keys()
        for name, grad in one["grads"].items():
            error = (two["grads"][name] - grad).norm().item()
            assert error <= 1e-4 * grad.norm().item() + 1e-5, f"{method} {name}: {error}"


class StopAfterFirstEpoch:
    """A sink on rank 0 that asks to stop once epoch 1 has ended."""

    def __init__(self) -> None:
        self.starts: list[dict] = []
        self.epochs: list[int] = []
        self.checkpoints: list[int] = []
        self.stop = True

    def on_train_start(self, **kw) -> None:
        self.starts.append(kw)

    def on_step(self, **kw) -> None:
        pass

    def on_epoch_end(self, *, epoch: int, step: int, metrics: dict) -> None:
        self.epochs.append(epoch)

    def on_checkpoint(self, *, epoch: int, path: Path) -> None:
        self.checkpoints.append(epoch)

    def should_stop(self) -> bool:
        return self.stop and bool(self.epochs)


def test_two_process_pretrain_stops_together_and_resumes_from_rank_zeros_checkpoint(tmp_path):
    from ldreg.data import build_datasets, make_ssl_loader
    from ldreg.errors import TrainingCancelled
    from ldreg.train import pretrain

    spec = _spec("simclr").model_copy(update={"epochs": 2})
    sink = StopAfterFirstEpoch()
    with pytest.raises(TrainingCancelled, match="after epoch 1"):
        pretrain(spec, run_dir=tmp_path, data_root=tmp_path, sink=sink, device="cpu")
    bundle = build_datasets(spec.dataset, data_root=tmp_path, seed=0)
    shard = make_ssl_loader(
        bundle.train,
        kind="simclr",
        image_size=IMAGE_SIZE,
        mean=bundle.mean,
        std=bundle.std,
        batch_size=GLOBAL_BATCH // 2,
        seed=0,
        epoch=1,
        rank=0,
        world_size=2,
    )
    assert sink.starts[0]["steps_per_epoch"] == len(shard), "each rank trains on its half"
    assert sink.epochs == [1] and sink.checkpoints == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "epoch_0001.pt",
        "epoch_0001.pt.sha256",
    ], "one writer: rank 0"

    sink.stop = False
    summary = pretrain(spec, run_dir=tmp_path, data_root=tmp_path, sink=sink, device="cpu")
    assert sink.starts[1]["start_epoch"] == 2 and sink.epochs == [1, 2]
    assert summary["ldreg_loss"] < 0 and 0.0 <= summary["knn_acc"] <= 1.0
    assert (tmp_path / "backbone.pt").is_file()
