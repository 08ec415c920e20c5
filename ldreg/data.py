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

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.transforms import v2

from ldreg import registry
from ldreg.errors import DatasetError
from ldreg.registry import AugmentationRecipe
from ldreg.spec import DatasetSpec


def augmentation_recipe(kind: str) -> AugmentationRecipe:
    """The recipe named ``kind``, or the one the method ``kind`` trains with (the
    registry: MoCo v3, Barlow Twins and VICReg adopt BYOL's asymmetric recipe)."""
    if kind in registry.METHODS:
        return registry.METHODS[kind].augmentation
    if kind in get_args(AugmentationRecipe):
        return cast(AugmentationRecipe, kind)
    raise ValueError(f"unknown augmentation kind '{kind}'; expected simclr, byol, mae or a method")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_FILES = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}
_CHUNK = 4096


# --------------------------------------------------------------------------- datasets


@dataclass
class DatasetBundle:
    """A train / held-out split of one dataset, with the statistics to normalise it.

    ``train`` and ``val`` yield ``(uint8 tensor (3, image_size, image_size), int label)``;
    ``mean`` / ``std`` are per-channel statistics of images scaled to [0, 1].
    """

    train: Dataset
    val: Dataset
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor ``(N, 3, S, S)`` with int64 labels."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 (N, 3, H, W), found {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), found {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def get_batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """One gather for a whole batch instead of ``len(indices)`` item look-ups."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def fetch_batch(dataset: Dataset, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``(uint8 images (B, 3, S, S), int64 labels (B,))`` for ``indices`` of any dataset."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.get_batch(indices)
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorImageDataset):
        return dataset.dataset.get_batch([dataset.indices[i] for i in indices])
    items = [dataset[i] for i in indices]
    return torch.stack([img for img, _ in items]), torch.tensor([int(y) for _, y in items])


def resolve_data_path(data_root: Path, relative: str | Path) -> Path:
    """Resolve ``relative`` under ``data_root``, following symlinks; refuse any escape.

    Raises ``DatasetError(code="path_outside_data_root")`` for absolute paths, ``..``
    that climbs out, and symlinks (anywhere on the path) that point outside the root.
    """
    root = Path(data_root).resolve()
    rel = Path(relative)
    if rel.is_absolute():
        raise DatasetError(
            f"dataset path '{relative}' must be relative to the data root",
            code="path_outside_data_root",
        )
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(root):
        raise DatasetError(
            f"dataset path '{relative}' leads outside the data root",
            code="path_outside_data_root",
        )
    return resolved


Triple = tuple[float, float, float]


def _channel_stats(images: Tensor) -> tuple[Triple, Triple]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], in float64 chunks."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start : start + _CHUNK].double() / 255.0
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    m, s = mean.tolist(), std.tolist()
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


def _resize_square(images: Tensor, size: int) -> Tensor:
    """uint8 ``(N, 3, H, W)`` → ``(N, 3, size, size)``: shorter side to ``size``, centre crop."""
    n, _, h, w = images.shape
    if h == size and w == size:
        return images
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        chunk = images[start : start + _CHUNK].float()
        chunk = F.interpolate(
            chunk, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )
        chunk = chunk[:, :, top : top + size, left : left + size]
        out[start : start + _CHUNK] = chunk.round().clamp(0, 255).to(torch.uint8)
    return out


