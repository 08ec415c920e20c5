"""Datasets, two-view SSL augmentation and reproducible loaders.

Every dataset yields ``(uint8 image (3, S, S), int label)`` at one square size ``S``;
augmentation and normalisation happen in the loaders. File-based datasets resolve
their path under the server's data root and never outside it (symlinks included).

The two views are made by :class:`BatchViewAugment`: torchvision's augmentation
operations vectorised over a batch with per-sample random parameters drawn from an
explicit generator (:func:`view_augmentations` holds each recipe's parameters). It is
an order of magnitude faster than per-sample transforms on small images, and its
randomness is a pure function of ``(seed, epoch, rank, batch index)``, so a resumed
epoch reproduces the uninterrupted one exactly, whatever the number of loader workers.
Its colour and blur operations are tested against torchvision's.

Usage::

    bundle = build_datasets(DatasetSpec(name="digits"), data_root=Path("/data"))
    loader = make_ssl_loader(bundle.train, kind="simclr", image_size=bundle.image_size,
                             mean=bundle.mean, std=bundle.std, batch_size=256,
                             seed=0, epoch=3)
    for view1, view2, labels in loader: ...
"""

from ldreg.data.augment import (
    BatchViewAugment,
    ViewAugmentation,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augmentation_recipe,
    gaussian_blur,
    hsv_to_rgb,
    rgb_to_hsv,
    simclr_jitter_strength,
    solarize,
    view_augmentations,
)
from ldreg.data.datasets import (
    DatasetBundle,
    TensorImageDataset,
    build_datasets,
    fetch_batch,
    generate_synthetic,
    load_digits_images,
    resolve_data_path,
)
from ldreg.data.loaders import (
    EpochBatchSampler,
    derive_seed,
    make_eval_loader,
    make_ssl_loader,
)

__all__ = [
    "BatchViewAugment",
    "DatasetBundle",
    "EpochBatchSampler",
    "TensorImageDataset",
    "ViewAugmentation",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "augmentation_recipe",
    "build_datasets",
    "derive_seed",
    "fetch_batch",
    "gaussian_blur",
    "generate_synthetic",
    "hsv_to_rgb",
    "load_digits_images",
    "make_eval_loader",
    "make_ssl_loader",
    "resolve_data_path",
    "rgb_to_hsv",
    "simclr_jitter_strength",
    "solarize",
    "view_augmentations",
]
