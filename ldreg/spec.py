"""Job specifications: the one definition shared by the API, the worker and the CLI.

These models import only pydantic (never torch), so the API can validate a spec
without loading the science stack. Unknown fields are rejected (``extra="forbid"``)
so a typo in a spec is a 422 naming the field, not a silently ignored setting.

Clients depend on the field names (docs/api.md, "A pretrain spec", "A diagnose
spec"); new fields come with defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ldreg import registry

# The names come from the registry (ldreg/registry.py), the one list of them.
METHODS = tuple(registry.METHODS)
BACKBONES = tuple(registry.BACKBONES)
DATASETS = tuple(registry.DATASETS)
FILE_DATASETS = tuple(name for name, d in registry.DATASETS.items() if d.file_based)
ESTIMATORS = registry.ESTIMATORS
DEFAULT_ALPHA = {name: m.default_alpha for name, m in registry.METHODS.items()}


def _member_of(names: Mapping[str, object], what: str) -> AfterValidator:
    def check(value: str) -> str:
        if value not in names:
            raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(names)}")
        return value

    return AfterValidator(check)


def _enum(names: Mapping[str, object]) -> WithJsonSchema:
    # Listed as an enum in JSON Schema, so in OpenAPI and in the dashboard's choices,
    # which read it.
    return WithJsonSchema({"type": "string", "enum": list(names)})


MethodName = Annotated[str, _member_of(registry.METHODS, "method"), _enum(registry.METHODS)]
BackboneName = Annotated[str, _member_of(registry.BACKBONES, "backbone"), _enum(registry.BACKBONES)]
DatasetName = Annotated[str, _member_of(registry.DATASETS, "dataset"), _enum(registry.DATASETS)]


# Bounds that no real spec comes near, so every integer fits a 32-bit column and a
# loop or an allocation the worker makes from it, and a seed fits numpy and sklearn.
MAX_EPOCHS = 10_000
MAX_SEED = 2**32 - 1
MAX_WIDTH = 65_536  # projector / predictor / decoder widths
MAX_TEXT = 1_000


def storable_text(value: str) -> str:
    """Refuse text a database cannot store: NUL characters (PostgreSQL's text types
    reject them) and lone surrogates (not encodable as UTF-8)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (found a lone surrogate)") from None
    return value


# A string that goes to the database: storable, and bounded.
Text = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(storable_text)]


def error_message(error: Mapping[str, Any]) -> str:
    """A pydantic error's message in the words a user reads (no "Value error, ")."""
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def field_errors(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted field, reason)`` for each problem in ``exc``, fields under ``prefix``:
    the one formatting the API's data layer, the worker and the CLI share."""
    out = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(p) for p in (prefix, *error["loc"]) if p != "")
        out.append((field or "(spec)", error_message(error)))
    return out


class _Spec(BaseModel):
    # allow_inf_nan=False: NaN and ±Infinity are refused in every float field; JSON
    # columns cannot store them, and no setting is meaningful at infinity.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def check_relative_data_path(path: str) -> str:
    """Refuse a dataset path that could leave the server's data root.

    Paths are resolved under ``LDREG_DATA_ROOT`` by the worker (which also re-checks
    after resolving symlinks); here we reject what is visibly outside it.
    """
    if not path or path.strip() != path:
        raise ValueError("path must be a non-empty relative path without surrounding spaces")
    storable_text(path)
    if "\\" in path:
        raise ValueError("path must not contain backslashes")
    pure = PurePosixPath(path)
    if pure.is_absolute() or path.startswith("~"):
        raise ValueError("path must be relative to the data root, not absolute")
    if ".." in pure.parts:
        raise ValueError("path must stay inside the data root ('..' is not allowed)")
    return path