def _split_indices(
    labels: np.ndarray, val_fraction: float, seed: int, *, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (seeded) stratified train / val index split, each sorted."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    n_val = max(1, round(len(labels) * val_fraction))
    if n_val >= len(labels):
        raise DatasetError(
            f"val_fraction {val_fraction} leaves no training images out of {len(labels)}",
            code="dataset_malformed",
        )
    try:
        train_idx, val_idx = train_test_split(
            index, test_size=n_val, random_state=seed, stratify=labels if stratify else None
        )
    except ValueError:
        # A class too small to appear on both sides: fall back to a plain random split.
        train_idx, val_idx = train_test_split(index, test_size=n_val, random_state=seed)
    return np.sort(train_idx), np.sort(val_idx)


def _in_memory_bundle(
    images: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    val_fraction: float,
    seed: int,
    stratify: bool = True,
) -> DatasetBundle:
    train_idx, val_idx = _split_indices(labels.numpy(), val_fraction, seed, stratify=stratify)
    train_idx_t, val_idx_t = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    train_images = images[train_idx_t]
    mean, std = _channel_stats(train_images)
    return DatasetBundle(
        train=TensorImageDataset(train_images, labels[train_idx_t]),
        val=TensorImageDataset(images[val_idx_t], labels[val_idx_t]),
        num_classes=num_classes,
        image_size=images.shape[-1],
        mean=mean,
        std=std,
    )


def load_digits_images(image_size: int = 32) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8×8 digits as uint8 RGB ``(1797, 3, S, S)`` and labels.

    Grey levels 0..16 are scaled to 0..255 and upsampled bilinearly (antialiased), which
    keeps the strokes smooth rather than blocky as nearest-neighbour would.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    if image_size != 8:
        grey = F.interpolate(
            grey,
            size=(image_size, image_size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
    images = (grey * 255.0).round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    return images, torch.from_numpy(digits.target).long()


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    """HSV in [0, 1] → RGB, channel dim 1 (Smith 1978's hexcone model, as in torchvision)."""
    h, s, v = hsv.unbind(dim=1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    r = torch.stack([v, q, p, p, t, v], dim=1).gather(1, i.unsqueeze(1))
    g = torch.stack([t, v, v, q, p, p], dim=1).gather(1, i.unsqueeze(1))
    b = torch.stack([p, p, t, v, v, q], dim=1).gather(1, i.unsqueeze(1))
    return torch.cat([r, g, b], dim=1)


def _rgb_to_hsv(rgb: Tensor) -> Tensor:
    """RGB in [0, 1] → HSV, channel dim 1 (inverse of :func:`_hsv_to_rgb`)."""
    r, g, b = rgb.unbind(dim=1)
    maxc = rgb.amax(dim=1)
    minc = rgb.amin(dim=1)
    flat = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    s = chroma / torch.where(flat, ones, maxc)
    denom = torch.where(flat, ones, chroma)
    rc, gc, bc = (maxc - r) / denom, (maxc - g) / denom, (maxc - b) / denom
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & ~is_g
    h = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    h = torch.remainder(h / 6.0 + 1.0, 1.0)
    return torch.stack([h, s, maxc], dim=1)


def generate_synthetic(
    num_samples: int, num_classes: int, image_size: int = 32, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Labelled images of coloured shapes on noisy backgrounds, a pure function of ``seed``.

    Class ``c`` fixes the shape (disk, square, diamond, ring: ``c mod 4``) and the hue
    (golden-ratio spaced, ``0.618·c mod 1``); each image draws its own position, size,
    brightness, background and pixel noise, so classes are learnable but not trivial.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % num_classes
    labels = labels[torch.randperm(num_samples, generator=generator)]
    hues = torch.remainder(torch.arange(num_classes, dtype=torch.float32) * 0.6180339887, 1.0)
    palette = _hsv_to_rgb(
        torch.stack([hues, torch.full_like(hues, 0.85), torch.ones_like(hues)], 1)
    )
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size * 2.0 - 1.0
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.empty(num_samples, 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, num_samples, _CHUNK):
        y = labels[start : start + _CHUNK]
        n = y.shape[0]
        centre = (torch.rand(n, 2, 1, 1, generator=generator) - 0.5) * 0.5
        radius = 0.35 + 0.25 * torch.rand(n, 1, 1, generator=generator)
        dx, dy = xx - centre[:, 0], yy - centre[:, 1]
        dist = (dx.square() + dy.square()).sqrt()
        shape = (y % 4).view(n, 1, 1)
        inside = torch.where(
            shape == 0,
            dist <= radius,
            torch.where(
                shape == 1,
                torch.maximum(dx.abs(), dy.abs()) <= 0.85 * radius,
                torch.where(
                    shape == 2,
                    dx.abs() + dy.abs() <= 1.2 * radius,
                    (dist - 0.7 * radius).abs() <= 0.25 * radius,
                ),
            ),
        ).unsqueeze(1)
        brightness = 0.7 + 0.3 * torch.rand(n, 1, 1, 1, generator=generator)
        foreground = palette[y].view(n, 3, 1, 1) * brightness
        background = 0.3 * torch.rand(n, 3, 1, 1, generator=generator)
        noise = 0.08 * torch.randn(n, 3, image_size, image_size, generator=generator)
        img = torch.where(inside, foreground, background) + noise
        images[start : start + n] = (img.clamp(0, 1) * 255.0).round().to(torch.uint8)
    return images, labels


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's numpy batches and nothing else: pickle can run arbitrary code."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load '{module}.{name}'")
        if module == "numpy.core.multiarray" and hasattr(np, "_core"):
            module = "numpy._core.multiarray"  # NumPy 2 moved it; old pickles name the old one
        return super().find_class(module, name)


def _load_cifar_batch(path: Path, label_key: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            entry = _RestrictedUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DatasetError(
            f"{what} is not a CIFAR python batch: {e}", code="dataset_malformed"
        ) from e
    if not isinstance(entry, dict):
        raise DatasetError(
            f"{what} is not a CIFAR python batch (no dict)", code="dataset_malformed"
        )
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data, labels = entry.get("data"), entry.get(label_key)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        raise DatasetError(
            f"{what}: expected 'data' as uint8 (N, 3072), found "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}",
            code="dataset_malformed",
        )
    labels_arr = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels_arr.shape != (data.shape[0],):
        raise DatasetError(
            f"{what}: expected '{label_key}' with {data.shape[0]} entries", code="dataset_malformed"
        )
    return data.reshape(-1, 3, 32, 32), labels_arr


def _build_cifar(spec: DatasetSpec, base: Path) -> DatasetBundle:
    folder, train_files, test_files, label_key, num_classes = CIFAR_FILES[spec.name]
    directory = base / folder if (base / folder).is_dir() else base
    expected = train_files + test_files
    missing = [name for name in expected if not (directory / name).is_file()]
    if missing:
        listing = (
            f"{expected[0]}..{expected[-2][-1]} and {expected[-1]}"
            if len(expected) > 2
            else " and ".join(expected)
        )
        raise DatasetError(
            f"{spec.name} expects {listing} (torchvision's python format) under "
            f"'{spec.path}' or '{spec.path}/{folder}'; missing: {', '.join(missing)}",
            code="dataset_not_found",
        )

    def load(files: list[str]) -> tuple[Tensor, Tensor]:
        parts = [
            _load_cifar_batch(directory / name, label_key, f"{spec.path}/{name}") for name in files
        ]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise DatasetError(
                f"{spec.name} labels must lie in [0, {num_classes}), found "
                f"[{int(labels.min())}, {int(labels.max())}]",
                code="dataset_malformed",
            )
        return _resize_square(images, spec.image_size or 32), labels

    train_images, train_labels = load(train_files)
    val_images, val_labels = load(test_files)
    mean, std = _channel_stats(train_images)
    return DatasetBundle(
        train=TensorImageDataset(train_images, train_labels),
        val=TensorImageDataset(val_images, val_labels),
        num_classes=num_classes,
        image_size=train_images.shape[-1],
        mean=mean,
        std=std,
    )


def _build_npz(spec: DatasetSpec, path: Path, seed: int) -> DatasetBundle:
    if not path.is_file():
        raise DatasetError(
            f"npz dataset expects a .npz file at '{spec.path}' under the data root",
            code="dataset_not_found",
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(
            f"'{spec.path}' is not a readable .npz archive (pickled objects are refused): {e}",
            code="dataset_malformed",
        ) from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(
            f"'{spec.path}' is a single array; npz expects an archive with an 'images' array"
            " (and optionally 'labels')",
            code="dataset_malformed",
        )
    with archive:
        if "images" not in archive.files:
            raise DatasetError(
                f"'{spec.path}' has arrays {archive.files}; npz expects 'images' (N, H, W[, C])",
                code="dataset_malformed",
            )
        try:
            raw = archive["images"]
            raw_labels = archive["labels"] if "labels" in archive.files else None
        except ValueError as e:  # object arrays need pickle, which is refused
            raise DatasetError(f"'{spec.path}': {e}", code="dataset_malformed") from e
    if raw.ndim == 3:
        raw = raw[..., None]
    if raw.ndim != 4 or raw.shape[-1] not in (1, 3) or raw.shape[0] < 2:
        raise DatasetError(
            f"'{spec.path}': 'images' must be (N, H, W) or (N, H, W, C) with C in (1, 3) and"
            f" N >= 2, found shape {raw.shape}",
            code="dataset_malformed",
        )
    if raw.dtype == np.uint8:
        images = torch.from_numpy(np.ascontiguousarray(raw))
    elif np.issubdtype(raw.dtype, np.floating):
        if not np.isfinite(raw).all() or raw.min() < 0.0 or raw.max() > 1.0:
            raise DatasetError(
                f"'{spec.path}': float 'images' must be finite and in [0, 1]",
                code="dataset_malformed",
            )
        images = torch.from_numpy((raw * 255.0).round().astype(np.uint8))
    else:
        raise DatasetError(
            f"'{spec.path}': 'images' must be uint8 or float in [0, 1], found {raw.dtype}",
            code="dataset_malformed",
        )
    images = images.permute(0, 3, 1, 2)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    h, w = images.shape[-2:]
    if spec.image_size is None and h != w:
        raise DatasetError(
            f"'{spec.path}': images are {h}x{w}; set dataset.image_size to train on square crops",
            code="dataset_malformed",
        )
    images = _resize_square(images.contiguous(), spec.image_size or h)

    if raw_labels is None:
        labels = torch.zeros(images.shape[0], dtype=torch.long)
    else:
        if (
            raw_labels.shape != (images.shape[0],)
            or not np.issubdtype(raw_labels.dtype, np.integer)
            or (raw_labels.size and raw_labels.min() < 0)
        ):
            raise DatasetError(
                f"'{spec.path}': 'labels' must be non-negative integers of shape"
                f" ({images.shape[0]},), found {raw_labels.dtype} {raw_labels.shape}",
                code="dataset_malformed",
            )
        labels = torch.from_numpy(raw_labels.astype(np.int64))
    return _in_memory_bundle(
        images,
        labels,
        num_classes=int(labels.max()) + 1,
        val_fraction=spec.val_fraction,
        seed=seed,
        stratify=raw_labels is not None,
    )


class _LoadSquareRGB:
    """PIL image → uint8 ``(3, S, S)``: RGB, shorter side to ``S``, centre crop."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Any) -> Tensor:
        tensor = v2.functional.pil_to_tensor(image.convert("RGB"))
        tensor = v2.functional.resize(tensor, self.size, antialias=True)
        return v2.functional.center_crop(tensor, [self.size, self.size])


def _build_image_folder(spec: DatasetSpec, path: Path, seed: int) -> DatasetBundle:
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise DatasetError(
            f"image_folder expects a folder '{spec.path}' under the data root with class"
            " sub-folders (or train/ and val/ each holding class sub-folders)",
            code="dataset_not_found",
        )
    size = spec.image_size or 224
    load = _LoadSquareRGB(size)
    try:
        if (path / "train").is_dir() and (path / "val").is_dir():
            train = ImageFolder(str(path / "train"), transform=load)
            val = ImageFolder(str(path / "val"), transform=load)
            if train.classes != val.classes:
                raise DatasetError(
                    f"'{spec.path}': train/ and val/ have different class folders",
                    code="dataset_malformed",
                )
        else:
            full = ImageFolder(str(path), transform=load)
            train_idx, val_idx = _split_indices(np.asarray(full.targets), spec.val_fraction, seed)
            train, val = Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist())
            train.classes = full.classes  # type: ignore[attr-defined]
    except FileNotFoundError as e:
        raise DatasetError(
            f"image_folder '{spec.path}': {e}; expected <class>/<image> files (or train/ and"
            " val/ folders of them)",
            code="dataset_malformed",
        ) from e
    return DatasetBundle(
        train=train,
        val=val,
        num_classes=len(train.classes),
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def build_datasets(spec: DatasetSpec, *, data_root: Path, seed: int = 0) -> DatasetBundle:
    """Load the dataset ``spec`` names and split it into train and held-out sets.

    * ``digits``: scikit-learn's bundled 8×8 digits upsampled to ``image_size`` (32);
      seeded stratified split by ``val_fraction``.
    * ``synthetic``: :func:`generate_synthetic` images (``image_size`` 32), seeded split.
    * ``cifar10`` / ``cifar100``: torchvision's python pickles under ``path`` (or its
      ``cifar-10-batches-py`` / ``cifar-100-python`` sub-folder); official train/test
      split; never downloads.
    * ``image_folder``: ``path/train`` and ``path/val`` of class sub-folders, or a single
      folder of class sub-folders split by ``val_fraction``; images are resized to
      ``image_size`` (224) and normalised with ImageNet statistics.
    * ``npz``: ``images`` (N, H, W[, C]) uint8 or float in [0, 1], optional integer
      ``labels``; loaded with ``allow_pickle=False``; seeded split by ``val_fraction``.
    """
    if spec.name == "digits":
        images, labels = load_digits_images(spec.image_size or 32)
        return _in_memory_bundle(
            images, labels, num_classes=10, val_fraction=spec.val_fraction, seed=seed
        )
    if spec.name == "synthetic":
        images, labels = generate_synthetic(
            spec.num_samples, spec.num_classes, spec.image_size or 32, seed
        )
        return _in_memory_bundle(
            images,
            labels,
            num_classes=spec.num_classes,
            val_fraction=spec.val_fraction,
            seed=seed,
        )
    if spec.path is None:
        raise DatasetError(f"dataset '{spec.name}' needs a 'path' under the data root")
    path = resolve_data_path(data_root, spec.path)
    if spec.name in CIFAR_FILES:
        if not path.is_dir():
            raise DatasetError(
                f"{spec.name} expects a folder '{spec.path}' under the data root holding"
                f" torchvision's '{CIFAR_FILES[spec.name][0]}' files",
                code="dataset_not_found",
            )
        return _build_cifar(spec, path)
    if spec.name == "npz":
        return _build_npz(spec, path, seed)
    if spec.name == "image_folder":
        return _build_image_folder(spec, path, seed)
    raise DatasetError(f"unknown dataset '{spec.name}'")


# ----------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class ViewAugmentation:
    """One view's augmentation parameters (:class:`BatchViewAugment` applies them).

    Attributes:
        crop_scale: area range of RandomResizedCrop (aspect ratio 3/4..4/3).
        flip_p: horizontal-flip probability.
        jitter: (brightness, contrast, saturation, hue) strengths; ``None`` = no jitter.
        jitter_p / gray_p: probabilities of colour jitter and of grayscale.
        blur_p: Gaussian-blur probability, kernel ``blur_kernel`` px with σ in
            ``blur_sigma`` px (both scaled from 224 px by the image size).
        solarize_p: probability of solarization at half intensity.
    """

    image_size: int
    crop_scale: tuple[float, float]
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] | None = None
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_kernel: int = 0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


def simclr_jitter_strength(image_size: int) -> float:
    """SimCLR's colour-jitter strength s: 0.5 for CIFAR-size images, 1.0 from 64 px
    (Chen et al. 2020, Appendix A and B.9)."""
    return 0.5 if image_size < 64 else 1.0


def view_augmentations(kind: str, image_size: int) -> tuple[ViewAugmentation, ViewAugmentation]:
    """The two views' augmentations for ``kind`` (``simclr``, ``byol``, ``mae`` or a method).

    SimCLR (Chen et al. 2020, Appendix A): crop (0.08, 1), flip, colour jitter
    (0.8s, 0.8s, 0.8s, 0.2s) p=0.8 with strength s = 1 at ImageNet size and s = 0.5 at
    CIFAR size (their Appendix B.9; here s = 0.5 below 64 px), grayscale p=0.2, blur
    p=0.5. BYOL (Grill et al. 2020, Table 6): jitter (0.4, 0.4, 0.2, 0.1), blur p=1.0 /
    0.1 and solarize p=0 / 0.2 on the two views. MAE (He et al. 2022, A.1): crop
    (0.2, 1) and flip only. Scaled to the image: crops keep ≥ 20 % of images under 32 px
    (an 8 % crop of a 16 px image is ~4 px), and blur — SimCLR drops it for CIFAR — only
    runs from 64 px, with a kernel of 10 % of the side and σ scaled from 224 px.
    """
    recipe = augmentation_recipe(kind)
    if recipe == "mae":
        view = ViewAugmentation(image_size=image_size, crop_scale=(0.2, 1.0))
        return view, view
    crop_scale = (0.08, 1.0) if image_size >= 32 else (0.2, 1.0)
    blur = image_size >= 64
    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    sigma = (0.1 * image_size / 224, 2.0 * image_size / 224)
    common = ViewAugmentation(
        image_size=image_size,
        crop_scale=crop_scale,
        jitter_p=0.8,
        gray_p=0.2,
        blur_kernel=kernel,
        blur_sigma=sigma,
    )
    if recipe == "simclr":
        strength = simclr_jitter_strength(image_size)
        jitter = (0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
        view = replace(common, jitter=jitter, blur_p=0.5 if blur else 0.0)
        return view, view
    jitter = (0.4, 0.4, 0.2, 0.1)
    return (
        replace(common, jitter=jitter, blur_p=1.0 if blur else 0.0),
        replace(common, jitter=jitter, blur_p=0.1 if blur else 0.0, solarize_p=0.2),
    )


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


# The colour operations of ColorJitter, RandomGrayscale, GaussianBlur and RandomSolarize
# with torchvision's definitions, batched with one factor per image; each is tested
# against ``torchvision.transforms.v2.functional`` (tests/test_data.py).


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Scale by ``factor`` (one per image, ``(B, 1, 1, 1)``)."""
    return (x * factor).clamp(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with each image's mean grey level."""
    return (factor * x + (1 - factor) * _grey(x).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the image's grey version."""
    return (factor * x + (1 - factor) * _grey(x)).clamp(0, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5])."""
    hsv = _rgb_to_hsv(x.clamp(0, 1))
    hsv[:, 0] = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(hsv).clamp(0, 1)


def gaussian_blur(x: Tensor, kernel_size: int, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur, one ``sigma`` per image, reflect padding."""
    m, _, h, w = x.shape
    offsets = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    kernel = torch.exp(-offsets.square() / (2 * sigma.view(-1, 1).float().cpu().square()))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0).to(x.device)
    flat = x.reshape(1, m * 3, h, w)
    pad = kernel_size // 2
    flat = F.conv2d(
        F.pad(flat, (pad, pad, 0, 0), mode="reflect"),
        kernel.view(m * 3, 1, 1, kernel_size),
        groups=m * 3,
    )
    flat = F.conv2d(
        F.pad(flat, (0, 0, pad, pad), mode="reflect"),
        kernel.view(m * 3, 1, kernel_size, 1),
        groups=m * 3,
    )
    return flat.view(m, 3, h, w)


def solarize(x: Tensor) -> Tensor:
    """Invert the pixels at or above half intensity."""
    return torch.where(x >= 0.5, 1.0 - x, x)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _grey(x: Tensor) -> Tensor:
    """ITU-R 601 luma, torchvision's grayscale weights; ``(B, 3, H, W)`` → ``(B, 1, H, W)``."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


class BatchViewAugment:
    """One view's augmentation vectorised over a batch, per-sample random parameters.

    torchvision's operations (RandomResizedCrop's sampling, ColorJitter in a random
    order per image, RandomGrayscale, GaussianBlur, RandomSolarize) with every random
    number drawn from the ``generator`` it is given, so the result is a pure function of
    the images and the generator's seed. Works on CPU or GPU tensors; parameters are
    drawn on CPU.
    """

    def __init__(self, view: ViewAugmentation, mean: Sequence[float], std: Sequence[float]) -> None:
        self.view = view
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """uint8 (or [0, 1] float) ``(B, 3, H, W)`` → normalised float ``(B, 3, S, S)``."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        device = x.device
        view = self.view
        n = x.shape[0]
        x = self._resized_crop_flip(x, generator)
        if view.jitter is not None and view.jitter_p > 0:
            x = self._color_jitter(x, generator)
        if view.gray_p > 0:
            gray = (torch.rand(n, generator=generator) < view.gray_p).to(device)
            x = torch.where(gray.view(n, 1, 1, 1), _grey(x).expand_as(x), x)
        if view.blur_p > 0:
            x = self._blur(x, generator)
        if view.solarize_p > 0:
            sol = (torch.rand(n, generator=generator) < view.solarize_p).to(device).view(n, 1, 1, 1)
            x = torch.where(sol, solarize(x), x)
        return (x - self.mean.to(device)) / self.std.to(device)

    def _resized_crop_flip(self, x: Tensor, generator: torch.Generator) -> Tensor:
        # RandomResizedCrop's sampling (Szegedy et al. 2015; torchvision): up to 10 tries
        # of (area, log-uniform aspect ratio) that fit, else the whole image.
        n, _, h, w = x.shape
        size = self.view.image_size
        tries = 10
        area = h * w * _uniform(n * tries, *self.view.crop_scale, generator).view(n, tries)
        log_ratio = _uniform(n * tries, math.log(3 / 4), math.log(4 / 3), generator).view(n, tries)
        ratio = log_ratio.exp()
        cw, ch = (area * ratio).sqrt(), (area / ratio).sqrt()
        fits = (cw <= w) & (ch <= h)
        first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1), torch.full((n,), -1))
        pick = first.clamp_min(0).unsqueeze(1)
        cw = torch.where(first >= 0, cw.gather(1, pick).squeeze(1), torch.full((n,), float(w)))
        ch = torch.where(first >= 0, ch.gather(1, pick).squeeze(1), torch.full((n,), float(h)))
        left = torch.rand(n, generator=generator) * (w - cw)
        top = torch.rand(n, generator=generator) * (h - ch)
        flip = torch.rand(n, generator=generator) < self.view.flip_p
        # affine_grid maps output [-1, 1] to input [-1, 1] (align_corners=False: pixel edges).
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = torch.where(flip, -cw / w, cw / w)
        theta[:, 0, 2] = (2 * left + cw) / w - 1
        theta[:, 1, 1] = ch / h
        theta[:, 1, 2] = (2 * top + ch) / h - 1
        grid = F.affine_grid(theta.to(x.device), [n, 3, size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _color_jitter(self, x: Tensor, generator: torch.Generator) -> Tensor:
        # ColorJitter (torchvision's definitions): brightness scales, contrast and
        # saturation blend with the mean grey / the grey image, hue rotates in HSV; the
        # four run in a random order per image, each clamped to [0, 1].
        n = x.shape[0]
        b, c, s, hue = self.view.jitter  # type: ignore[misc]
        apply = torch.rand(n, generator=generator) < self.view.jitter_p
        factors = torch.stack(
            [
                _uniform(n, max(0.0, 1 - b), 1 + b, generator),
                _uniform(n, max(0.0, 1 - c), 1 + c, generator),
                _uniform(n, max(0.0, 1 - s), 1 + s, generator),
                _uniform(n, -hue, hue, generator),
            ],
            dim=1,
        )
        order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)
        factors = factors.to(x.device)
        for position in range(4):
            for op in range(4):
                selected = torch.nonzero(apply & (order[:, position] == op)).squeeze(1).to(x.device)
                if selected.numel() == 0:
                    continue
                sub, f = x[selected], factors[selected, op].view(-1, 1, 1, 1)
                x = x.index_copy(0, selected, _JITTER_OPS[op](sub, f))
        return x

    def _blur(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n = x.shape[0]
        apply = torch.rand(n, generator=generator) < self.view.blur_p
        sigma = _uniform(n, *self.view.blur_sigma, generator)
        selected = torch.nonzero(apply).squeeze(1)
        if selected.numel() == 0:
            return x
        sub = gaussian_blur(x[selected.to(x.device)], self.view.blur_kernel, sigma[selected])
        return x.index_copy(0, selected.to(x.device), sub)


# --------------------------------------------------------------------------- loaders


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (NumPy's SeedSequence hashing)."""
    state = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches for one epoch of one rank, each index paired with its batch seed.

    The permutation depends only on ``(seed, epoch)`` — identical on every rank — and is
    padded and strided like ``DistributedSampler`` so every rank gets an equal, disjoint
    shard. Each batch carries ``derive_seed(seed, epoch, rank, batch_index)`` for its
    augmentation, so loader workers and resumption cannot change what a batch contains.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.drop_last = drop_last
        self.shard_size = math.ceil(num_samples / world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.shard_size // self.batch_size
        return math.ceil(self.shard_size / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        total = self.shard_size * self.world_size
        if total > self.num_samples:
            order = torch.cat([order, order[: total - self.num_samples]])
        shard = order[self.rank : total : self.world_size].tolist()
        for batch_index in range(len(self)):
            batch = shard[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            batch_seed = derive_seed(self.seed, self.epoch, self.rank, batch_index)
            yield [(index, batch_seed) for index in batch]


class _TwoViewBatches(Dataset):
    """Fetches and augments a whole batch in one ``__getitems__`` call (in the worker)."""

    def __init__(
        self,
        dataset: Dataset,
        augments: tuple[BatchViewAugment, BatchViewAugment],
        clean: _NormalisedBatches | None = None,
    ) -> None:
        self.dataset = dataset
        self.augments = augments
        self.clean = clean

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, ...]:
        return self.__getitems__([item])

    def __getitems__(self, items: list[tuple[int, int]]) -> tuple[Tensor, ...]:
        images, labels = fetch_batch(self.dataset, [index for index, _ in items])
        generator = torch.Generator().manual_seed(items[0][1])
        views = self.augments[0](images, generator), self.augments[1](images, generator)
        if self.clean is None:
            return (*views, labels)
        return (*views, labels, self.clean.normalise(images))


class _NormalisedBatches(Dataset):
    def __init__(self, dataset: Dataset, mean: Sequence[float], std: Sequence[float]) -> None:
        self.dataset = dataset
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        images, labels = fetch_batch(self.dataset, indices)
        return self.normalise(images), labels

    def normalise(self, images: Tensor) -> Tensor:
        return (images.float() / 255.0 - self.mean) / self.std


def _batch_as_is(batch: Any) -> Any:
    return batch


def make_ssl_loader(
    dataset: Dataset,
    *,
    kind: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    seed: int,
    epoch: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
    with_clean: bool = False,
) -> DataLoader:
    """A loader of ``(view1, view2, labels)`` batches for one epoch of one rank.

    With ``with_clean`` each batch also carries the un-augmented, normalised images
    (``(view1, view2, labels, clean)``), the input of the online probe.

    Shuffling and augmentation are a pure function of ``(seed, epoch, rank)`` (see
    :class:`EpochBatchSampler`), so rebuilding the loader for a resumed epoch yields the
    very same batches. Raises ``DatasetError`` when ``drop_last`` would leave no batch.
    """
    sampler = EpochBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        batch_size=batch_size,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
    )
    if len(sampler) == 0:
        raise DatasetError(
            f"batch_size {batch_size} exceeds the {sampler.shard_size} training images per"
            f" device; lower batch_size or use a larger dataset",
            code="batch_larger_than_dataset",
        )
    first, second = view_augmentations(kind, image_size)
    augments = (BatchViewAugment(first, mean, std), BatchViewAugment(second, mean, std))
    return DataLoader(
        _TwoViewBatches(
            dataset, augments, _NormalisedBatches(dataset, mean, std) if with_clean else None
        ),
        batch_sampler=sampler,
        collate_fn=_batch_as_is,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def make_eval_loader(
    dataset: Dataset,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    max_samples: int | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """Un-augmented, normalised ``(images, labels)`` batches in dataset order.

    With ``max_samples`` below the dataset size, a fixed subset (seed 0, kept in dataset
    order) is used, so successive evaluations see the same images.
    """
    n = len(dataset)  # type: ignore[arg-type]
    indices = list(range(n))
    if max_samples is not None and max_samples < n:
        subset = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_samples]
        indices = subset.sort().values.tolist()
    return DataLoader(
        _NormalisedBatches(dataset, mean, std),
        batch_size=batch_size,
        sampler=indices,
        collate_fn=_batch_as_is,
        num_workers=num_workers,
    )
