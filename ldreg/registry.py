"""The one list of names: SSL methods, backbones and datasets, with their facts.

Everything that names a method, a backbone or a dataset derives from here: the spec's
allowed values (``ldreg/spec.py``, and so the OpenAPI schema and the dashboard's
choices, which the dashboard reads from the API), each method's official LDReg α,
augmentation recipe and LDReg form, the builders in ``ldreg.methods`` and
``ldreg.backbones``, and the API's size estimates. No torch here: the API imports it.

Adding a method is one file in ``ldreg/methods/`` and one ``MethodEntry`` below
(CONTRIBUTING.md); ``tests/test_registry.py`` fails if anything drifts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AugmentationRecipe = Literal["simclr", "byol", "mae"]
LDRegReduction = Literal["mean", "sum_views"]


@dataclass(frozen=True)
class Heads:
    """A method's default heads (``method_options`` override each): the projector's
    hidden and output widths and its Linear layers, the predictor's hidden width (0:
    none), whether it keeps a momentum copy of backbone and projector, and MAE's
    decoder."""

    proj_hidden: int = 0
    proj_dim: int = 0
    proj_layers: int = 0
    pred_hidden: int = 0
    momentum_copy: bool = False
    decoder_dim: int = 0
    decoder_depth: int = 0


@dataclass(frozen=True)
class MethodEntry:
    """An SSL method.

    Attributes:
        name: the spec's ``method``.
        implementation: ``module:Class`` of its ``SSLMethod``, imported when built.
        default_alpha: the official LDReg α (Huang et al. 2024, the authors' configs);
            methods without one take the closest official method's (docs/science.md).
        augmentation: the two-view recipe it trains on (``ldreg.data``).
        ldreg_reduction: how the LDReg term combines the two views' rows ("mean": over
            all rows, the authors' SimCLR and MAE; "sum_views": per view, summed, the
            authors' BYOL).
        heads: its default heads (:class:`Heads`).
        needs_vit: trains only on a ViT backbone (MAE masks patches).
        summary: one line for people.
    """

    name: str
    implementation: str
    default_alpha: float
    augmentation: AugmentationRecipe
    ldreg_reduction: LDRegReduction
    heads: Heads
    summary: str
    needs_vit: bool = False


@dataclass(frozen=True)
class BackboneEntry:
    """A backbone: a ResNet (``blocks`` per stage, ``bottleneck``) or a ViT (``dim``,
    ``depth``, ``heads``; Dosovitskiy et al. 2021, Table 1; DeiT for tiny/small)."""

    name: str
    family: Literal["resnet", "vit"]
    parameters: float  # at ResNet width 64; for the API's size estimates
    blocks: tuple[int, ...] = ()
    bottleneck: bool = False
    dim: int = 0
    depth: int = 0
    heads: int = 0


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset: ``file_based`` ones name a ``path`` under the data root; ``images`` is
    how many it holds when that is known without reading it."""

    name: str
    file_based: bool
    native_size: int | None  # None: the files' own size
    summary: str
    images: int | None = None


METHODS: dict[str, MethodEntry] = {
    m.name: m
    for m in (
        MethodEntry(
            "simclr",
            "ldreg.methods.simclr:SimCLR",
            0.01,
            "simclr",
            "mean",
            Heads(proj_hidden=2048, proj_dim=128, proj_layers=2),
            "SimCLR (Chen et al. 2020): NT-Xent over the batch's two views",
        ),
        MethodEntry(
            "byol",
            "ldreg.methods.byol:BYOL",
            0.005,
            "byol",
            "sum_views",
            Heads(
                proj_hidden=4096, proj_dim=256, proj_layers=2, pred_hidden=4096, momentum_copy=True
            ),
            "BYOL (Grill et al. 2020): predict an EMA target's projection",
        ),
        MethodEntry(
            "moco_v3",
            "ldreg.methods.moco_v3:MoCoV3",
            0.005,
            "byol",
            "sum_views",
            Heads(
                proj_hidden=4096, proj_dim=256, proj_layers=2, pred_hidden=4096, momentum_copy=True
            ),
            "MoCo v3 (Chen et al. 2021): contrast queries with a momentum encoder's keys",
        ),
        MethodEntry(
            "barlow_twins",
            "ldreg.methods.barlow_twins:BarlowTwins",
            0.01,
            "byol",
            "mean",
            Heads(proj_hidden=2048, proj_dim=2048, proj_layers=3),
            "Barlow Twins (Zbontar et al. 2021): cross-correlation towards the identity",
        ),
        MethodEntry(
            "vicreg",
            "ldreg.methods.vicreg:VICReg",
            0.01,
            "byol",
            "mean",
            Heads(proj_hidden=2048, proj_dim=2048, proj_layers=3),
            "VICReg (Bardes et al. 2022): variance, invariance and covariance terms",
        ),
        MethodEntry(
            "mae",
            "ldreg.methods.mae:MAE",
            5e-6,
            "mae",
            "mean",
            Heads(decoder_dim=128, decoder_depth=2),
            "MAE (He et al. 2022): reconstruct masked patches; LDReg on the CLS token",
            needs_vit=True,
        ),
    )
}

BACKBONES: dict[str, BackboneEntry] = {
    b.name: b
    for b in (
        BackboneEntry("resnet18", "resnet", 11.2e6, blocks=(2, 2, 2, 2)),
        BackboneEntry("resnet50", "resnet", 23.5e6, blocks=(3, 4, 6, 3), bottleneck=True),
        BackboneEntry("vit_tiny", "vit", 5.5e6, dim=192, depth=12, heads=3),
        BackboneEntry("vit_small", "vit", 21.7e6, dim=384, depth=12, heads=6),
        BackboneEntry("vit_base", "vit", 85.8e6, dim=768, depth=12, heads=12),
    )
}

DATASETS: dict[str, DatasetEntry] = {
    d.name: d
    for d in (
        DatasetEntry("digits", False, 32, "scikit-learn's bundled 8×8 digits", images=1797),
        DatasetEntry("cifar10", True, 32, "CIFAR-10 (python version) under the data root", 60_000),
        DatasetEntry(
            "cifar100", True, 32, "CIFAR-100 (python version) under the data root", 60_000
        ),
        DatasetEntry("image_folder", True, 224, "one folder of images per class"),
        DatasetEntry("npz", True, None, "an .npz with 'images' and optional 'labels'"),
        DatasetEntry("synthetic", False, 32, "generated shapes, for tests and demos"),
    )
}

ESTIMATORS = ("mle", "mom", "tle")