class DatasetSpec(_Spec):
    """Which images to train on.

    ``path`` names a file or folder under the server's data root and is required for
    the file-based datasets (``cifar10``, ``cifar100``, ``image_folder``, ``npz``).
    """

    name: DatasetName = "digits"
    path: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    image_size: Annotated[int, Field(ge=8, le=512)] | None = Field(
        default=None, description="resize images to this side; default: 32 for digits, native else"
    )
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        default=0.2, description="held-out split for datasets without an official test split"
    )
    num_samples: Annotated[int, Field(ge=16, le=1_000_000)] = Field(
        default=2000, description="synthetic only: number of generated images"
    )
    num_classes: Annotated[int, Field(ge=2, le=1000)] = Field(
        default=10, description="synthetic only: number of generated classes"
    )

    @field_validator("path")
    @classmethod
    def _path_inside_root(cls, v: str | None) -> str | None:
        return None if v is None else check_relative_data_path(v)

    @model_validator(mode="after")
    def _path_required_for_files(self) -> DatasetSpec:
        if self.name in FILE_DATASETS and self.path is None:
            raise ValueError(f"dataset '{self.name}' needs a 'path' under the data root")
        return self


class OptimizerSpec(_Spec):
    name: Literal["lars", "sgd", "adamw"] = "lars"
    lr: Annotated[float, Field(gt=0.0, le=100.0)] = 0.3
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 1e-6
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    lr_scaling: Literal["linear", "sqrt", "none"] = Field(
        default="linear", description="lr is scaled by batch/256 (linear) or sqrt(batch/256)"
    )
    warmup_epochs: Annotated[int, Field(ge=0, le=MAX_EPOCHS)] = 0
    grad_clip: Annotated[float, Field(gt=0.0, le=1e6)] | None = None


# LDReg's defaults when the spec leaves them out; both are fitted to the run
# (PretrainSpec._fit_ldreg_defaults), so an omitted field can never make a spec invalid.
DEFAULT_LDREG_K = 64
DEFAULT_LDREG_WARMUP = 10


class LDRegSpec(_Spec):
    """The LDReg term: ``alpha * mean(-|ln LID|)`` over the chosen target."""

    alpha: Annotated[float, Field(ge=0.0, le=10.0)] | None = Field(
        default=None, description="None → the method's official default"
    )
    k: Annotated[int, Field(ge=2, le=4096)] = Field(
        default=DEFAULT_LDREG_K,
        description=f"neighbours per sample; when omitted, {DEFAULT_LDREG_K} capped at"
        " batch_size - 1 (the neighbours come from the batch)",
    )
    estimator: Literal["mom", "mle"] = "mom"
    target: Literal["features", "projections"] = "features"
    form: Literal["l1", "log"] = "l1"
    warmup_epochs: Annotated[int, Field(ge=0, le=MAX_EPOCHS)] = Field(
        default=DEFAULT_LDREG_WARMUP,
        description="epochs trained without the term first; when omitted, a tenth of the"
        f" run, at most {DEFAULT_LDREG_WARMUP}; must be below epochs",
    )


class EvalSpec(_Spec):
    lid_k: list[Annotated[int, Field(ge=2, le=4096)]] = Field(
        default_factory=lambda: [32, 512], max_length=16
    )
    every_epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 1
    knn_k: list[Annotated[int, Field(ge=1, le=1000)]] = Field(
        default_factory=lambda: [20, 200], max_length=16
    )
    max_samples: Annotated[int, Field(ge=64, le=10_000_000)] = Field(
        default=5000, description="cap on eval-set size used for LID / rank / kNN"
    )
    online_probe_lr: Annotated[float, Field(gt=0.0, le=10.0)] = Field(
        default=0.1,
        description="the online probe's own constant learning rate (momentum SGD, no decay)",
    )
    online_probe_input: Literal["clean", "views"] = Field(
        default="clean",
        description="clean: the online probe learns from the backbone's eval-mode features"
        " of the un-augmented images, as it is evaluated (one extra forward without"
        " gradient); views: from the augmented training views, as solo-learn",
    )


