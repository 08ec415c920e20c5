"""The training loop, driven through ``pretrain`` on CPU with tiny models and data."""

from __future__ import annotations

import itertools
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from ldreg.checkpoint import list_checkpoints, load_checkpoint, load_latest_checkpoint
from ldreg.errors import NonFiniteLossError, TrainingCancelled, UserError
from ldreg.optim import build_optimizer, cosine_lr, param_groups, scaled_lr
from ldreg.spec import OptimizerSpec, PretrainSpec
from ldreg.train import load_backbone, pretrain

FIXED_METRICS = {
    "loss",
    "ssl_loss",
    "ldreg_loss",
    "lid_gmean_k4",
    "lid_gmean_k8",
    "effective_rank",
    "knn_acc",
    "online_probe_acc",
    "lr",
    "epoch_seconds",
}


def tiny_spec(**overrides) -> PretrainSpec:
    spec = {
        "method": "simclr",
        "width": 4,
        "batch_size": 16,
        "epochs": 2,
        "dataset": {"name": "synthetic", "image_size": 8, "num_samples": 80, "num_classes": 4},
        "optimizer": {"name": "sgd", "lr": 0.05, "lr_scaling": "none"},
        "ldreg": {"k": 5, "warmup_epochs": 1},
        "eval": {"lid_k": [4, 8], "knn_k": [3], "max_samples": 64},
        "method_options": {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16},
    }
    spec.update(overrides)
    return PretrainSpec.model_validate(spec)


class RecordingSink:
    """Keeps every event; asks to stop once ``stop_after_epoch`` ended (or at once)."""

    def __init__(self, stop_after_epoch: int | None = None, stop_now: bool = False) -> None:
        self.starts: list[dict] = []
        self.steps: list[tuple[int, int, dict]] = []
        self.epochs: list[tuple[int, dict]] = []
        self.checkpoints: list[tuple[int, Path]] = []
        self.stop_after_epoch = stop_after_epoch
        self.stop_now = stop_now

    def on_train_start(self, **kw) -> None:
        self.starts.append(kw)

    def on_step(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.steps.append((epoch, step, metrics))

    def on_epoch_end(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.epochs.append((epoch, metrics))

    def on_checkpoint(self, *, epoch: int, path: Path) -> None:
        self.checkpoints.append((epoch, path))

    def should_stop(self) -> bool:
        if self.stop_now:
            return True
        done = self.epochs[-1][0] if self.epochs else 0
        return self.stop_after_epoch is not None and done >= self.stop_after_epoch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    state, _ = load_latest_checkpoint(run_dir / "checkpoints")
    return state["model"]


# BYOL with LARS, gradient clipping and an LDReg warm-up: EMA target, momentum buffers,
# the online probe and the switch-on of the regularizer all have to survive a restart.
RESUME_SPEC = {
    "method": "byol",
    "epochs": 3,
    "optimizer": {"name": "lars", "lr": 0.3, "grad_clip": 5.0, "warmup_epochs": 1},
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    summary = pretrain(tiny_spec(**RESUME_SPEC), run_dir=run_dir, data_root=run_dir)
    torch.set_num_threads(threads)
    return run_dir, summary


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_run(uninterrupted, tmp_path):
    reference_dir, reference_summary = uninterrupted
    spec = tiny_spec(**RESUME_SPEC)
    stopping = RecordingSink(stop_after_epoch=2)
    with pytest.raises(TrainingCancelled, match="after epoch 2"):
        pretrain(spec, run_dir=tmp_path, data_root=tmp_path, sink=stopping)
    assert [e for e, _ in stopping.checkpoints] == [1, 2]
    assert not (tmp_path / "backbone.pt").exists()

    resumed = RecordingSink()
    summary = pretrain(spec, run_dir=tmp_path, data_root=tmp_path, sink=resumed)
    assert resumed.starts[0]["start_epoch"] == 3
    assert [e for e, _ in resumed.epochs] == [3]
    assert_same_weights(final_model(tmp_path), final_model(reference_dir))
    assert summary["linear_probe_acc"] == pytest.approx(reference_summary["linear_probe_acc"])
    assert summary["lid_gmean_k8"] == pytest.approx(reference_summary["lid_gmean_k8"], rel=1e-4)


@pytest.mark.slow
def test_a_run_resumed_under_torch_compile_matches_the_eager_run(uninterrupted, tmp_path):
    # compile is a resumable change: the compiled wrapper leaves the checkpoint's keys
    # alone, and the compiled step computes what the eager one does.
    reference_dir, reference_summary = uninterrupted
    with pytest.raises(TrainingCancelled):
        pretrain(
            tiny_spec(**RESUME_SPEC),
            run_dir=tmp_path,
            data_root=tmp_path,
            sink=RecordingSink(stop_after_epoch=2),
        )
    resumed = RecordingSink()
    summary = pretrain(
        tiny_spec(**RESUME_SPEC, compile=True), run_dir=tmp_path, data_root=tmp_path, sink=resumed
    )
    assert [e for e, _ in resumed.epochs] == [3]
    a, b = final_model(tmp_path), final_model(reference_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4, msg=name)
    assert summary["loss"] == pytest.approx(reference_summary["loss"], rel=1e-3)


def test_views_made_on_the_device_train_the_same_model_as_views_made_in_the_loader(tmp_path):
    # augment_on: device takes raw uint8 batches and makes the views in the training
    # process (on the GPU in production); the randomness is the batch seed's either way.
    weights = {}
    for where in ("loader", "device"):
        run_dir = tmp_path / where
        spec = tiny_spec(augment_on=where, epochs=2, num_workers=1 if where == "device" else 0)
        pretrain(spec, run_dir=run_dir, data_root=tmp_path)
        weights[where] = final_model(run_dir)
    assert_same_weights(weights["device"], weights["loader"])


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_valid_one(uninterrupted, tmp_path):
    reference_dir, _ = uninterrupted
    shutil.copytree(reference_dir / "checkpoints", tmp_path / "checkpoints")
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "epoch_0003.pt",
        "epoch_0002.pt",
    ], "only the last two checkpoints are kept"
    latest = tmp_path / "checkpoints" / "epoch_0003.pt"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))

    sink = RecordingSink()
    pretrain(tiny_spec(**RESUME_SPEC), run_dir=tmp_path, data_root=tmp_path, sink=sink)
    assert sink.starts[0]["start_epoch"] == 3, "resumed from epoch 2's checkpoint"
    assert_same_weights(final_model(tmp_path), final_model(reference_dir))


