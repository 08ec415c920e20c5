"""Datasets, two-view SSL augmentation and reproducible loaders.

Every dataset yields ``(uint8 image (3, S, S), int label)`` at one square size ``S``;
augmentation and normalisation happen in the loaders. File-based datasets resolve
their path under the server's data root and never outside it (symlinks included).

The two views are made by :class:`TwoViewAugment` (one :class:`BatchViewAugment` per
view): torchvision's augmentation operations vectorised over a batch with per-sample
random parameters drawn from an explicit generator (:func:`view_augmentations` holds
each recipe's parameters, :func:`draw_view_params` draws them). Their randomness is a
pure function of ``(seed, epoch, rank, batch index)``, so a resumed epoch reproduces the
uninterrupted one exactly, whatever the number of loader workers and wherever the views
are made: in the loader's workers (the default), or on the training device from the raw
batches of ``make_ssl_loader(augment_on="device")``. The operations are tested against
torchvision's. Image folders are cropped from their full decoded images.

Usage::

    bundle = build_datasets(DatasetSpec(name="digits"), data_root=Path("/data"))
    loader = make_ssl_loader(bundle.train, kind="simclr", image_size=bundle.image_size,
                             mean=bundle.mean, std=bundle.std, batch_size=256,
                             seed=0, epoch=3)
    for view1, view2, labels in loader: ...

    # or on the GPU:
    loader = make_ssl_loader(..., augment_on="device", pin_memory=True, num_workers=4)
    augment = TwoViewAugment("simclr", bundle.image_size, bundle.mean, bundle.std)
    for images, labels, seed in loader:
        view1, view2, _ = augment(images, seed, device="cuda")
"""

from ldreg.data.augment import (
    AugmentedViews,
    BatchViewAugment,
    TwoViewAugment,
    ViewAugmentation,
    ViewParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augmentation_recipe,
    draw_view_params,
    gaussian_blur,
    gaussian_kernels,
    hsv_to_rgb,
    random_resized_crop_boxes,
    resized_crop,
    rgb_to_grayscale,
    rgb_to_hsv,
    simclr_jitter_strength,
    solarize,
    view_augmentations,
)
from ldreg.data.datasets import (
    DatasetBundle,
    EncodedImages,
    ImageFolderFiles,
    TensorImageDataset,
    build_datasets,
    decode_batch,
    fetch_batch,
    fetch_encoded,
    generate_synthetic,
    load_digits_images,
    resolve_data_path,
)
from ldreg.data.loaders import (
    EpochBatchSampler,
    RawBatch,
    derive_seed,
    make_eval_loader,
    make_ssl_loader,
)

__all__ = [
    "AugmentedViews",
    "BatchViewAugment",
    "DatasetBundle",
    "EncodedImages",
    "EpochBatchSampler",
    "ImageFolderFiles",
    "RawBatch",
    "TensorImageDataset",
    "TwoViewAugment",
    "ViewAugmentation",
    "ViewParams",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "augmentation_recipe",
    "build_datasets",
    "decode_batch",
    "derive_seed",
    "draw_view_params",
    "fetch_batch",
    "fetch_encoded",
    "gaussian_blur",
    "gaussian_kernels",
    "generate_synthetic",
    "hsv_to_rgb",
    "load_digits_images",
    "make_eval_loader",
    "make_ssl_loader",
    "random_resized_crop_boxes",
    "resized_crop",
    "resolve_data_path",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "simclr_jitter_strength",
    "solarize",
    "view_augmentations",
]
