"""Datasets: every one yields ``(uint8 image (3, S, S), int label)`` at one square size
``S``; file-based ones resolve their path under the data root and never outside it.

An image folder also serves its files' bytes (:class:`ImageFolderFiles`,
:func:`fetch_encoded`), so SSL training crops from the full decoded image
(:func:`decode_batch`: nvJPEG on CUDA, libjpeg-turbo / Pillow on the CPU)."""

from __future__ import annotations

import io
import itertools
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from ldreg.data_layout import CIFAR_FILES, layout_problem
from ldreg.errors import DatasetError
from ldreg.spec import DatasetSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


def generate_synthetic(
    num_samples: int, num_classes: int, image_size: int = 32, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Labelled images of coloured shapes on noisy backgrounds, a pure function of ``seed``.

    Class ``c`` fixes the shape (disk, square, diamond, ring: ``c mod 4``) and the hue
    (golden-ratio spaced, ``0.618·c mod 1``); each image draws its own position, size,
    brightness, background and pixel noise, so classes are learnable but not trivial.
    """
    from ldreg.data.augment import hsv_to_rgb  # augment imports this module

    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % num_classes
    labels = labels[torch.randperm(num_samples, generator=generator)]
    hues = torch.remainder(torch.arange(num_classes, dtype=torch.float32) * 0.6180339887, 1.0)
    palette = hsv_to_rgb(torch.stack([hues, torch.full_like(hues, 0.85), torch.ones_like(hues)], 1))
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


class EncodedImages(NamedTuple):
    """A batch of encoded image files (JPEG, PNG, …) as one uint8 buffer: image ``i``
    is ``data[offsets[i] : offsets[i + 1]]``. One tensor pair, so a loader pins and
    moves it whole."""

    data: Tensor  # (total bytes,) uint8
    offsets: Tensor  # (B + 1,) int64

    @classmethod
    def from_blobs(cls, blobs: Sequence[Tensor]) -> EncodedImages:
        sizes = torch.tensor([0] + [blob.numel() for blob in blobs], dtype=torch.long)
        data = torch.cat(list(blobs)) if blobs else torch.zeros(0, dtype=torch.uint8)
        return cls(data, sizes.cumsum(0))

    def split(self) -> list[Tensor]:
        """One 1-D uint8 tensor (a view) per file."""
        bounds = self.offsets.tolist()
        return [self.data[a:b] for a, b in itertools.pairwise(bounds)]


def _is_jpeg(blob: Tensor) -> bool:
    return blob.numel() >= 3 and blob[:3].tolist() == [0xFF, 0xD8, 0xFF]


def _decode_cpu(blob: Tensor) -> Tensor:
    # libjpeg-turbo / libpng through torchvision.io, else Pillow (BMP, TIFF, …): RGB.
    from torchvision.io import ImageReadMode, decode_image

    try:
        image = decode_image(blob, mode=ImageReadMode.RGB)
        return image[0] if image.ndim == 4 else image  # an animated GIF: its first frame
    except RuntimeError:
        from PIL import Image

        with Image.open(io.BytesIO(blob.numpy().tobytes())) as image:
            return v2.functional.pil_to_tensor(image.convert("RGB"))


def decode_batch(
    blobs: Sequence[Tensor | bytes], device: torch.device | str = "cpu"
) -> list[Tensor]:
    """Decode encoded images (1-D uint8 CPU tensors, or bytes) to RGB uint8
    ``(3, H_i, W_i)`` on ``device``.

    On CUDA the JPEGs are decoded together by nvJPEG
    (``torchvision.io.decode_jpeg(device=...)``) and anything else (or a batch nvJPEG
    refuses, e.g. CMYK) on the CPU, then moved; on the CPU, each with
    ``torchvision.io.decode_image`` (libjpeg-turbo, libpng), falling back to Pillow for
    the formats it lacks. EXIF orientation is not applied (as Pillow's ``open``, which
    the evaluation path uses). nvJPEG and libjpeg-turbo may differ by a level here and
    there (IDCT and chroma upsampling)."""
    device = torch.device(device)
    tensors = [
        blob if isinstance(blob, Tensor) else torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        for blob in blobs
    ]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec.
        warnings.simplefilter("ignore", DeprecationWarning)
        if device.type != "cuda":
            return [_decode_cpu(blob).to(device) for blob in tensors]
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[Tensor | None] = [None] * len(tensors)
        jpegs = [i for i, blob in enumerate(tensors) if _is_jpeg(blob)]
        if jpegs:
            try:
                decoded = decode_jpeg(
                    [tensors[i] for i in jpegs], mode=ImageReadMode.RGB, device=device
                )
                for i, image in zip(jpegs, decoded, strict=True):
                    out[i] = image
            except RuntimeError:
                pass  # decoded one by one on the CPU below
        for i, blob in enumerate(tensors):
            if out[i] is None:
                out[i] = _decode_cpu(blob).pin_memory().to(device, non_blocking=True)
        return [image for image in out if image is not None]


class ImageFolderFiles(Dataset):
    """An image folder's ``(path, label)`` list (torchvision's ``ImageFolder`` scan).

    Items are the evaluation images: RGB, shorter side to ``size``, centre crop, uint8
    ``(3, size, size)`` (Pillow). :meth:`get_encoded` gives the files' bytes instead, so
    SSL training can take its random resized crops from the full decoded image (the
    papers' recipe) rather than from that square.
    """

    def __init__(self, root: str, size: int) -> None:
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(root, transform=_LoadSquareRGB(size))
        self.classes: list[str] = self.folder.classes
        self.targets: list[int] = self.folder.targets
        self.samples: list[tuple[str, int]] = self.folder.samples
        self.image_size = size

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.folder[index]
        return image, int(label)

    def get_encoded(self, indices: Sequence[int]) -> tuple[EncodedImages, Tensor]:
        """The files of ``indices`` as :class:`EncodedImages`, and their labels."""
        blobs = []
        for i in indices:
            raw = Path(self.samples[i][0]).read_bytes()
            blobs.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        labels = torch.tensor([self.samples[i][1] for i in indices], dtype=torch.long)
        return EncodedImages.from_blobs(blobs), labels


def fetch_encoded(dataset: Dataset, indices: Sequence[int]) -> tuple[EncodedImages, Tensor] | None:
    """The encoded files of ``indices`` when ``dataset`` serves them (an image folder,
    or a ``Subset`` of one), else ``None``."""
    if isinstance(dataset, Subset):
        return fetch_encoded(dataset.dataset, [dataset.indices[i] for i in indices])
    if isinstance(dataset, ImageFolderFiles):
        return dataset.get_encoded(indices)
    return None


def _build_image_folder(spec: DatasetSpec, path: Path, seed: int) -> DatasetBundle:
    size = spec.image_size or 224
    train: Dataset
    val: Dataset
    try:
        if (path / "train").is_dir() and (path / "val").is_dir():
            train_files = ImageFolderFiles(str(path / "train"), size)
            val_files = ImageFolderFiles(str(path / "val"), size)
            if train_files.classes != val_files.classes:
                raise DatasetError(
                    f"'{spec.path}': train/ and val/ have different class folders",
                    code="dataset_malformed",
                )
            train, val, classes = train_files, val_files, train_files.classes
        else:
            full = ImageFolderFiles(str(path), size)
            train_idx, val_idx = _split_indices(np.asarray(full.targets), spec.val_fraction, seed)
            train, val = Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist())
            classes = full.classes
            train.classes = classes  # type: ignore[attr-defined]
    except FileNotFoundError as e:
        raise DatasetError(
            f"image_folder '{spec.path}': {e}; expected <class>/<image> files (or train/ and"
            " val/ folders of them)",
            code="dataset_malformed",
        ) from e
    return DatasetBundle(
        train=train,
        val=val,
        num_classes=len(classes),
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
      folder of class sub-folders split by ``val_fraction``; items are resized to
      ``image_size`` (224: shorter side, centre crop) and normalised with ImageNet
      statistics, while SSL training crops from the full images (:func:`fetch_encoded`).
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
    # The same check as the API's at submit: the files may have changed since.
    problem = layout_problem(spec.name, path, spec.path)
    if problem is not None:
        raise DatasetError(problem, code="dataset_not_found")
    if spec.name in CIFAR_FILES:
        return _build_cifar(spec, path)
    if spec.name == "npz":
        return _build_npz(spec, path, seed)
    if spec.name == "image_folder":
        return _build_image_folder(spec, path, seed)
    raise DatasetError(f"unknown dataset '{spec.name}'")