def test_resuming_a_run_directory_with_another_spec_is_refused(uninterrupted, tmp_path):
    reference_dir, _ = uninterrupted
    shutil.copytree(reference_dir / "checkpoints", tmp_path / "checkpoints")
    other = tiny_spec(**{**RESUME_SPEC, "seed": 7})
    with pytest.raises(UserError, match=r"different spec.*seed") as info:
        pretrain(other, run_dir=tmp_path, data_root=tmp_path)
    assert info.value.code == "checkpoint_spec_mismatch"


def test_epoch_metrics_use_the_fixed_names_and_ldreg_is_off_during_its_warm_up(tmp_path):
    sink = RecordingSink()
    summary = pretrain(tiny_spec(), run_dir=tmp_path, data_root=tmp_path, sink=sink)
    assert [e for e, _ in sink.epochs] == [1, 2]
    for _, metrics in sink.epochs:
        assert metrics.keys() >= FIXED_METRICS
        assert all(isinstance(v, float) for v in metrics.values())
    epoch1, epoch2 = sink.epochs[0][1], sink.epochs[1][1]
    assert epoch1["ldreg_loss"] == 0.0
    assert epoch2["ldreg_loss"] < 0.0, "α·mean(−|ln LID|) is negative once switched on"
    # The offline probe is fitted once, at the end; never a copy of the online one.
    assert "linear_probe_acc" not in epoch1 and "linear_probe_l2" not in epoch1
    assert epoch2["linear_probe_l2"] > 0 and 0.0 <= epoch2["linear_probe_acc"] <= 1.0
    # What the term itself sees: present exactly when it is on, per step and per epoch,
    # and consistent with the term (l1 form, every LID above 1: −α·mean ln LID).
    assert "ldreg_lid_gmean" not in epoch1
    assert epoch2["ldreg_lid_gmean"] > 1.0
    on_steps = [m for e, _, m in sink.steps if e == 2]
    assert all("ldreg_lid_gmean" in m for m in on_steps)
    assert not any("ldreg_lid_gmean" in m for e, _, m in sink.steps if e == 1)
    alpha = tiny_spec().ldreg_alpha
    for m in on_steps:
        assert m["ldreg_loss"] <= -alpha * math.log(m["ldreg_lid_gmean"]) + 1e-6
    assert epoch2["loss"] == pytest.approx(epoch2["ssl_loss"] + epoch2["ldreg_loss"])
    steps_per_epoch = sink.starts[0]["steps_per_epoch"]
    assert [s for _, s, _ in sink.steps] == list(range(1, 2 * steps_per_epoch + 1))
    assert summary == sink.epochs[-1][1]
    assert 0.0 <= summary["linear_probe_acc"] <= 1.0

    backbone, spec = load_backbone(tmp_path / "backbone.pt", "cpu")
    assert spec == tiny_spec()
    assert not backbone.training
    trained = final_model(tmp_path)
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(value, trained[f"method.backbone.{name}"])


def test_baseline_without_ldreg_reports_a_zero_ldreg_loss(tmp_path):
    sink = RecordingSink()
    pretrain(tiny_spec(ldreg=None, epochs=1), run_dir=tmp_path, data_root=tmp_path, sink=sink)
    assert all(m["ldreg_loss"] == 0.0 for _, _, m in sink.steps)
    assert sink.epochs[0][1]["loss"] == pytest.approx(sink.epochs[0][1]["ssl_loss"])


