"""The batched augmentation's operations against torchvision's, its two strategies (the
CPU's chunks, an accelerator's whole batch) against each other, the loader's raw
batches for augmentation on the training device, and image folders cropped from their
full decoded images."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ldreg.data import (
    BatchViewAugment,
    EncodedImages,
    RawBatch,
    TensorImageDataset,
    TwoViewAugment,
    ViewAugmentation,
    adjust_hue,
    build_datasets,
    decode_batch,
    draw_view_params,
    fetch_encoded,
    gaussian_blur,
    generate_synthetic,
    make_ssl_loader,
    random_resized_crop_boxes,
    resized_crop,
    view_augmentations,
)
from ldreg.data import augment as augment_module
from ldreg.spec import DatasetSpec

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uint8(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=_generator(seed))


# Every operation of the recipes at once, at a size the default suite can afford.
EVERYTHING = ViewAugmentation(
    image_size=24,
    crop_scale=(0.08, 1.0),
    jitter=(0.8, 0.8, 0.8, 0.2),
    jitter_p=0.8,
    gray_p=0.3,
    blur_p=0.6,
    blur_kernel=7,
    blur_sigma=(0.1, 2.0),
    solarize_p=0.3,
)


# ---------------------------------------------------------------- the operations


def test_resized_crop_is_torchvisions_antialiased_resized_crop_and_flip() -> None:
    images = _uint8(6, 3, 20, 28)
    # Downscaled (boxes larger than the output), upscaled, the whole image, one pixel.
    boxes = torch.tensor(
        [
            [0, 0, 20, 28],
            [2, 3, 17, 25],
            [5, 9, 6, 4],
            [19, 27, 1, 1],
            [0, 4, 20, 13],
            [3, 0, 9, 28],
        ]
    )
    flip = torch.tensor([False, True, False, True, True, False])
    got = resized_crop(images, boxes, 12, flip)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        want = TF.resized_crop(images[i].float() / 255, top, left, h, w, [12, 12], antialias=True)
        want = TF.horizontal_flip(want) if flip[i] else want
        # Exact but for rounding: the filter positions are computed in float64 here,
        # in float32 by ATen, and the sums run in another order.
        torch.testing.assert_close(got[i], want, atol=1e-6, rtol=0)


def test_crop_boxes_follow_torchvisions_sampling_and_fallback() -> None:
    n = 2000
    heights, widths = torch.full((n,), 32), torch.full((n,), 48)
    boxes = random_resized_crop_boxes(heights, widths, (0.08, 1.0), _generator(0))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= 32).all() and (left + w <= 48).all()
    assert torch.equal(
        boxes, random_resized_crop_boxes(heights, widths, (0.08, 1.0), _generator(0))
    )
    # The same distribution as torchvision's sampler (whose tries reject the large
    # areas that do not fit a 32 x 48 image: mean area 0.40, not 0.54).
    torch.manual_seed(0)
    sampler, image = v2.RandomResizedCrop(16), torch.zeros(3, 32, 48)
    theirs = torch.tensor(
        [[p["height"], p["width"]] for p in (sampler.make_params([image]) for _ in range(n))]
    ).float()
    for ours, ref in (
        ((h * w).float() / (32 * 48), theirs.prod(1) / (32 * 48)),
        ((w.float() / h.float()).log(), (theirs[:, 1] / theirs[:, 0]).log()),
    ):
        assert abs(ours.mean() - ref.mean()) < 0.02 and abs(ours.std() - ref.std()) < 0.02
        assert abs(ours.min() - ref.min()) < 0.02 and abs(ours.max() - ref.max()) < 0.05
    centre = (left + w / 2).float().mean()
    assert abs(centre - 24) < 0.5  # uniform positions
    # Nothing fits a 1 x 40 strip, a single pixel or a 40 x 2 column: torchvision's
    # central fallback, clamped to the ratio range (round(1 · 4/3) = 1 px wide,
    # round(2 / (3/4)) = 3 px high at (40 - 3) // 2).
    tiny = random_resized_crop_boxes(
        torch.tensor([1, 1, 40]), torch.tensor([40, 1, 2]), (0.08, 1.0), _generator(1)
    )
    assert tiny.tolist() == [[0, 19, 1, 1], [0, 0, 1, 1], [18, 0, 3, 2]]


def test_hue_rotation_matches_torchvision_on_grey_ties_and_primaries() -> None:
    x = torch.rand(6, 3, 12, 12, generator=_generator(3))
    x[0] = 0.5  # grey: no chroma, hue undefined
    x[1, 0] = x[1, 1]  # red = green ties
    x[2] = (x[2] * 4).round() / 4  # many ties, zeros and ones
    x[3, :, :6] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    x[4] = torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1)
    for shift in (-0.5, -0.3, 0.0, 0.05, 0.25, 0.5):
        got = adjust_hue(x, shift)
        want = torch.stack([TF.adjust_hue(image, shift) for image in x])
        # torchvision's own HSV round trip is exact to ~1e-6.
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    torch.testing.assert_close(adjust_hue(x[:1], 0.3), x[:1], atol=0, rtol=0)  # grey stays


@pytest.mark.parametrize("method", ["shift", "conv"])
def test_both_blur_methods_match_torchvision(method: str) -> None:
    x = torch.rand(3, 3, 24, 20, generator=_generator(4))
    sigma = torch.tensor([0.1, 0.8, 2.0])
    got = gaussian_blur(x, 9, sigma, method=method)
    for i in range(3):
        want = TF.gaussian_blur(x[i], kernel_size=[9, 9], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(got[i], want, atol=1e-6, rtol=0)
    # A kernel wider than reflect padding allows (23 px on 8 px) is cut to 15 px.
    small = x[:1, :, :8, :8]
    want = TF.gaussian_blur(small[0], kernel_size=[15, 15], sigma=[1.5, 1.5])
    got = gaussian_blur(small, 23, torch.tensor([1.5]), method=method)
    torch.testing.assert_close(got[0], want, atol=1e-6, rtol=0)


def test_parameter_draws_depend_on_the_batch_size_only() -> None:
    # The layout of the draws is fixed (documented in draw_view_params): every recipe
    # consumes the same numbers, so a recipe's probabilities never shift the next draw.
    states = []
    for kind in ("simclr", "byol", "mae"):
        generator = _generator(9)
        view = view_augmentations(kind, 32)[0]
        draw_view_params(view, torch.full((5,), 32), torch.full((5,), 32), generator)
        states.append(generator.get_state())
    assert all(torch.equal(states[0], state) for state in states[1:])


# ------------------------------------------------------------------ the strategies


@pytest.mark.parametrize("per_image", [False, True])
def test_chunked_and_whole_batch_strategies_agree(
    per_image: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if per_image:  # the one-image-at-a-time chunks the CPU uses from 128 px
        monkeypatch.setattr(augment_module, "_PER_IMAGE_FROM", 16)
    augment = BatchViewAugment(EVERYTHING, MEAN, STD)
    images = _uint8(10, 3, 30, 26, seed=1)
    params = draw_view_params(
        EVERYTHING, torch.full((10,), 30), torch.full((10,), 26), _generator(2)
    )
    assert params.jitter.any() and params.blur.any() and params.solarize.any() and params.gray.any()
    chunked = augment.apply(images, params, chunked=True)
    batch = augment.apply(images, params, chunked=False)
    if per_image:
        # One image at a time, the blur skips the taps negligible for that image, the
        # batch those negligible for all: the sums round differently (~1e-7, times
        # 1/std after normalisation).
        torch.testing.assert_close(chunked, batch, atol=1e-5, rtol=0)
    else:
        assert torch.equal(chunked, batch)  # the same code on chunks: bit for bit
    assert torch.equal(chunked, augment.apply(images, params))  # the CPU's default


def test_images_of_different_sizes_are_cropped_each_from_its_own_full_image() -> None:
    images = [_uint8(3, h, w, seed=h) for h, w in ((20, 30), (7, 5), (16, 16), (32, 12))]
    crop_only = ViewAugmentation(image_size=16, crop_scale=(0.08, 1.0))
    augment = BatchViewAugment(crop_only, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    heights, widths = torch.tensor([20, 7, 16, 32]), torch.tensor([30, 5, 16, 12])
    params = draw_view_params(crop_only, heights, widths, _generator(5))
    chunked = augment.apply(images, params, chunked=True)
    batch = augment.apply(images, params, chunked=False)  # padded to one buffer
    torch.testing.assert_close(chunked, batch, atol=1e-6, rtol=0)
    for i, image in enumerate(images):
        top, left, h, w = params.boxes[i].tolist()
        want = TF.resized_crop(image.float() / 255, top, left, h, w, [16, 16], antialias=True)
        want = TF.horizontal_flip(want) if params.flip[i] else want
        torch.testing.assert_close(chunked[i], want, atol=1e-6, rtol=0)


def test_batch_strategy_never_reads_a_value_back_from_the_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On the meta device tensors have no values: any .item(), .tolist(), nonzero() or
    # bool() on them would raise, so the whole batch path running there shows that the
    # host never waits for the device. The parameters go over in one transfer.
    transfers = []
    real = augment_module._to_device
    monkeypatch.setattr(
        augment_module,
        "_to_device",
        lambda ts, device: transfers.append(len(ts)) or real(ts, device),
    )
    augment = TwoViewAugment("byol", 64, MEAN, STD, with_clean=True)
    out = augment(_uint8(4, 3, 64, 64).to("meta"), seed=3)
    assert [tuple(t.shape) for t in out] == [(4, 3, 64, 64)] * 3
    assert all(t.device.type == "meta" for t in out) and len(transfers) == 1
    transfers.clear()
    full = [_uint8(3, 50, 70).to("meta"), _uint8(3, 64, 40).to("meta")]
    clean = augment(full, seed=3).clean
    assert clean is not None and clean.shape == (2, 3, 64, 64)
    assert len(transfers) == 1


def test_parameters_pack_into_one_buffer_and_back() -> None:
    tensors = [
        torch.arange(5, dtype=torch.long).view(5, 1, 1),
        torch.rand(3, 2),
        torch.tensor([True, False, True]),
        torch.zeros(0),
        torch.tensor(2.5),
    ]
    buffer, layout = augment_module._pack(tensors)
    assert buffer.dtype == torch.uint8 and all(offset % 8 == 0 for offset, *_ in layout)
    for original, unpacked in zip(tensors, augment_module._unpack(buffer, layout), strict=True):
        assert unpacked.dtype == original.dtype and torch.equal(unpacked, original)


def test_the_224_px_recipe_agrees_between_strategies_and_blurs_as_torchvision() -> None:
    # The one full-size case: 23-px kernels, the CPU's one-image-at-a-time chunks.
    augment = TwoViewAugment("simclr", 224, MEAN, STD, with_clean=True)
    images = _uint8(2, 3, 224, 224, seed=7)
    chunked = augment(images, seed=11, chunked=True)
    batch = augment(images, seed=11, chunked=False)
    for a, b in zip(chunked, batch, strict=True):  # see the test above
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    x = images[:1].float() / 255
    want = TF.gaussian_blur(x[0], kernel_size=[23, 23], sigma=[2.0, 2.0])
    for method in ("shift", "conv"):
        got = gaussian_blur(x, 23, torch.tensor([2.0]), method=method)
        # 2 x 23 products summed in another order than torchvision's 23 x 23: 2e-6.
        torch.testing.assert_close(got[0], want, atol=2e-6, rtol=0)


# ---------------------------------------------------------- raw batches, the device


def _loader(dataset, **kwargs):
    return make_ssl_loader(
        dataset,
        kind="simclr",
        image_size=16,
        mean=MEAN,
        std=STD,
        batch_size=24,
        seed=4,
        epoch=2,
        **kwargs,
    )


def test_raw_batches_augmented_on_the_device_are_the_loaders_views() -> None:
    images, labels = generate_synthetic(72, 3, 16, seed=0)
    dataset = TensorImageDataset(images, labels)
    in_workers = list(_loader(dataset, with_clean=True))
    raw = list(_loader(dataset, augment_on="device"))
    augment = TwoViewAugment("simclr", 16, MEAN, STD, with_clean=True)
    assert len(raw) == len(in_workers) == 3
    for batch, (view1, view2, batch_labels, clean) in zip(raw, in_workers, strict=True):
        assert isinstance(batch, RawBatch) and isinstance(batch.seed, int)
        assert batch.images.dtype == torch.uint8 and batch.images.shape == (24, 3, 16, 16)
        assert torch.equal(batch.labels, batch_labels)
        got = augment(batch.images, batch.seed, device="cpu")
        assert torch.equal(got.view1, view1) and torch.equal(got.view2, view2)
        assert got.clean is not None and torch.equal(got.clean, clean)
        batched = augment(batch.images, batch.seed, chunked=False)  # the GPU's code path
        assert torch.equal(batched.view1, view1) and torch.equal(batched.view2, view2)


def test_raw_batches_do_not_depend_on_the_number_of_workers() -> None:
    images, labels = generate_synthetic(48, 3, 8, seed=1)
    dataset = TensorImageDataset(images, labels)
    serial = list(_loader(dataset, augment_on="device"))
    parallel = list(_loader(dataset, augment_on="device", num_workers=2))
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert a.seed == b.seed
    with pytest.raises(ValueError, match="augment_on"):
        _loader(dataset, augment_on="gpu")


# ------------------------------------------------------------------- image folders


def _save(path: Path, image: Image.Image, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, quality=95) if fmt == "JPEG" else image.save(path, format=fmt)


def _wide_red_centre(width: int = 32, height: int = 12) -> Image.Image:
    # Blue sides that a shorter-side resize + centre crop cuts away, a red centre.
    image = Image.new("RGB", (width, height), (0, 0, 255))
    side = (width - height) // 2
    image.paste((255, 0, 0), (side, 0, side + height, height))
    return image


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    sizes = [(32, 12), (20, 30), (9, 13), (32, 32), (30, 25), (12, 30)]
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for i, (w, h) in enumerate(sizes):
                colour = ((37 * i) % 256, 120 if cls == "a" else 40, (91 * i) % 256)
                image = _wide_red_centre() if i == 0 else Image.new("RGB", (w, h), colour)
                _save(root / split / cls / f"{i}.jpg", image)
    return tmp_path


def test_image_folder_ssl_views_are_cropped_from_the_full_image(folder: Path) -> None:
    spec = DatasetSpec(name="image_folder", path="images", image_size=16)
    bundle = build_datasets(spec, data_root=folder)
    wide = bundle.train.samples.index((str(folder / "images/train/a/0.jpg"), 0))  # type: ignore[attr-defined]
    square, _ = bundle.train[wide]  # the evaluation image: shorter side, centre crop
    centre = square[:, :, 2:-2]  # (JPEG's subsampled chroma bleeds at the red's edges)
    assert square.shape == (3, 16, 16) and (centre[0] > 200).all() and (centre[2] < 60).all()

    def loader(**kwargs):
        return make_ssl_loader(
            Subset(bundle.train, [wide] * 8),
            kind="mae",
            image_size=16,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            batch_size=8,
            seed=0,
            epoch=1,
            **kwargs,
        )

    view1, view2, labels, clean = next(iter(loader(with_clean=True)))
    assert view1.shape == view2.shape == clean.shape == (8, 3, 16, 16)
    blue = (view1[:, 2] > 0.8) & (view1[:, 0] < 0.2)
    assert blue.any(), "crops reach the blue sides outside the centre square"
    # The clean images are the evaluation transform of the decoded file.
    decoded = decode_batch(fetch_encoded(bundle.train, [wide])[0].split())[0]  # type: ignore[index]
    want = TF.center_crop(TF.resize(decoded.float() / 255, 16, antialias=True), [16, 16])
    torch.testing.assert_close(clean[0], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(clean[0] * 255, square.float(), atol=3.0, rtol=0)  # Pillow's

    raw = next(iter(loader(augment_on="device")))
    assert isinstance(raw.images, EncodedImages) and torch.equal(raw.labels, labels)
    got = TwoViewAugment("mae", 16, (0.0,) * 3, (1.0,) * 3, with_clean=True)(raw.images, raw.seed)
    assert torch.equal(got.view1, view1) and torch.equal(got.view2, view2)
    assert got.clean is not None and torch.equal(got.clean, clean)


def test_image_folder_batches_of_mixed_sizes_train_with_every_recipe(folder: Path) -> None:
    spec = DatasetSpec(name="image_folder", path="train", image_size=16, val_fraction=0.25)
    bundle = build_datasets(spec, data_root=folder / "images", seed=0)
    assert isinstance(bundle.train, Subset)  # one folder, split by val_fraction
    for kind in ("simclr", "byol"):
        loader = make_ssl_loader(
            bundle.train,
            kind=kind,
            image_size=16,
            mean=bundle.mean,
            std=bundle.std,
            batch_size=4,
            seed=1,
            epoch=0,
            num_workers=1,
        )
        for view1, view2, labels in loader:
            assert view1.shape == view2.shape == (4, 3, 16, 16) and labels.shape == (4,)
            assert torch.isfinite(view1).all() and torch.isfinite(view2).all()


def test_fetch_encoded_only_serves_image_files(folder: Path) -> None:
    images, labels = generate_synthetic(8, 2, 8, seed=0)
    assert fetch_encoded(TensorImageDataset(images, labels), [0, 1]) is None
    bundle = build_datasets(
        DatasetSpec(name="image_folder", path="images", image_size=8), data_root=folder
    )
    encoded, got_labels = fetch_encoded(Subset(bundle.val, [3, 0]), [1, 0])  # type: ignore[misc]
    assert got_labels.tolist() == [bundle.val[0][1], bundle.val[3][1]]
    blobs = encoded.split()
    assert len(blobs) == 2 and all(blob[:3].tolist() == [0xFF, 0xD8, 0xFF] for blob in blobs)


def test_decode_batch_reads_jpeg_png_grey_and_pillow_only_formats() -> None:
    colour = Image.new("RGB", (9, 5), (200, 30, 90))
    colour.putpixel((0, 0), (1, 2, 3))
    files = []
    for image, fmt in (
        (colour, "JPEG"),
        (colour.convert("L"), "JPEG"),
        (colour.convert("RGBA"), "PNG"),
        (colour, "BMP"),  # not a torchvision.io format: Pillow decodes it
    ):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        files.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    decoded = decode_batch(files, "cpu")
    assert [tuple(image.shape) for image in decoded] == [(3, 5, 9)] * 4
    rgb = TF.pil_to_tensor(colour)
    assert torch.equal(decoded[2], rgb) and torch.equal(decoded[3], rgb)
    with Image.open(io.BytesIO(files[0].numpy().tobytes())) as pillow:  # both libjpeg-turbo
        assert (decoded[0].int() - TF.pil_to_tensor(pillow).int()).abs().max() <= 1
    assert torch.equal(decoded[1][0], decoded[1][2])  # grey, as three channels
    packed = EncodedImages.from_blobs(files)
    assert [torch.equal(a, b) for a, b in zip(packed.split(), files, strict=True)] == [True] * 4
