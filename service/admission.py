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

from ldreg import registry
from ldreg.spec import PretrainSpec
from service.errors import InvalidInput
from service.settings import Settings

GIB = 1024**3
FLOAT = 4  # bytes: training runs in fp32 on the CPU, and keeps fp32 master weights on GPU

# Feature width of a ResNet, × its base width: BasicBlock stages end at 8× it,
# Bottleneck ones (4× expansion) at 32×.
_RESNET_FEATURES = {False: 8, True: 32}
# Bytes one 224 px image keeps for backward at width 64 with the standard stem
# (its first feature map 56 × 56), fp32: ~35 MB for ResNet-18, ~100 MB for ResNet-50.
_RESNET_ACTIVATION = {False: 35e6, True: 100e6}  # keyed by "bottleneck"


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
    return spec.dataset.image_size or registry.DATASETS[spec.dataset.name].native_size or 32


def _backbone(spec: PretrainSpec) -> tuple[float, float, float]:
    """(parameters, feature width, activation bytes per image)."""
    size = _image_size(spec)
    entry = registry.BACKBONES[spec.backbone]
    if entry.family == "vit":
        params, dim, depth = entry.parameters, entry.dim, entry.depth
        patch = spec.method_options.patch_size or (4 if size <= 64 else 16)
        tokens = (size // patch) ** 2 + 1
        heads = dim // 64
        # Per block: ~34 activations of (tokens × dim) and the attention maps.
        per_image: float = depth * (34 * tokens * dim + 2 * heads * tokens * tokens) * FLOAT
        return params, dim, per_image
    width: float = spec.width or 64
    scale = (width / 64) ** 2
    small_stem = spec.small_stem if spec.small_stem is not None else size <= 64
    first_map: float = size if small_stem else size / 4
    per_image = _RESNET_ACTIVATION[entry.bottleneck] * (first_map / 56) ** 2 * (width / 64)
    return (
        entry.parameters * scale,
        _RESNET_FEATURES[entry.bottleneck] * width,
        per_image,
    )


def _head_params(spec: PretrainSpec, feat_dim: float) -> tuple[float, bool]:
    """The heads' parameters (the method's registry defaults, or its options) and
    whether it keeps a momentum copy."""
    heads = registry.METHODS[spec.method].heads
    opts = spec.method_options
    hidden = opts.proj_hidden_dim or heads.proj_hidden
    out = opts.proj_dim or heads.proj_dim
    pred_hidden = (opts.pred_hidden_dim or heads.pred_hidden) if heads.pred_hidden else 0
    params = 0.0
    if heads.proj_layers:
        params = feat_dim * hidden + (heads.proj_layers - 2) * hidden * hidden + hidden * out
    if pred_hidden:
        params += 2 * out * pred_hidden
    if heads.decoder_depth:
        dim = opts.decoder_dim or heads.decoder_dim
        params += (opts.decoder_depth or heads.decoder_depth) * 12 * dim * dim
    return params, heads.momentum_copy


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

    # File folders and archives are sized by the worker, which fails a job whose data
    # does not fit its memory limit.
    images = (
        spec.dataset.num_samples
        if spec.dataset.name == "synthetic"
        else registry.DATASETS[spec.dataset.name].images or 0
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