class MethodOptions(_Spec):
    """Per-method hyper-parameters; ``None`` means the method's own default."""

    temperature: Annotated[float, Field(gt=0.0, le=100.0)] | None = None
    proj_hidden_dim: Annotated[int, Field(ge=8, le=MAX_WIDTH)] | None = None
    proj_dim: Annotated[int, Field(ge=8, le=MAX_WIDTH)] | None = None
    pred_hidden_dim: Annotated[int, Field(ge=8, le=MAX_WIDTH)] | None = None
    momentum_base: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    lambda_offdiag: Annotated[float, Field(ge=0.0, le=1000.0)] | None = None
    mask_ratio: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    patch_size: Annotated[int, Field(ge=1, le=512)] | None = None
    decoder_dim: Annotated[int, Field(ge=8, le=MAX_WIDTH)] | None = Field(
        default=None, description="MAE decoder width (divisible by 4)"
    )
    decoder_depth: Annotated[int, Field(ge=1, le=32)] | None = Field(
        default=None, description="MAE decoder blocks"
    )


MAX_PRIORITY = 10


class ResourcesSpec(_Spec):
    """What a job needs from a worker, and how the scheduler treats it
    (docs/operations.md, "Scheduling"). ``gpus`` is the same number as a pretrain
    spec's ``devices`` (one sets the other)."""

    gpus: Annotated[int, Field(ge=1, le=64)] | None = Field(
        default=None, description="devices (GPUs, or CPU processes) on one worker; = devices"
    )
    memory_gb: Annotated[float, Field(gt=0, le=100_000)] | None = Field(
        default=None, description="host memory the job needs on its worker, when known"
    )
    priority: Annotated[int, Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] = Field(
        default=0,
        description="higher starts first (0 normal; any team may use -10..10); a job may"
        " preempt preemptible jobs of strictly lower priority",
    )
    preemptible: bool = Field(
        default=False,
        description="may be stopped for a higher-priority job; it then resumes from its"
        " last checkpoint, without using up an attempt",
    )


