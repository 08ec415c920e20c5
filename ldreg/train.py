"""SSL pretraining with or without LDReg: the loop the worker and ``ldreg pretrain`` run.

Usage::

    summary = pretrain(spec, run_dir=Path("runs/a"), data_root=Path("data"), sink=sink)
    backbone, spec = load_backbone(Path("runs/a/backbone.pt"), "cpu")

One epoch: reseed from ``(seed, epoch, rank)`` → steps (cosine lr, forward under
autocast, SSL loss + LDReg term + online-probe loss, NaN/cancel check, backward,
clip, step, EMA update) → evaluation on rank 0 → ``sink.on_epoch_end`` → checkpoint.
All randomness of an epoch is a function of ``(seed, epoch, rank)`` and every piece of
state lives in the checkpoint, so a run resumed from epoch e's checkpoint ends with the
same weights as one that never stopped. The library prints nothing; the sink decides.
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ldreg import launch, registry
from ldreg.backbones import build_backbone
from ldreg.checkpoint import (
    atomic_torch_save,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from ldreg.data import (
    DatasetBundle,
    RawBatch,
    TwoViewAugment,
    build_datasets,
    derive_seed,
    make_eval_loader,
    make_ssl_loader,
)
from ldreg.errors import NonFiniteLossError, TrainingCancelled, UserError
from ldreg.evaluation import (
    OnlineLinearProbe,
    extract_features,
    knn_accuracy,
    linear_probe,
    representation_metrics,
)
from ldreg.methods import SSLMethod, build_method
from ldreg.optim import build_optimizer, cosine_lr, scaled_lr, set_lr
from ldreg.regularizer import LDReg
from ldreg.sink import NullSink, TrainingSink
from ldreg.spec import PretrainSpec

# 2: the online probe has its own optimizer, saved as "probe_optimizer".
CHECKPOINT_FORMAT = 2
BACKBONE_FORMAT = "ldreg-backbone-v1"
# Steps between polls of sink.should_stop(). Every step: the worker's sink answers from
# memory (its heartbeat thread reads the database), so a cancel or a preemption waits
# for one step at most, whatever the spec.
STOP_POLL_STEPS = 1
EVAL_BATCH_SIZE = 256
# Spec fields that may change between a run and its resumption without changing it.
RESUMABLE_CHANGES = {"devices", "num_workers", "compile", "augment_on"}


# --------------------------------------------------------------------------- model


@dataclass
class StepOutput:
    """One step's losses; ``ldreg_log_lid`` is the mean ln LID the term saw (NaN when off)."""

    ssl_loss: Tensor
    ldreg_loss: Tensor
    probe_loss: Tensor
    probe_acc: Tensor
    ldreg_log_lid: Tensor


