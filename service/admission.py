"""Admission control: what a pretrain job will need, estimated from its spec alone.

The API refuses, with a 422 that names the field, the estimate and the limit, a job
that the workers of its queue could not hold. The limits are settings that operators
size to their workers (``LDREG_QUEUE_MEMORY_GB``, ``LDREG_QUEUE_DEVICE_MEMORY_GB``;
docs/operations.md, "Job sizes"). No torch here: the API never imports it.

The estimates are deliberately coarse and err high. Their job is to stop a spec that
would need ten times what a worker has, not to predict a figure to the megabyte; the
worker's own memory limit (worker/runner.py) catches what gets past them.

- **Parameters**: the backbone's count (ResNet widths scale it by ``(width/64)²``; the
  ViTs are fixed), plus the heads' Linear layers. Training holds weights, gradients
  and two optimizer buffers (AdamW; momentum methods keep a target copy too): 4 × 4
  bytes per parameter.
- **Data**: every dataset lives in memory as uint8 ``3 × size²`` images.
- **Activations**: what one image's forward keeps for backward, from measured
  per-image figures at the reference resolution, scaled by the feature-map area and
  width, times ``2 × batch_size`` (two views).
- **Evaluation**: the features of up to ``eval.max_samples`` training and held-out
  images, and the LDReg distances of the batch (``(2B)²`` floats, a few copies).
"""

from __future__ import annotations

from dataclasses import dataclass

from ldreg.spec import PretrainSpec
from service.errors import InvalidInput
from service.settings import Settings

GIB = 1024**3
FLOAT = 4  # bytes: training runs in fp32 on the CPU, and keeps fp32 master weights on GPU

# Parameters at the standard width (64) / the ViT sizes, and the feature width.
_BACKBONE_PARAMS = {"resnet18": 11.2e6, "resnet50": 23.5e6}
_VIT = {"vit_tiny": (5.5e6, 192, 12), "vit_small": (21.7e6, 384, 12), "vit_base": (85.8e6, 768, 12)}
_RESNET_FEATURES = {"resnet18": 8, "resnet50": 32}  # × width
# Bytes one 224 px image keeps for backward at width 64 with the standard stem
# (its first feature map 56 × 56), fp32: ~35 MB for ResNet-18, ~100 MB for ResNet-50.
_RESNET_ACTIVATION = {"resnet18": 35e6, "resnet50": 100e6}
# Images each dataset holds in memory; file folders and archives are sized by the
# worker (it fails a job whose data does not fit with a user error).
_DATASET_IMAGES = {"digits": 1797, "cifar10": 60_000, "cifar100": 60_000}
_NATIVE_SIZE = {"digits": 32, "cifar10": 32, "cifar100": 32, "synthetic": 32, "image_folder": 224}
# Per method: (projector hidden, projector out, projector layers, predictor hidden or 0,
# keeps a momentum copy of backbone and projector).
_HEADS = {
    "simclr": (2048, 128, 2, 0, False),
    "byol": (4096, 256, 2, 4096, True),
    "moco_v3": (4096, 256, 2, 4096, True),
    "barlow_twins": (2048, 2048, 3, 0, False),
    "vicreg": (2048, 2048, 3, 0, False),
    "mae": (0, 0, 0, 0, False),
}


@dataclass(frozen=True)
class Need:
    """One part of a job's memory: how many bytes, and the spec field that sets them."""

    what: str
    bytes: float
    field: str


@dataclass(frozen=True)
class Estimate:
    host: list[Need]
    device: list[Need]

    @property
    def host_bytes(self) -> float:
        return sum(n.bytes for n in self.host)

    @property
    def device_bytes(self) -> float:
        return sum(n.bytes for n in self.device)


def _image_size(spec: PretrainSpec) -> int:
    return spec.dataset.image_size or _NATIVE_SIZE.get(spec.dataset.name, 32)