class PretrainSpec(_Spec):
    method: MethodName
    backbone: BackboneName = "resnet18"
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 20
    batch_size: Annotated[int, Field(ge=4, le=65_536)] = 256
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    ldreg: LDRegSpec | None = Field(default_factory=LDRegSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    method_options: MethodOptions = Field(default_factory=MethodOptions)
    width: Annotated[int, Field(ge=4, le=256)] | None = Field(
        default=None, description="ResNet base width (64 = standard); smaller for quick runs"
    )
    small_stem: bool | None = Field(
        default=None, description="3x3 conv stem, no max-pool; default on for images <= 64 px"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the training step: faster steps on a GPU after a"
        " compilation of a minute or more at the start (and at each resume)",
    )
    augment_on: Literal["auto", "loader", "device"] = Field(
        default="auto",
        description="where the two views are made: device = on the training device from"
        " uint8 batches, loader = in the loader's CPU workers; auto = device on CUDA,"
        " loader on the CPU",
    )
    checkpoint_every: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 1
    devices: Annotated[int, Field(ge=1, le=64)] = 1
    num_workers: Annotated[int, Field(ge=0, le=64)] = 0
    sync_bn: bool = Field(
        default=False, description="with devices > 1: BatchNorm statistics over the global batch"
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @model_validator(mode="before")
    @classmethod
    def _gpus_are_devices(cls, data: Any) -> Any:
        """``resources.gpus`` and ``devices`` are one number: either sets the other;
        both given must agree."""
        if not isinstance(data, dict):
            return data
        resources = data.get("resources")
        if resources is None:
            resources = {}
        if not isinstance(resources, dict):
            return data
        gpus, devices = resources.get("gpus"), data.get("devices")
        if gpus is not None and devices is not None and gpus != devices:
            raise ValueError(
                f"resources.gpus ({gpus}) and devices ({devices}) must agree: they are"
                " the same number (give one of them)"
            )
        number = gpus if gpus is not None else devices
        if number is None:
            return {**data, "resources": {**resources, "gpus": 1}}
        return {**data, "devices": number, "resources": {**resources, "gpus": number}}

    @model_validator(mode="after")
    def _fit_ldreg_defaults(self) -> PretrainSpec:
        """Omitted LDReg fields take values that fit the run: k = 64 below the batch
        size, warm-up = a tenth of the epochs up to 10. The resolved values are in the
        spec the API returns and the worker runs."""
        ldreg = self.ldreg
        if ldreg is None:
            return self
        if "k" not in ldreg.model_fields_set:
            ldreg.k = max(2, min(DEFAULT_LDREG_K, self.batch_size - 1))
        if "warmup_epochs" not in ldreg.model_fields_set:
            ldreg.warmup_epochs = min(DEFAULT_LDREG_WARMUP, self.epochs // 10)
        return self

    @model_validator(mode="after")
    def _consistent(self) -> PretrainSpec:
        if self.ldreg is not None and self.ldreg.warmup_epochs >= self.epochs:
            raise ValueError(
                f"ldreg.warmup_epochs ({self.ldreg.warmup_epochs}) must be below epochs"
                f" ({self.epochs}): LDReg would never be active. Lower the warm-up, or set"
                " ldreg to null for a baseline run"
            )
        if self.ldreg is not None and self.ldreg.k >= self.batch_size:
            raise ValueError(
                f"ldreg.k ({self.ldreg.k}) must be smaller than batch_size ({self.batch_size}):"
                " the neighbours come from the batch"
            )
        if self.batch_size % self.devices:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by devices ({self.devices}):"
                " each device trains on an equal share of the global batch"
            )
        if registry.METHODS[self.method].needs_vit:
            vits = [b for b, entry in registry.BACKBONES.items() if entry.family == "vit"]
            if self.backbone not in vits:
                raise ValueError(f"method '{self.method}' needs a ViT backbone ({', '.join(vits)})")
        return self

    @property
    def ldreg_alpha(self) -> float:
        """α in force: the spec's, or the method's official default."""
        if self.ldreg is None:
            return 0.0
        return DEFAULT_ALPHA[self.method] if self.ldreg.alpha is None else self.ldreg.alpha


class UploadSource(_Spec):
    upload_id: Text


class JobSource(_Spec):
    job_id: Text
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)


class ReferenceSpec(_Spec):
    """Where each point's neighbours come from in a diagnosis."""

    mode: Literal["full", "sample", "approximate"] = Field(
        default="full",
        description="full: exact k-NN among all points; sample: a random subset of 'size'"
        " points (LIDs at a coarser scale); approximate: faiss IVF-Flat over all points",
    )
    size: Annotated[int, Field(ge=16, le=100_000_000)] | None = Field(
        default=None, description="sample mode: number of reference points"
    )
    nprobe: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=16, description="approximate mode: index cells scanned per query"
    )

    @model_validator(mode="after")
    def _size_for_sample(self) -> ReferenceSpec:
        if self.mode == "sample" and self.size is None:
            raise ValueError("reference mode 'sample' needs 'size' (number of reference points)")
        return self


Estimator = Literal["mle", "mom", "tle"]


def _default_estimators() -> list[Estimator]:
    return ["mle", "mom"]


class DiagnoseSpec(_Spec):
    source: UploadSource | JobSource
    k: list[Annotated[int, Field(ge=2, le=4096)]] = Field(
        default_factory=lambda: [32, 64, 512], max_length=16
    )
    estimators: list[Estimator] = Field(default_factory=_default_estimators, max_length=3)
    reference: ReferenceSpec = Field(default_factory=ReferenceSpec)
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    collapse_threshold: Annotated[float, Field(gt=0.0, le=10.0)] = Field(
        default=1.0,
        description="local-collapse alarm: a point is flagged when its LID is more than this"
        " many Fisher-Rao units (|ln a - ln b|) below the geometric mean; 1 = LID < gmean/e",
    )

    @field_validator("k", "estimators")
    @classmethod
    def _non_empty_unique(cls, v: list) -> list:
        if not v:
            raise ValueError("must name at least one value")
        if len(set(v)) != len(v):
            raise ValueError("values must be unique")
        return v


JobKind = Literal["pretrain", "diagnose"]
SPEC_MODELS: dict[str, type[_Spec]] = {"pretrain": PretrainSpec, "diagnose": DiagnoseSpec}