class TrainModule(nn.Module):
    """The method, the LDReg term and the online probe as one module (one DDP wrapper).

    The LDReg term is applied on ``output.features`` (backbone; the ViT CLS token for
    MAE) or ``output.projections``; the reference set is those rows, detached, plus the
    method's ``extra_reference`` (BYOL's target encoder), gathered from all ranks
    (Huang et al. 2024, Sec. 5 and the authors' code), and the method's
    ``ldreg_reduction`` says how the two views' rows combine (see :func:`ldreg_term`).
    """

    def __init__(
        self,
        method: SSLMethod,
        probe: OnlineLinearProbe | None,
        ldreg: LDReg | None,
        target: str = "features",
    ) -> None:
        super().__init__()
        self.method = method
        self.probe = probe
        self.ldreg = ldreg
        self.target = target

    def forward(
        self,
        view1: Tensor,
        view2: Tensor,
        labels: Tensor,
        ldreg_on: bool,
        clean: Tensor | None = None,
    ) -> StepOutput:
        out = self.method(view1, view2)
        zero = out.loss.new_zeros(())
        ldreg_loss, log_lid = zero, zero.float() + math.nan
        if ldreg_on and self.ldreg is not None:
            regularized = out.features if self.target == "features" else out.projections
            if regularized is None:
                raise UserError(
                    f"method '{self.method.name}' has no {self.target} to regularize",
                    code="invalid_spec",
                )
            ldreg_loss, lids = ldreg_term(
                self.ldreg,
                regularized.float(),
                out.extra_reference.get(self.target),
                reduction=self.method.ldreg_reduction,
            )
            log_lid = lids.log().mean()
        probe_loss, probe_acc = zero, zero.float() + math.nan
        if self.probe is not None:
            probe_loss, probe_acc = self.probe.loss_and_acc(
                *self._probe_inputs(out.features, labels, clean)
            )
        return StepOutput(out.loss, ldreg_loss, probe_loss, probe_acc, log_lid)

    def _probe_inputs(
        self, features: Tensor, labels: Tensor, clean: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """What the online probe learns from: the backbone's eval-mode features of the
        un-augmented images when the loader carries them (``eval.online_probe_input:
        clean``), the very input it is evaluated on; else the training views' features."""
        if clean is None:
            views = features.shape[0] // labels.shape[0]
            return features.detach(), labels.repeat(views)
        backbone = self.method.backbone
        backbone.eval()  # running statistics, as at evaluation; no statistic is updated
        try:
            with torch.no_grad():
                clean_features = backbone(clean)
        finally:
            backbone.train()
        return clean_features, labels


def ldreg_term(
    ldreg: LDReg,
    regularized: Tensor,
    extra: Tensor | None,
    *,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """The LDReg loss of the local rows and their LIDs (detached).

    ``reduction="mean"``: α·mean(−|ln LID|) over all rows, the authors' SimCLR and MAE
    losses (``losses/ntxent_lid_reg.py``, ``losses/mae_loss.py``). ``"sum_views"``: the
    rows are two equal blocks (view 1, view 2) and the term is α·(mean over view 1 +
    mean over view 2) = 2·α·mean over all rows, the authors' BYOL loss
    (``losses/byol_loss.py``: ``(main_loss + alpha * (lid_reg_f_0 + lid_reg_f_1)).mean()``).

    The reference is both views of the whole batch (gathered by ``LDReg``), plus the
    method's extra rows (BYOL's target features) placed after the local rows; each
    row's own entry is excluded by index.

    Non-finite inputs give a NaN term (``LDReg.loss_and_lids``), so the loop's NaN
    check reports the divergence, not the LID estimator's input check.
    """
    if extra is None:
        term, lids = ldreg.loss_and_lids(regularized)
    else:
        reference = torch.cat([regularized.detach(), extra.detach().to(regularized.dtype)])
        term, lids = ldreg.loss_and_lids(regularized, reference, self_offset=0)
    if reduction == "sum_views":
        term = 2 * term
    elif reduction != "mean":
        raise ValueError(f"unknown LDReg reduction {reduction!r}; use 'mean' or 'sum_views'")
    return term, lids


def build_train_module(spec: PretrainSpec, *, image_size: int, num_classes: int) -> TrainModule:
    """Backbone + method + online probe + LDReg term for ``spec``, seeded by ``spec.seed``."""
    torch.manual_seed(spec.seed)
    backbone, feat_dim = build_backbone(
        spec.backbone,
        image_size=image_size,
        width=spec.width,
        small_stem=spec.small_stem,
        patch_size=spec.method_options.patch_size,
    )
    method = build_method(spec, backbone, feat_dim)
    probe = OnlineLinearProbe(feat_dim, num_classes) if num_classes > 1 else None
    regularizer = None
    if spec.ldreg is not None:
        regularizer = LDReg(
            alpha=spec.ldreg_alpha,
            k=spec.ldreg.k,
            estimator=spec.ldreg.estimator,
            form=spec.ldreg.form,
            gather_distributed=True,
        )
    target = spec.ldreg.target if spec.ldreg is not None else "features"
    return TrainModule(method, probe, regularizer, target)


# --------------------------------------------------------------------------- helpers


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no GPU is available", code="no_gpu")
    return device


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """Mixed precision on CUDA only: ``auto`` → bf16 where supported, else fp16."""
    if device_type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Make every random draw of an epoch a pure function of ``(seed, epoch, rank)``."""
    s = derive_seed(seed, epoch, rank)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def _spec_fingerprint(spec: PretrainSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", exclude=RESUMABLE_CHANGES)


def _is_main(rank: int) -> bool:
    return rank == 0


def _all_reduce(values: Tensor) -> Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


def _broadcast_flag(flag: bool, device: torch.device) -> bool:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.broadcast(t, src=0)
        return bool(t.item())
    return flag


def _broadcast_object(obj: Any) -> Any:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


# --------------------------------------------------------------------------- evaluation


def evaluate(
    backbone: nn.Module,
    probe: OnlineLinearProbe | None,
    bundle: DatasetBundle,
    spec: PretrainSpec,
    device: torch.device,
    *,
    final: bool,
) -> dict[str, float]:
    """LID / rank on held-out features, kNN (each k of ``eval.knn_k``) and the probes.

    ``online_probe_acc`` is the online probe's held-out accuracy, at every evaluation.
    ``linear_probe_acc`` is only ever the offline probe (:func:`linear_probe`, its L2
    weight chosen on held-out training features and published as ``linear_probe_l2``),
    fitted once, at the end (``final``): it is the number a comparison rests on, and
    nine L-BFGS fits per evaluation would cost more than the epoch on small data.
    ``knn_acc`` is the first ``knn_k``.
    """

    def features_of(dataset: Any) -> tuple[Tensor, Tensor]:
        loader = make_eval_loader(
            dataset,
            mean=bundle.mean,
            std=bundle.std,
            batch_size=EVAL_BATCH_SIZE,
            max_samples=spec.eval.max_samples,
        )
        return extract_features(backbone, loader, device)

    val_f, val_y = features_of(bundle.val)
    if not bool(torch.isfinite(val_f).all()):
        raise NonFiniteLossError("the backbone's features became NaN or inf (evaluation)")
    metrics = representation_metrics(val_f, lid_k=spec.eval.lid_k)
    if probe is None:
        return metrics
    train_f, train_y = features_of(bundle.train)
    nc = bundle.num_classes
    for i, k in enumerate(spec.eval.knn_k):
        acc = knn_accuracy(train_f, train_y, val_f, val_y, k=k, num_classes=nc)
        metrics[f"knn_acc_k{k}"] = acc
        if i == 0:
            metrics["knn_acc"] = acc
    metrics["online_probe_acc"] = probe.accuracy(val_f, val_y)
    if final:
        result = linear_probe(train_f, train_y, val_f, val_y, num_classes=nc, seed=spec.seed)
        metrics["linear_probe_acc"] = result.accuracy
        metrics["linear_probe_l2"] = result.l2
    return metrics


# --------------------------------------------------------------------------- backbone file


def save_backbone(path: Path, backbone: nn.Module, spec: PretrainSpec, *, image_size: int) -> None:
    """Write the trained backbone with its spec, for later diagnosis jobs (atomically)."""
    state = {
        "format": BACKBONE_FORMAT,
        "spec": spec.model_dump_json(),
        "image_size": image_size,
        "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
    }
    atomic_torch_save(state, path)


def load_backbone(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, PretrainSpec]:
    """The backbone saved by :func:`pretrain` (eval mode, on ``device``) and its spec."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no trained backbone at {path}", code="backbone_missing") from None
    except Exception as e:
        raise UserError(
            f"{path} is not a readable backbone file: {e}", code="backbone_corrupt"
        ) from e
    if not isinstance(state, dict) or state.get("format") != BACKBONE_FORMAT:
        raise UserError(f"{path} is not an ldreg backbone file", code="backbone_corrupt")
    spec = PretrainSpec.model_validate_json(state["spec"])
    backbone, _ = build_backbone(
        spec.backbone,
        image_size=state["image_size"],
        width=spec.width,
        small_stem=spec.small_stem,
        patch_size=spec.method_options.patch_size,
    )
    backbone.load_state_dict(state["state_dict"])
    return backbone.to(device).eval(), spec


# --------------------------------------------------------------------------- training


def pretrain(
    spec: PretrainSpec,
    *,
    run_dir: Path,
    data_root: Path,
    sink: TrainingSink | None = None,
    device: str | None = None,
    resume: bool = True,
) -> dict[str, float]:
    """Train ``spec``; return the final metrics (the job summary).

    Writes ``run_dir/checkpoints/epoch_NNNN.pt`` (+ ``.sha256``) every
    ``spec.checkpoint_every`` epochs and at the end, and ``run_dir/backbone.pt``. With
    ``resume`` it continues after the newest valid checkpoint in ``run_dir``. With
    ``spec.devices > 1`` the ranks run under DDP; this process is rank 0 and alone
    talks to ``sink``.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (names epoch, step, last checkpoint).
        TrainingCancelled: ``sink.should_stop()`` returned True.
        UserError / DatasetError: the spec or the data cannot work.
    """
    sink = sink or NullSink()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    args = (spec, run_dir, Path(data_root), device, resume)
    try:
        if spec.devices > 1:
            device_type = torch.device(device).type
            return launch.launch(
                _train_rank,
                spec.devices,
                device_type=device_type,
                args=args,
                rank0_kwargs={"sink": sink},
            )
        return _train_rank(0, 1, *args, sink=sink)
    finally:
        if torch.device(device).type == "cuda":
            # One job after another in the same worker: hand cached blocks back.
            gc.collect()
            torch.cuda.empty_cache()


@dataclass
class StepStatus:
    """What one step's single collective carries, summed over ranks: the logged means,
    the probe's batch accuracy, the NaN flag and the stop flag, so every rank raises at
    the same step.

    :meth:`start` queues the collective and the copy to the host without waiting;
    :meth:`read` waits for them. In between the step's backward and optimizer step are
    queued, so the device never idles on this, the step's only host sync (CUDA; on the
    CPU everything is synchronous anyway).
    """

    loss: float
    ssl_loss: float
    ldreg_loss: float
    non_finite: float
    stop: float
    ldreg_log_lid: float
    probe_acc: float

    @staticmethod
    def start(out: StepOutput, loss: Tensor, stop: bool) -> tuple[Tensor, Any]:
        values = torch.stack(
            [
                loss.detach(),
                out.ssl_loss.detach().float(),
                out.ldreg_loss.detach().float(),
                (~torch.isfinite(loss.detach())).float(),
                torch.full((), float(stop), device=loss.device),
                out.ldreg_log_lid.detach().float(),
                out.probe_acc.float(),
            ]
        )
        values = _all_reduce(values)
        if values.device.type != "cuda":
            return values, None
        host = values.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    @classmethod
    def read(cls, pending: tuple[Tensor, Any]) -> StepStatus:
        values, done = pending
        if done is not None:
            done.synchronize()
        return cls(*values.tolist())


class _RankRun:
    """One rank's training run, step by step: build, resume, train each epoch
    (steps, then evaluation, metrics and checkpoint on rank 0), save the backbone."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        spec: PretrainSpec,
        run_dir: Path,
        data_root: Path,
        device_name: str,
        sink: TrainingSink,
    ) -> None:
        self.rank, self.world_size, self.spec, self.run_dir = rank, world_size, spec, run_dir
        self.sink = sink
        self.main = _is_main(rank)
        device = torch.device(device_name)
        if device.type == "cuda":
            if world_size > 1:
                device = torch.device("cuda", rank)
            # Fixed input shapes: let cuDNN pick the fastest convolution algorithms.
            torch.backends.cudnn.benchmark = True
        self.device = device

        self.bundle = build_datasets(spec.dataset, data_root=data_root, seed=spec.seed)
        model = build_train_module(
            spec, image_size=self.bundle.image_size, num_classes=self.bundle.num_classes
        )
        if world_size > 1 and spec.sync_bn:
            # The same TrainModule, its BatchNorms swapped in place.
            model = cast(TrainModule, launch.convert_sync_batchnorm(model, device.type))
        # Channels-last on CUDA for convolutional backbones: cuDNN's fastest layout for
        # tensor-core convolutions (NHWC); autocast's bf16 / fp16 is what uses them.
        self.memory_format = (
            torch.channels_last
            if device.type == "cuda" and registry.BACKBONES[spec.backbone].family == "resnet"
            else torch.contiguous_format
        )
        self.model = model.to(device).to(memory_format=self.memory_format)
        self.method = self.model.method
        self.probe_on_clean = (
            self.model.probe is not None and spec.eval.online_probe_input == "clean"
        )
        self.augment = self._augment_on_device()

        self.steps_per_epoch = len(self.loader(1))
        self.total_steps = spec.epochs * self.steps_per_epoch
        opt = spec.optimizer
        self.base_lr = scaled_lr(opt, global_batch=spec.batch_size)
        self.warmup_steps = min(opt.warmup_epochs * self.steps_per_epoch, self.total_steps)
        self.optimizer = build_optimizer(
            opt,
            ((n, p) for n, p in self.model.named_parameters() if not n.startswith("probe.")),
            lr=self.base_lr,
        )
        probe = self.model.probe
        self.probe_optimizer = (
            probe.make_optimizer(spec.eval.online_probe_lr) if probe is not None else None
        )
        self.amp_dtype = autocast_dtype(spec.precision, device.type)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.clipped = [p for p in self.method.parameters() if p.requires_grad]
        self.ckpt_dir = run_dir / "checkpoints"
        self.last_good: Path | None = None
        self.train_model: nn.Module = self.model

    def _augment_on_device(self) -> TwoViewAugment | None:
        """The augmentation that makes the views on the training device, or None when
        the loader's workers make them (``augment_on``; ``auto``: on the device on
        CUDA, in the loader on the CPU, where the workers are the parallelism)."""
        where = self.spec.augment_on
        if where == "loader" or (where == "auto" and self.device.type != "cuda"):
            return None
        return TwoViewAugment(
            self.method.augmentation,
            self.bundle.image_size,
            self.bundle.mean,
            self.bundle.std,
            with_clean=self.probe_on_clean,
        )

    def loader(self, epoch: int) -> Any:
        spec = self.spec
        return make_ssl_loader(
            self.bundle.train,
            kind=self.method.augmentation,
            image_size=self.bundle.image_size,
            mean=self.bundle.mean,
            std=self.bundle.std,
            batch_size=spec.batch_size // self.world_size,
            seed=spec.seed,
            epoch=epoch,
            num_workers=spec.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            rank=self.rank,
            world_size=self.world_size,
            with_clean=self.probe_on_clean,
            augment_on="loader" if self.augment is None else "device",
        )

    def resume(self) -> tuple[int, dict[str, float] | None]:
        """Load the newest valid checkpoint (chosen on rank 0, the same on every rank);
        returns the first epoch to train and the summary it holds, if final."""
        chosen = None
        if self.main:
            found = load_latest_checkpoint(self.ckpt_dir)
            chosen = None if found is None else str(found[1])
        chosen = _broadcast_object(chosen)
        if chosen is None:
            return 1, None
        state = load_checkpoint(Path(chosen))
        _check_resumable(state, self.spec, Path(chosen))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.probe_optimizer is not None:
            self.probe_optimizer.load_state_dict(state["probe_optimizer"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.last_good = Path(chosen)
        return int(state["epoch"]) + 1, state.get("summary")

    def run(self, resume: bool) -> dict[str, float]:
        start_epoch, summary = self.resume() if resume else (1, None)
        self.train_model = launch.wrap_model(self.model, self.device)
        if self.spec.compile:
            # The wrapper is compiled, not self.model: checkpoints keep their keys.
            self.train_model = cast(nn.Module, torch.compile(self.train_model))
        if self.main:
            self.sink.on_train_start(
                start_epoch=start_epoch,
                epochs=self.spec.epochs,
                steps_per_epoch=self.steps_per_epoch,
            )
        metrics: dict[str, float] = {}
        for epoch in range(start_epoch, self.spec.epochs + 1):
            metrics = self.train_epoch(epoch)
            if epoch == self.spec.epochs:
                summary = metrics
        if not self.main:
            return {}
        save_backbone(
            self.run_dir / "backbone.pt",
            self.method.backbone,
            self.spec,
            image_size=self.bundle.image_size,
        )
        return dict(summary or metrics)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        spec = self.spec
        started = time.perf_counter()
        seed_epoch(spec.seed, epoch, self.rank)
        self.model.train()
        ldreg_on = spec.ldreg is not None and epoch > spec.ldreg.warmup_epochs
        sums: dict[str, float] = defaultdict(float)
        count, log_lid_sum, lr = 0, 0.0, self.base_lr
        for i, batch in enumerate(self.loader(epoch)):
            step = (epoch - 1) * self.steps_per_epoch + i
            lr = cosine_lr(
                step,
                total_steps=self.total_steps,
                warmup_steps=self.warmup_steps,
                base_lr=self.base_lr,
            )
            step_metrics, probe_acc = self.train_step(epoch, i, step, lr, batch, ldreg_on)
            for name, value in step_metrics.items():
                if name == "ldreg_lid_gmean":  # the epoch's value is a geometric mean
                    log_lid_sum += math.log(value)
                else:
                    sums[name] += value
            if not math.isnan(probe_acc):
                sums["train_probe_acc"] += probe_acc
            count += 1
            if self.main:
                self.sink.on_step(epoch=epoch, step=step + 1, metrics=step_metrics)

        metrics = {name: total / count for name, total in sums.items()}
        metrics["lr"] = lr
        if ldreg_on:
            # The geometric mean over every training row of the epoch (equal-size steps).
            metrics["ldreg_lid_gmean"] = math.exp(log_lid_sum / count)
        final = epoch == spec.epochs
        if self.main:
            self.end_epoch(epoch, metrics, started, final=final)
        stop = self.main and not final and bool(self.sink.should_stop())
        if _broadcast_flag(stop, self.device):
            raise TrainingCancelled(f"cancelled after epoch {epoch}")
        return metrics

    def train_step(
        self,
        epoch: int,
        i: int,
        step: int,
        lr: float,
        batch: RawBatch | tuple[Tensor, ...],
        ldreg_on: bool,
    ) -> tuple[dict[str, float], float]:
        """One optimizer step on a loader batch (views made in the loader, or a raw
        batch whose views are made here on the device); returns the step's logged
        metrics and the probe's batch accuracy (the mean over ranks; NaN without a
        probe)."""
        set_lr(self.optimizer, lr)
        device = self.device
        if isinstance(batch, RawBatch):
            assert self.augment is not None
            views = self.augment(batch.images, batch.seed, device=device)
            view1, view2, clean = views.view1, views.view2, views.clean
            labels = batch.labels
        else:
            view1, view2, labels, *rest = batch
            clean = rest[0] if rest else None
        layout = self.memory_format
        view1 = view1.to(device, non_blocking=True, memory_format=layout)
        view2 = view2.to(device, non_blocking=True, memory_format=layout)
        if clean is not None:
            clean = clean.to(device, non_blocking=True, memory_format=layout)
        labels = labels.to(device, non_blocking=True)
        amp = self.amp_dtype
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = self.train_model(view1, view2, labels, ldreg_on, clean)
        loss = out.ssl_loss.float() + out.ldreg_loss.float()

        stop = False
        if self.main and i % STOP_POLL_STEPS == 0:
            launch.check_peers()
            stop = bool(self.sink.should_stop())
        pending = StepStatus.start(out, loss, stop)

        # Queued before the status is read, so the device works while the host waits.
        # A NaN step or a stop therefore updates the weights once more before the raise
        # below; neither is kept (the run fails, or resumes from its last checkpoint).
        self.optimizer.zero_grad(set_to_none=True)
        if self.probe_optimizer is not None:
            self.probe_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss + out.probe_loss.float()).backward()
        if self.spec.optimizer.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.clipped, self.spec.optimizer.grad_clip)
        self.scaler.step(self.optimizer)
        if self.probe_optimizer is not None:
            self.scaler.step(self.probe_optimizer)
        self.scaler.update()
        self.method.update_target(step=step + 1, total_steps=self.total_steps)

        status = StepStatus.read(pending)
        if status.non_finite > 0:
            raise NonFiniteLossError(
                f"the loss became NaN or inf at epoch {epoch}, step {step + 1}"
                f" (step {i + 1} of the epoch); last good checkpoint:"
                f" {_describe(self.last_good)}. Lower the learning rate, enable"
                " optimizer.grad_clip or use fp32 precision"
            )
        if status.stop > 0:
            raise TrainingCancelled(f"cancelled at epoch {epoch}, step {step + 1}")

        w = self.world_size
        step_metrics = {
            "loss": status.loss / w,
            "ssl_loss": status.ssl_loss / w,
            "ldreg_loss": status.ldreg_loss / w,
            "lr": lr,
        }
        if ldreg_on:
            # Equal rows per rank: the mean of the ranks' mean ln LID is the batch's.
            step_metrics["ldreg_lid_gmean"] = math.exp(status.ldreg_log_lid / w)
        return step_metrics, status.probe_acc / w

    def end_epoch(
        self, epoch: int, metrics: dict[str, float], started: float, *, final: bool
    ) -> None:
        """Rank 0: evaluate, publish the epoch's metrics, then checkpoint (metrics
        first, so after a crash every checkpointed epoch has its metrics)."""
        spec = self.spec
        if final or epoch % spec.eval.every_epochs == 0:
            try:
                metrics.update(
                    evaluate(
                        self.method.backbone,
                        self.model.probe,
                        self.bundle,
                        spec,
                        self.device,
                        final=final,
                    )
                )
            except NonFiniteLossError as e:
                raise NonFiniteLossError(
                    f"{e.message} at epoch {epoch}; last good checkpoint:"
                    f" {_describe(self.last_good)}. Lower the learning rate or enable"
                    " optimizer.grad_clip"
                ) from e
        metrics["epoch_seconds"] = time.perf_counter() - started
        global_step = epoch * self.steps_per_epoch
        self.sink.on_epoch_end(epoch=epoch, step=global_step, metrics=metrics)
        if final or epoch % spec.checkpoint_every == 0:
            self.checkpoint(epoch, global_step, metrics, final=final)

    def checkpoint(
        self, epoch: int, global_step: int, metrics: dict[str, float], *, final: bool
    ) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "global_step": global_step,
            "spec": self.spec.model_dump_json(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "probe_optimizer": (
                self.probe_optimizer.state_dict() if self.probe_optimizer is not None else None
            ),
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "metrics": metrics,
            "summary": metrics if final else None,
        }
        self.last_good = save_checkpoint(state, self.ckpt_dir, epoch=epoch)
        self.sink.on_checkpoint(epoch=epoch, path=self.last_good)


def _train_rank(
    rank: int,
    world_size: int,
    spec: PretrainSpec,
    run_dir: Path,
    data_root: Path,
    device_name: str,
    resume: bool,
    sink: TrainingSink | None = None,
) -> dict[str, float]:
    run = _RankRun(rank, world_size, spec, run_dir, data_root, device_name, sink or NullSink())
    return run.run(resume)


def _describe(checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "none"
    return f"{checkpoint.parent.name}/{checkpoint.name}"


def _check_resumable(state: dict[str, Any], spec: PretrainSpec, path: Path) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path.name} has an unknown checkpoint format", code="checkpoint_format")
    saved = PretrainSpec.model_validate_json(state["spec"])
    if _spec_fingerprint(saved) != _spec_fingerprint(spec):
        changed = sorted(
            k for k, v in _spec_fingerprint(spec).items() if _spec_fingerprint(saved).get(k) != v
        )
        raise UserError(
            f"the run directory holds checkpoints of a different spec (changed: "
            f"{', '.join(changed)}); use a new run directory",
            code="checkpoint_spec_mismatch",
        )


__all__ = [
    "StepOutput",
    "TrainModule",
    "build_train_module",
    "evaluate",
    "load_backbone",
    "pretrain",
    "save_backbone",
]
