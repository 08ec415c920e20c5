"""Datasets under the data root, augmentation, and reproducible loaders."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import ldreg.data as data_module
from ldreg.data import (
    BatchViewAugment,
    EpochBatchSampler,
    TensorImageDataset,
    build_datasets,
    generate_synthetic,
    hsv_to_rgb,
    make_eval_loader,
    make_ssl_loader,
    resolve_data_path,
    rgb_to_hsv,
    view_augmentations,
)
from ldreg.errors import DatasetError
from ldreg.spec import DatasetSpec


def _labels(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


@pytest.fixture(scope="module")
def digits():
    return build_datasets(DatasetSpec(name="digits", image_size=16), data_root=Path("/"), seed=0)


# --------------------------------------------------------------------------- datasets


def test_digits_bundle_is_a_stratified_upsampled_rgb_split(digits) -> None:
    assert (len(digits.train), len(digits.val)) == (1438, 359)  # 1797 images, 20 % held out
    image, label = digits.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert torch.equal(image[0], image[1]) and image.max() > 200  # grey, full range
    assert (digits.num_classes, digits.image_size) == (10, 16)
    assert isinstance(label, int)
    val_counts = np.bincount(_labels(digits.val), minlength=10)
    assert val_counts.min() >= 34 and val_counts.max() <= 38  # ~20 % of each ~180-image class
    assert 0.2 < digits.mean[0] < 0.4 and digits.std[0] > 0.2


def test_digits_split_is_a_pure_function_of_the_seed(digits) -> None:
    again = build_datasets(DatasetSpec(name="digits", image_size=16), data_root=Path("/"), seed=0)
    other = build_datasets(DatasetSpec(name="digits", image_size=16), data_root=Path("/"), seed=1)
    assert torch.equal(again.val.images, digits.val.images)
    assert not torch.equal(other.val.images, digits.val.images)
    default = build_datasets(DatasetSpec(name="digits"), data_root=Path("/"))
    assert default.image_size == 32 and default.train[0][0].shape == (3, 32, 32)


def test_synthetic_images_are_deterministic_in_the_seed_and_balanced() -> None:
    a_images, a_labels = generate_synthetic(60, 4, 16, seed=3)
    b_images, b_labels = generate_synthetic(60, 4, 16, seed=3)
    c_images, _ = generate_synthetic(60, 4, 16, seed=4)
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    assert not torch.equal(a_images, c_images)
    assert a_images.dtype == torch.uint8 and a_images.shape == (60, 3, 16, 16)
    assert np.bincount(a_labels.numpy()).tolist() == [15, 15, 15, 15]

    spec = DatasetSpec(name="synthetic", num_samples=100, num_classes=5, val_fraction=0.2)
    bundle = build_datasets(spec, data_root=Path("/"), seed=0)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (80, 20, 5)
    assert bundle.image_size == 32


def test_synthetic_classes_differ_in_colour() -> None:
    images, labels = generate_synthetic(200, 4, 16, seed=0)
    brightest = images.float().flatten(2).amax(dim=2)  # the shape's colour per channel
    centroids = torch.stack([brightest[labels == c].mean(0) for c in range(4)])
    assert torch.cdist(centroids, centroids).fill_diagonal_(1e9).min() > 40


def _write_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def test_npz_dataset_loads_grey_uint8_images_with_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 12, 12), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 10)
    _write_npz(tmp_path / "sets" / "toy.npz", images=images, labels=labels)
    spec = DatasetSpec(name="npz", path="sets/toy.npz", val_fraction=0.25)
    bundle = build_datasets(spec, data_root=tmp_path)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (30, 10, 4)
    assert bundle.image_size == 12
    image, _ = bundle.train[0]
    assert image.shape == (3, 12, 12) and torch.equal(image[0], image[2])
    assert sorted(np.bincount(_labels(bundle.val)).tolist()) == [2, 2, 3, 3]  # stratified


def test_npz_float_images_resized_and_unlabelled(tmp_path: Path) -> None:
    images = np.full((10, 8, 8, 3), 0.5, dtype=np.float32)
    _write_npz(tmp_path / "f.npz", images=images)
    bundle = build_datasets(
        DatasetSpec(name="npz", path="f.npz", image_size=16), data_root=tmp_path
    )
    image, label = bundle.val[0]
    assert image.shape == (3, 16, 16) and int(image.float().mean()) in (127, 128)
    assert bundle.num_classes == 1 and label == 0


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"pixels": np.zeros((4, 8, 8), np.uint8)}, "npz expects 'images'"),
        ({"images": np.full((4, 8, 8), 2.0)}, "finite and in \\[0, 1\\]"),
        ({"images": np.zeros((4, 8, 8, 2), np.uint8)}, "C in \\(1, 3\\)"),
        ({"images": np.zeros((4, 8, 6), np.uint8)}, "set dataset.image_size"),
        (
            {"images": np.zeros((4, 8, 8), np.uint8), "labels": np.array([0, 1, -1, 2])},
            "non-negative integers",
        ),
        ({"images": np.array([object()] * 4, dtype=object)}, "pickle"),
    ],
)
def test_malformed_npz_is_a_dataset_error_naming_the_problem(
    tmp_path: Path, arrays: dict, message: str
) -> None:
    _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message) as info:
        build_datasets(DatasetSpec(name="npz", path="bad.npz"), data_root=tmp_path)
    assert info.value.code == "dataset_malformed"


def test_missing_npz_names_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"expects a \.npz file at 'nope\.npz'") as info:
        build_datasets(DatasetSpec(name="npz", path="nope.npz"), data_root=tmp_path)
    assert info.value.code == "dataset_not_found"


def test_paths_that_escape_the_data_root_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.npz"
    _write_npz(outside, images=np.zeros((4, 8, 8), np.uint8))
    os.symlink(outside, root / "link.npz")
    (root / "inner").mkdir()
    os.symlink(tmp_path, root / "inner" / "up")

    for relative in ("../secret.npz", str(outside), "inner/up/secret.npz"):
        with pytest.raises(DatasetError) as info:
            resolve_data_path(root, relative)
        assert info.value.code == "path_outside_data_root"
    with pytest.raises(DatasetError) as info:
        build_datasets(DatasetSpec(name="npz", path="link.npz"), data_root=root)
    assert info.value.code == "path_outside_data_root"
    assert resolve_data_path(root, "inner/x.npz") == (root / "inner" / "x.npz").resolve()


def _write_cifar(folder: Path, files: list[str], label_key: str, n: int, classes: int) -> None:
    folder.mkdir(parents=True)
    for index, name in enumerate(files):
        data = np.full((n, 3072), index, dtype=np.uint8)
        data[:, 1024:2048] = 100  # the green plane: rows are channel-major (3, 32, 32)
        entry = {"data": data, label_key: [i % classes for i in range(n)], "batch_label": name}
        with (folder / name).open("wb") as f:
            pickle.dump(entry, f, protocol=2)


def test_cifar10_loads_torchvision_python_batches(tmp_path: Path) -> None:
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    _write_cifar(tmp_path / "c10" / "cifar-10-batches-py", files, "labels", 6, 10)
    bundle = build_datasets(DatasetSpec(name="cifar10", path="c10"), data_root=tmp_path)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (30, 6, 10)
    image, label = bundle.train[7]
    assert image.shape == (3, 32, 32)
    assert (int(image[0, 0, 0]), int(image[1, 5, 5])) == (1, 100)  # second batch, green plane
    assert label == 1
    assert int(bundle.val[0][0][0, 0, 0]) == 5  # test_batch is the held-out split


def test_cifar100_uses_fine_labels_and_resizes(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "c100" / "cifar-100-python", ["train", "test"], "fine_labels", 4, 100)
    spec = DatasetSpec(name="cifar100", path="c100/cifar-100-python", image_size=16)
    bundle = build_datasets(spec, data_root=tmp_path)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (4, 4, 100)
    assert bundle.train[3][0].shape == (3, 16, 16) and bundle.train[3][1] == 3


def test_missing_cifar_files_name_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"data_batch_1\.\.5 and test_batch") as info:
        build_datasets(DatasetSpec(name="cifar10", path="empty"), data_root=tmp_path)
    assert info.value.code == "dataset_not_found"
    with pytest.raises(DatasetError, match="cifar10 expects a folder 'absent'"):
        build_datasets(DatasetSpec(name="cifar10", path="absent"), data_root=tmp_path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar_pickles_cannot_run_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    _write_cifar(tmp_path / "c10", files, "labels", 2, 10)
    with (tmp_path / "c10" / "data_batch_3").open("wb") as f:
        pickle.dump({"data": _Exploit()}, f, protocol=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"refusing to load 'posix\.system'") as info:
        build_datasets(DatasetSpec(name="cifar10", path="c10"), data_root=tmp_path)
    assert info.value.code == "dataset_malformed"
    assert not (tmp_path / "pwned").exists()


def _write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_splits_one_folder_or_uses_train_and_val(tmp_path: Path) -> None:
    for i in range(5):
        _write_png(tmp_path / "one" / "cat" / f"{i}.png", (200, 0, 0), (20, 12))
        _write_png(tmp_path / "one" / "dog" / f"{i}.png", (0, 0, 200), (12, 12))
    spec = DatasetSpec(name="image_folder", path="one", image_size=8, val_fraction=0.4)
    bundle = build_datasets(spec, data_root=tmp_path)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (6, 4, 2)
    image, label = bundle.val[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    assert image[:, 4, 4].tolist() == ([200, 0, 0] if label == 0 else [0, 0, 200])

    for split in ("train", "val"):
        for cls in ("a", "b", "c"):
            _write_png(tmp_path / "two" / split / cls / "x.png", (9, 9, 9), (8, 8))
    bundle = build_datasets(
        DatasetSpec(name="image_folder", path="two", image_size=8), data_root=tmp_path
    )
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (3, 3, 3)

    (tmp_path / "bare").mkdir()
    with pytest.raises(DatasetError, match="expected <class>/<image> files"):
        build_datasets(DatasetSpec(name="image_folder", path="bare"), data_root=tmp_path)


# ----------------------------------------------------------------------- augmentation


def test_batched_hue_rotation_matches_torchvision() -> None:
    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    hsv = rgb_to_hsv(x)
    hsv[:, 0] = torch.remainder(hsv[:, 0] + 0.1, 1.0)
    torch.testing.assert_close(hsv_to_rgb(hsv), TF.adjust_hue(x, 0.1), atol=1e-4, rtol=0)


def test_view_recipes_scale_with_image_size() -> None:
    small, _ = view_augmentations("simclr", 16)
    large, _ = view_augmentations("simclr", 96)
    assert small.crop_scale == (0.2, 1.0) and small.blur_p == 0.0
    assert large.crop_scale == (0.08, 1.0) and large.blur_p == 0.5 and large.blur_kernel == 9
    # SimCLR's colour-jitter strength: s = 0.5 at CIFAR size, s = 1 at ImageNet size.
    cifar, _ = view_augmentations("simclr", 32)
    imagenet, _ = view_augmentations("simclr", 224)
    assert cifar.jitter == pytest.approx((0.4, 0.4, 0.4, 0.1))
    assert imagenet.jitter == pytest.approx((0.8, 0.8, 0.8, 0.2))
    byol1, byol2 = view_augmentations("vicreg", 64)  # VICReg uses BYOL's recipe
    assert (byol1.blur_p, byol1.solarize_p, byol2.blur_p, byol2.solarize_p) == (1.0, 0, 0.1, 0.2)
    mae, _ = view_augmentations("mae", 32)
    assert mae.crop_scale == (0.2, 1.0) and mae.jitter is None and mae.gray_p == 0


def test_batched_augmentation_is_a_function_of_the_generator_seed(digits) -> None:
    images = digits.train.images[:16]
    view, _ = view_augmentations("byol", 64)
    augment = BatchViewAugment(view, digits.mean, digits.std)
    big = torch.nn.functional.interpolate(images.float(), size=64).to(torch.uint8)
    a = augment(big, torch.Generator().manual_seed(5))
    b = augment(big, torch.Generator().manual_seed(5))
    c = augment(big, torch.Generator().manual_seed(6))
    assert a.shape == (16, 3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mae_views_only_crop_and_flip(digits) -> None:
    # Cropping the whole image without flipping must give back the normalised image.
    view = view_augmentations("mae", 16)[0]
    identity = type(view)(image_size=16, crop_scale=(1.0, 1.0), flip_p=0.0)
    augment = BatchViewAugment(identity, digits.mean, digits.std)
    images = digits.train.images[:4]
    out = augment(images, torch.Generator().manual_seed(0))
    mean = torch.tensor(digits.mean).view(1, 3, 1, 1)
    std = torch.tensor(digits.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (images.float() / 255 - mean) / std, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        ("adjust_brightness", TF.adjust_brightness, (0.6, 1.0, 1.4)),
        ("adjust_contrast", TF.adjust_contrast, (0.6, 1.0, 1.4)),
        ("adjust_saturation", TF.adjust_saturation, (0.0, 0.6, 1.4)),
        ("adjust_hue", TF.adjust_hue, (-0.1, 0.0, 0.25)),
    ],
)
def test_batched_colour_operations_match_torchvision(ours, theirs, factors) -> None:
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    f = torch.tensor(factors).view(3, 1, 1, 1)
    got = getattr(data_module, ours)(x, f)
    for i, factor in enumerate(factors):
        torch.testing.assert_close(got[i], theirs(x[i], factor), atol=1e-4, rtol=0)


def test_batched_blur_and_solarize_match_torchvision() -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.5, 1.5])
    got = data_module.gaussian_blur(x, 5, sigma)
    for i in range(2):
        want = TF.gaussian_blur(x[i], kernel_size=[5, 5], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(data_module.solarize(x), TF.solarize(x, threshold=0.5))


# --------------------------------------------------------------------------- loaders


def _loader(dataset, *, epoch: int, seed: int = 0, **kwargs):
    return make_ssl_loader(
        dataset,
        kind="simclr",
        image_size=16,
        mean=(0.3, 0.3, 0.3),
        std=(0.3, 0.3, 0.3),
        batch_size=32,
        seed=seed,
        epoch=epoch,
        **kwargs,
    )


def test_ssl_loader_replays_an_epoch_exactly_from_seed_and_epoch(digits) -> None:
    first = next(iter(_loader(digits.train, epoch=3)))
    again = next(iter(_loader(digits.train, epoch=3)))
    later = next(iter(_loader(digits.train, epoch=4)))
    reseeded = next(iter(_loader(digits.train, epoch=3, seed=1)))
    view1, view2, labels = first
    assert view1.shape == view2.shape == (32, 3, 16, 16) and labels.shape == (32,)
    assert not torch.equal(view1, view2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(view1, later[0]) and not torch.equal(view1, reseeded[0])
    assert len(_loader(digits.train, epoch=0)) == 1438 // 32


def test_ssl_loader_batches_do_not_depend_on_the_number_of_workers() -> None:
    images, labels = generate_synthetic(96, 3, 16, seed=0)
    dataset = TensorImageDataset(images, labels)
    serial = list(_loader(dataset, epoch=1))
    parallel = list(_loader(dataset, epoch=1, num_workers=2))
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_ranks_get_equal_disjoint_shards_of_one_permutation() -> None:
    shards = []
    for rank in range(3):
        sampler = EpochBatchSampler(
            10, batch_size=2, seed=0, epoch=2, rank=rank, world_size=3, drop_last=False
        )
        batches = list(sampler)
        assert len(batches) == len(sampler) == 2
        shards.append([index for batch in batches for index, _ in batch])
        assert len({seed for batch in batches for _, seed in batch}) == 2  # a seed per batch
    assert [len(s) for s in shards] == [4, 4, 4]
    covered = {index for shard in shards for index in shard}
    assert covered == set(range(10))  # 12 slots: every image once, two padded repeats


def test_batch_larger_than_the_dataset_is_a_clear_error(digits) -> None:
    with pytest.raises(DatasetError, match="batch_size 2048 exceeds the 1438 training images"):
        make_ssl_loader(
            digits.train,
            kind="byol",
            image_size=16,
            mean=digits.mean,
            std=digits.std,
            batch_size=2048,
            seed=0,
            epoch=0,
        )


def test_eval_loader_normalises_without_augmenting_and_caps_deterministically(digits) -> None:
    loader = make_eval_loader(digits.val, mean=digits.mean, std=digits.std, batch_size=100)
    images, labels = next(iter(loader))
    mean = torch.tensor(digits.mean).view(1, 3, 1, 1)
    std = torch.tensor(digits.std).view(1, 3, 1, 1)
    expected = (digits.val.images[:100].float() / 255 - mean) / std
    torch.testing.assert_close(images, expected)
    assert torch.equal(labels, digits.val.labels[:100])
    assert sum(len(b[1]) for b in loader) == 359

    def capped():
        return make_eval_loader(
            digits.val, mean=digits.mean, std=digits.std, batch_size=64, max_samples=70
        )

    first = torch.cat([b[1] for b in capped()])
    assert len(first) == 70 and torch.equal(first, torch.cat([b[1] for b in capped()]))
