"""Two-view SSL augmentation, batched: each recipe's parameters and
:class:`BatchViewAugment`, which applies them with per-sample random parameters drawn
from an explicit generator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from ldreg import registry
from ldreg.registry import AugmentationRecipe


def augmentation_recipe(kind: str) -> AugmentationRecipe:
    """The recipe named ``kind``, or the one the method ``kind`` trains with (the
    registry: MoCo v3, Barlow Twins and VICReg adopt BYOL's asymmetric recipe)."""
    if kind in registry.METHODS:
        return registry.METHODS[kind].augmentation
    if kind in get_args(AugmentationRecipe):
        return cast(AugmentationRecipe, kind)
    raise ValueError(f"unknown augmentation kind '{kind}'; expected simclr, byol, mae or a method")


def hsv_to_rgb(hsv: Tensor) -> Tensor:
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


def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """RGB in [0, 1] → HSV, channel dim 1 (inverse of :func:`hsv_to_rgb`)."""
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
    hsv = rgb_to_hsv(x.clamp(0, 1))
    hsv[:, 0] = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(hsv).clamp(0, 1)


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