def test_diverging_loss_stops_with_epoch_step_and_last_good_checkpoint(tmp_path):
    spec = tiny_spec(
        method="vicreg",
        epochs=3,
        ldreg=None,
        optimizer={
            "name": "sgd",
            "lr": 1.0,
            "lr_scaling": "none",
            "warmup_epochs": 2,
            "momentum": 0.0,
        },
    )
    with pytest.raises(NonFiniteLossError) as info:
        pretrain(spec, run_dir=tmp_path, data_root=tmp_path)
    message = info.value.message
    assert info.value.code == "loss_not_finite"
    epoch = int(re.search(r"NaN or inf.* at epoch (\d+)", message).group(1))
    assert epoch >= 2, message
    assert f"last good checkpoint: checkpoints/epoch_{epoch - 1:04d}.pt" in message
    assert load_checkpoint(tmp_path / "checkpoints" / f"epoch_{epoch - 1:04d}.pt")["epoch"] == (
        epoch - 1
    )
    assert not (tmp_path / "backbone.pt").exists(), "no model is published after divergence"


def test_stop_request_cancels_within_the_first_steps_and_writes_nothing(tmp_path):
    with pytest.raises(TrainingCancelled, match="epoch 1, step 1"):
        pretrain(
            tiny_spec(), run_dir=tmp_path, data_root=tmp_path, sink=RecordingSink(stop_now=True)
        )
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_checkpoint_with_pickled_code_is_refused_and_skipped(tmp_path):
    from ldreg.checkpoint import save_checkpoint

    directory = tmp_path / "checkpoints"
    save_checkpoint({"epoch": 1, "w": torch.ones(2)}, directory, epoch=1)
    # A checksum-valid file holding an arbitrary object: weights_only loading refuses it.
    save_checkpoint({"epoch": 2, "obj": nn.Linear(2, 2)}, directory, epoch=2)
    state, path = load_latest_checkpoint(directory)
    assert path.name == "epoch_0001.pt" and state["epoch"] == 1
    (directory / "epoch_0001.pt.sha256").unlink()
    assert load_latest_checkpoint(directory) is None, "a checkpoint without checksum is not trusted"


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    lrs = [cosine_lr(s, total_steps=10, warmup_steps=2, base_lr=1.0) for s in range(11)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[6] == pytest.approx(0.5)  # half-way through the 8 decay steps
    assert lrs[10] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))


def test_lr_scales_linearly_or_with_the_square_root_of_the_batch():
    assert scaled_lr(OptimizerSpec(lr=0.3, lr_scaling="linear"), global_batch=1024) == 1.2
    assert scaled_lr(OptimizerSpec(lr=0.3, lr_scaling="sqrt"), global_batch=1024) == 0.6
    assert scaled_lr(OptimizerSpec(lr=0.3, lr_scaling="none"), global_batch=1024) == 0.3


def test_norms_and_biases_get_no_weight_decay_and_no_lars_adaptation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(2, 3, 5, 5))
    groups = param_groups(model.named_parameters(), 1e-4)
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}
    assert groups[1]["weight_decay"] == 0.0
    lars = build_optimizer(
        OptimizerSpec(name="lars", weight_decay=1e-6), model.named_parameters(), lr=1.0
    )
    assert [(g["weight_decay"], g["always_adapt"]) for g in lars.param_groups] == [
        (1e-6, True),
        (0.0, False),
    ]
    # With zero decay and no adaptation, LARS on a bias is plain momentum SGD.
    bias = model[1].bias
    bias.grad = torch.full_like(bias, 0.5)
    before = bias.detach().clone()
    for p in model.parameters():
        if p is not bias:
            p.grad = torch.zeros_like(p)
    lars.step()
    torch.testing.assert_close(bias.detach(), before - 0.5)


def test_online_probe_reaches_70_percent_of_the_offline_probe_in_3_epochs_on_digits(tmp_path):
    # Before the probe had its own optimizer it sat at chance (~0.1): LARS scaled its
    # steps by the trust ratio and the SSL schedule decayed them.
    spec = PretrainSpec.model_validate(
        {
            "method": "simclr",
            "width": 8,
            "dataset": {"name": "digits", "image_size": 16},
            "epochs": 3,
            "batch_size": 64,
            "optimizer": {"name": "lars", "lr": 1.0, "warmup_epochs": 1},
            "method_options": {"proj_hidden_dim": 256, "proj_dim": 64},
            "ldreg": {"k": 16, "warmup_epochs": 1},
            "eval": {"lid_k": [32], "knn_k": [20], "every_epochs": 3},
        }
    )
    summary = pretrain(spec, run_dir=tmp_path, data_root=tmp_path)
    assert summary["linear_probe_acc"] > 0.6
    assert summary["online_probe_acc"] >= 0.7 * summary["linear_probe_acc"]