def _backbone(spec: PretrainSpec) -> tuple[float, int, float]:
    """(parameters, feature width, activation bytes per image)."""
    size = _image_size(spec)
    if spec.backbone in _VIT:
        params, dim, depth = _VIT[spec.backbone]
        patch = spec.method_options.patch_size or (4 if size <= 64 else 16)
        tokens = (size // patch) ** 2 + 1
        heads = dim // 64
        # Per block: ~34 activations of (tokens × dim) and the attention maps.
        per_image = depth * (34 * tokens * dim + 2 * heads * tokens * tokens) * FLOAT
        return params, dim, per_image
    width = spec.width or 64
    scale = (width / 64) ** 2
    small_stem = spec.small_stem if spec.small_stem is not None else size <= 64
    first_map = size if small_stem else size / 4
    per_image = _RESNET_ACTIVATION[spec.backbone] * (first_map / 56) ** 2 * (width / 64)
    return (
        _BACKBONE_PARAMS[spec.backbone] * scale,
        _RESNET_FEATURES[spec.backbone] * width,
        per_image,
    )


def _head_params(spec: PretrainSpec, feat_dim: int) -> tuple[float, bool]:
    hidden, out, layers, pred_hidden, momentum = _HEADS[spec.method]
    opts = spec.method_options
    hidden = opts.proj_hidden_dim or hidden
    out = opts.proj_dim or out
    pred_hidden = (opts.pred_hidden_dim or pred_hidden) if pred_hidden else 0
    params = 0.0
    if layers:
        params = feat_dim * hidden + (layers - 2) * hidden * hidden + hidden * out
    if pred_hidden:
        params += 2 * out * pred_hidden
    if spec.method == "mae":
        dim = opts.decoder_dim or 512
        params += (opts.decoder_depth or 8) * 12 * dim * dim
    return params, momentum


def estimate_pretrain(spec: PretrainSpec, *, on_gpu: bool = False) -> Estimate:
    """What ``spec`` needs in host memory and in device memory (GPU; on a CPU worker
    both land in host memory). On a GPU, activations are kept in bf16/fp16 unless the
    spec asks for fp32 (``precision``)."""
    size = _image_size(spec)
    backbone_params, feat_dim, per_image = _backbone(spec)
    if on_gpu and spec.precision != "fp32":
        per_image /= 2
    head_params, momentum = _head_params(spec, feat_dim)
    trained = backbone_params + head_params
    copies = 4 + (1 if momentum else 0)
    heads_dominate = head_params > backbone_params
    params = Need(
        "parameters, gradients and optimizer state",
        trained * copies * FLOAT,
        "spec.method_options.proj_hidden_dim" if heads_dominate else "spec.backbone",
    )
    rows = 2 * spec.batch_size
    if spec.method == "mae":
        # One view, and the encoder sees only the unmasked share of the patches.
        rows = spec.batch_size
        per_image *= 1 - (spec.method_options.mask_ratio or 0.75)
    activations = Need(
        f"activations of {rows} images ({size} px)", rows * per_image, "spec.batch_size"
    )
    ldreg = Need("LDReg distances of the batch", 4 * rows * rows * FLOAT, "spec.batch_size")

    images = (
        spec.dataset.num_samples
        if spec.dataset.name == "synthetic"
        else _DATASET_IMAGES.get(spec.dataset.name, 0)
    )
    data_field = (
        "spec.dataset.num_samples"
        if spec.dataset.name == "synthetic"
        else "spec.dataset.image_size"
    )
    data = Need(f"{images} images of {size} px in memory", images * 3 * size * size, data_field)
    eval_rows = min(spec.eval.max_samples, images) if images else spec.eval.max_samples
    evaluation = Need(
        f"features of {eval_rows} evaluation images",
        2 * eval_rows * feat_dim * FLOAT,
        "spec.eval.max_samples",
    )
    return Estimate(host=[data, evaluation], device=[params, activations, ldreg])


def _largest(needs: list[Need]) -> Need:
    return max(needs, key=lambda n: n.bytes)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def check_admission(spec: PretrainSpec, *, queue: str, settings: Settings) -> Estimate:
    """Refuse ``spec`` (InvalidInput, 422) when its estimate exceeds ``queue``'s limits.

    On a queue without a device limit (CPU workers) everything counts against the
    host limit.
    """
    host_limit = settings.queue_memory_gb.get(queue)
    device_limit = settings.queue_device_memory_gb.get(queue)
    estimate = estimate_pretrain(spec, on_gpu=device_limit is not None)
    checks: list[tuple[list[Need], float | None, str]] = []
    if device_limit is None:
        checks.append((estimate.host + estimate.device, host_limit, "memory"))
    else:
        checks.append((estimate.host, host_limit, "host memory"))
        checks.append((estimate.device, device_limit, "GPU memory"))
    for needs, limit_gb, kind in checks:
        total = sum(n.bytes for n in needs)
        if limit_gb is None or total <= limit_gb * GIB:
            continue
        worst = _largest(needs)
        parts = "; ".join(
            f"{n.what}: {_gib(n.bytes)}" for n in sorted(needs, key=lambda n: -n.bytes)
        )
        raise InvalidInput(
            f"this job needs an estimated {_gib(total)} of {kind}, over the {limit_gb:g} GiB"
            f" that a worker of queue '{queue}' holds for one job ({parts}); lower"
            f" {worst.field.removeprefix('spec.')}",
            field=worst.field,
            code="job_too_large",
        )
    return estimate
