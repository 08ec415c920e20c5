"""Two-view SSL augmentation, batched: each recipe's parameters, the per-sample random
parameters drawn from an explicit generator (:func:`draw_view_params`), and the
augmenters that apply them — :class:`BatchViewAugment` (one view) and
:class:`TwoViewAugment` (both views and the clean images of a batch, on any device).

Every operation is torchvision's (``torchvision.transforms.v2``: RandomResizedCrop with
antialiased bilinear resizing, RandomHorizontalFlip, ColorJitter in a random order per
image, RandomGrayscale, GaussianBlur, RandomSolarize, Normalize), vectorised over a
batch with one set of parameters per image; tests/test_data.py and
tests/test_data_device.py compare each with ``torchvision.transforms.v2.functional``.
Recipes: SimCLR (Chen et al. 2020), BYOL (Grill et al. 2020), MAE (He et al. 2022).

Two execution strategies compute the same function of the same parameters:

* the CPU's, in cache-sized chunks (:func:`chunk_size`; one image at a time from
  128 px), so every operation runs on data in the core's cache — a whole-batch pass
  per operation streams 38 MB from memory at 64 x 224 px — and the Python dispatch is
  paid per chunk, not per image, at small sizes;
* an accelerator's, on the whole batch at once: batched line gathers for the crops,
  each colour operation on the sub-batch that draws it, every index chosen on the CPU
  and every parameter moved in one transfer (no per-image launches, no host sync).

Randomness: all parameters are drawn on the CPU from the generator given, in a fixed
layout per view (:func:`draw_view_params` lists it), so the views are a pure function of
the images and the generator's seed, whatever the device, the strategy or the number of
loader workers (bit for bit on one device; across devices to float rounding).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, NamedTuple, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from ldreg import registry
from ldreg.data.datasets import EncodedImages, decode_batch
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
    """RGB in [0, 1] → HSV, channel dim 1 (inverse of :func:`hsv_to_rgb`; a grey pixel,
    whose chroma is zero, gets hue 0 and saturation 0, as in torchvision)."""
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


# ----------------------------------------------------------------------- the recipes


@dataclass(frozen=True)
class ViewAugmentation:
    """One view's augmentation parameters (:class:`BatchViewAugment` applies them).

    Attributes:
        crop_scale: area range of RandomResizedCrop (aspect ratio 3/4..4/3).
        flip_p: horizontal-flip probability.
        jitter: (brightness, contrast, saturation, hue) strengths; ``None`` = no jitter;
            a strength of 0 leaves that operation out (torchvision's ``None``).
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


# ------------------------------------------------------------------ colour operations
# ColorJitter, RandomGrayscale, GaussianBlur and RandomSolarize with torchvision's
# definitions (torchvision/transforms/v2/functional/_color.py and _misc.py) on float
# images in [0, 1], batched with one factor per image: ``factor`` is a tensor
# ``(B, 1, 1, 1)`` or one number for the whole batch. The in-place forms (trailing
# underscore) work on the pipeline's own buffers; the public forms leave ``x`` intact.

Factor = Tensor | float


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma with torchvision's weights (``_rgb_to_grayscale_image``):
    ``(B, 3, H, W)`` → ``(B, 1, H, W)``."""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _blend_(x: Tensor, factor: Factor, other: Tensor) -> Tensor:
    # torchvision's _blend: factor·x + (1 − factor)·other, clamped to [0, 1].
    if isinstance(factor, Tensor):
        x.mul_(factor).addcmul_(other, 1.0 - factor)
    else:
        x.mul_(factor).add_(other, alpha=1.0 - factor)
    return x.clamp_(0.0, 1.0)


def _brightness_(x: Tensor, factor: Factor) -> Tensor:
    return x.mul_(factor).clamp_(0.0, 1.0)


def _contrast_(x: Tensor, factor: Factor) -> Tensor:
    # _blend with the mean grey level, (1 − factor)·mean formed per image first (a
    # multiply-add of two broadcast (B, 1, 1, 1) operands into the image is 2.5x slower).
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return x.mul_(factor).add_(mean.mul_(1.0 - factor)).clamp_(0.0, 1.0)


def _saturation_(x: Tensor, factor: Factor) -> Tensor:
    return _blend_(x, factor, rgb_to_grayscale(x))


# The hexcone's channel profiles (see _hue_): channel c of a fully saturated colour of
# hue h (in sixths of a turn, [0, 6)) is clamp(a_c·|h − centre_c| + b_c, 0, 1).
_HEXCONE = ((3.0, 2.0, 4.0), (-1.0, 1.0, 1.0), (2.0, -1.0, -1.0))  # centre, a, b for R, G, B


def _hue_(x: Tensor, shift: Factor) -> Tensor:
    # torchvision's adjust_hue converts to HSV (Smith 1978's hexcone, after Pillow),
    # rotates h by `shift` turns and converts back. Written out, the result of that round
    # trip is, per channel c, max − chroma·T_c(h') with the hexcone's piecewise-linear
    # profiles T_R = clamp(2 − |h' − 3|), T_G = clamp(|h' − 2| − 1), T_B = clamp(|h' − 4| − 1)
    # (h' in sixths; hsv_to_rgb's p = v·(1 − s) is the min, q and t lie between), so it
    # is computed directly from max, min and the hue, without forming s and v. Only float
    # arithmetic: comparisons, `where`, `sign` and `remainder` cost 5-50x more per pixel
    # on the CPU than `floor`, `clamp` and multiply-adds.
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    # 1.0 for the channel holding the maximum, else 0.0 (floor of a difference clamped to
    # [-1, 0]); red wins ties, then green (torchvision's order).
    is_r = (r - maxc).clamp_(min=-1.0).floor_().add_(1.0)
    is_g = (g - maxc).clamp_(min=-1.0).floor_().add_(1.0).mul_(1.0 - is_r)
    is_b = (1.0 - is_r).sub_(is_g)
    # Hue in sixths: (g − b)/chroma from red, 2 + (b − r)/chroma from green, else
    # 4 + (r − g)/chroma. A grey pixel (chroma 0, hue undefined: torchvision sets 0) has
    # a zero numerator; the divisor's lower bound keeps it 0 and the output, max, exact.
    hue = (g - b).mul_(is_r)
    hue.addcmul_(is_g, (b - r).add_(chroma, alpha=2.0))
    hue.addcmul_(is_b, (r - g).add_(chroma, alpha=4.0))
    hue.div_(chroma.clamp(min=1e-30))
    if isinstance(shift, Tensor):
        hue.add_(shift.view(-1, 1, 1), alpha=6.0)
    else:
        hue.add_(6.0 * shift)
    # Into [0, 6) (from [-4, 8)); the profiles are continuous and periodic, so a rounding
    # of floor(h / 6) at a multiple of 6 is harmless.
    hue.sub_(torch.floor(hue * (1.0 / 6.0)), alpha=6.0)
    centre, slope, offset = (_constant(v, x.dtype, x.device) for v in _HEXCONE)
    weight = (hue.unsqueeze(1) - centre).abs_().mul_(slope).add_(offset)
    weight.clamp_(min=0.0).clamp_(max=1.0)
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), weight, value=-1.0, out=x)


def _gray_(x: Tensor) -> Tensor:
    return x.copy_(rgb_to_grayscale(x).expand_as(x))


def _solarize_(x: Tensor) -> Tensor:
    return torch.where(x >= 0.5, 1.0 - x, x, out=x)


def adjust_brightness(x: Tensor, factor: Factor) -> Tensor:
    """torchvision's ``adjust_brightness``: scale by ``factor``, clamp to [0, 1]."""
    return _brightness_(x.clone(), factor)


def adjust_contrast(x: Tensor, factor: Factor) -> Tensor:
    """torchvision's ``adjust_contrast``: blend with each image's mean grey level."""
    return _contrast_(x.clone(), factor)


def adjust_saturation(x: Tensor, factor: Factor) -> Tensor:
    """torchvision's ``adjust_saturation``: blend with the image's grey version."""
    return _saturation_(x.clone(), factor)


def adjust_hue(x: Tensor, shift: Factor) -> Tensor:
    """torchvision's ``adjust_hue``: rotate the hue by ``shift`` turns (in [-0.5, 0.5]);
    input in [0, 1]."""
    return _hue_(x.clone(), shift)


def solarize(x: Tensor) -> Tensor:
    """torchvision's ``solarize`` at threshold 0.5: invert the pixels at or above it."""
    return torch.where(x >= 0.5, 1.0 - x, x)


def gaussian_kernels(kernel_size: int, sigma: Tensor) -> Tensor:
    """One normalised 1-D Gaussian kernel per σ, ``(len(sigma), kernel_size)`` float32:
    torchvision's ``_get_gaussian_kernel1d`` (softmax of −(x/σ)² on a linspace)."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32)
    sig = sigma.detach().to("cpu", torch.float32).view(-1, 1)
    return torch.softmax(x.view(1, -1).div(sig).pow(2).neg(), dim=1)


def _blur_kernel_size(kernel_size: int, height: int, width: int) -> int:
    # Reflect padding needs pad < side: a kernel wider than that (only for images under
    # ~2x the kernel, which the recipes never blur) is cut to the widest odd size allowed.
    return max(1, min(kernel_size, 2 * min(height, width) - 1) // 2 * 2 + 1)


# Taps lighter than this are skipped by the shifted-sum blur: all of them together weigh
# under 1e-11, four orders of magnitude below float32's resolution at 1 (the sum is
# unchanged but for rounding), and a σ of 1 px then needs 15 of a 23-px kernel's taps.
_NEGLIGIBLE_TAP = 1e-12

BlurMethod = Literal["shift", "conv"]


def _trim(kernels: Tensor) -> Tensor:
    """The kernels (CPU, (B, K)) without the outer taps that are negligible for every
    one of them (see _NEGLIGIBLE_TAP): decided on the host, before any transfer."""
    centre = kernels.shape[1] // 2
    heavy = (kernels[:, centre + 1 :] >= _NEGLIGIBLE_TAP).sum(dim=1)
    pad = int(heavy.max()) if kernels.shape[0] else 0
    return kernels[:, centre - pad : centre + pad + 1].contiguous()


def _blur(x: Tensor, kernels: Tensor, method: BlurMethod = "shift") -> Tensor:
    # torchvision's gaussian_blur: reflect padding, then the 2-D kernel k·kᵀ, computed
    # as two 1-D passes (the padding and the kernel are both separable). `kernels`:
    # (B, K) on x's device, one per image (odd K, trimmed by _trim). "shift" (the
    # pipeline's, on every device): each pass a sum of shifted copies weighted per
    # image; elementwise float32 arithmetic, so it is deterministic and exact on a GPU
    # too, where cuDNN may pick its convolution algorithm per process
    # (cudnn.benchmark) or compute in TF32. "conv": one grouped convolution per pass.
    m, c, h, w = x.shape
    size = kernels.shape[1]
    centre = size // 2
    if method == "conv":
        weight = kernels.repeat_interleave(c, dim=0)
        flat = x.reshape(1, m * c, h, w)
        if centre:
            flat = F.pad(flat, (centre, centre, 0, 0), mode="reflect")
        flat = F.conv2d(flat, weight.view(m * c, 1, 1, size), groups=m * c)
        if centre:
            flat = F.pad(flat, (0, 0, centre, centre), mode="reflect")
        flat = F.conv2d(flat, weight.view(m * c, 1, size, 1), groups=m * c)
        return flat.view(m, c, h, w)
    pad = centre
    taps = kernels.t().reshape(size, m, 1, 1, 1)
    padded = F.pad(x, (pad, pad, 0, 0), mode="reflect") if pad else x
    rows = x.new_empty(m, c, h + 2 * pad, w)
    middle = torch.mul(padded[..., 0:w], taps[0], out=rows[:, :, pad : pad + h])
    for t in range(1, 2 * pad + 1):
        middle.addcmul_(padded[..., t : t + w], taps[t])
    if pad:  # reflect the rows pass's result (reflect padding of a row-filtered image)
        rows[:, :, :pad] = middle[:, :, 1 : pad + 1].flip(2)
        rows[:, :, pad + h :] = middle[:, :, h - 1 - pad : h - 1].flip(2)
    out = rows[:, :, 0:h] * taps[0]
    for t in range(1, 2 * pad + 1):
        out.addcmul_(rows[:, :, t : t + h], taps[t])
    return out


def gaussian_blur(
    x: Tensor, kernel_size: int, sigma: Tensor, *, method: BlurMethod = "shift"
) -> Tensor:
    """torchvision's ``gaussian_blur``, one ``sigma`` per image, reflect padding (a
    kernel wider than reflect padding allows is cut to the widest odd size that fits).
    ``method``: ``"shift"`` (sums of shifted copies; the augmentation's) or ``"conv"``
    (grouped convolutions)."""
    size = _blur_kernel_size(kernel_size, x.shape[-2], x.shape[-1])
    return _blur(x, _trim(gaussian_kernels(size, sigma)).to(x.device), method)


_JITTER_OPS = (_brightness_, _contrast_, _saturation_, _hue_)


# ---------------------------------------------------------------- crops and resizing


def random_resized_crop_boxes(
    heights: Tensor,
    widths: Tensor,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """RandomResizedCrop's boxes ``(B, 4)`` int64 ``(top, left, height, width)``, one
    per image of size ``heights[i] × widths[i]``.

    torchvision's ``RandomResizedCrop.make_params`` (after Szegedy et al. 2015),
    vectorised: up to 10 tries of an area fraction uniform in ``scale`` and a log-uniform
    aspect ratio, the first whose rounded box fits; then a uniform position. When none
    fits (tiny or very elongated images), the central crop clamped to the ratio range.
    Draws, from ``generator``: area (B, 10), log-ratio (B, 10), position (B, 2), all
    float64, whether or not they are used.
    """
    n = heights.shape[0]
    h_img, w_img = heights.double().view(n, 1), widths.double().view(n, 1)
    tries = 10
    area = h_img * w_img
    target = area * (scale[0] + (scale[1] - scale[0]) * _rand(generator, n, tries))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * _rand(generator, n, tries))
    position = _rand(generator, n, 2)
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, like Python's round
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    found = fits.any(dim=1)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    w_try, h_try = w.gather(1, first).view(n), h.gather(1, first).view(n)
    h_img, w_img = h_img.view(n), w_img.view(n)
    # The fallback: the central crop, clamped to the ratio range.
    in_ratio = w_img / h_img
    w_fb = torch.where(in_ratio > ratio[1], torch.round(h_img * ratio[1]), w_img)
    h_fb = torch.where(in_ratio < ratio[0], torch.round(w_img / ratio[0]), h_img)
    w_fb, h_fb = w_fb.clamp(1, None).minimum(w_img), h_fb.clamp(1, None).minimum(h_img)
    w_box = torch.where(found, w_try, w_fb)
    h_box = torch.where(found, h_try, h_fb)
    # Uniform position among the (size − box + 1) places (torch.randint's range).
    top_rand = torch.floor(position[:, 0] * (h_img - h_box + 1)).minimum(h_img - h_box)
    left_rand = torch.floor(position[:, 1] * (w_img - w_box + 1)).minimum(w_img - w_box)
    top = torch.where(found, top_rand, torch.div(h_img - h_box, 2, rounding_mode="floor"))
    left = torch.where(found, left_rand, torch.div(w_img - w_box, 2, rounding_mode="floor"))
    return torch.stack([top, left, h_box, w_box], dim=1).long()


def _rand(generator: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(*shape, generator=generator, dtype=torch.float64)


class _Axis(NamedTuple):
    """Resampling of one axis: output position i reads the source at source[:, i, k]
    with weight[:, i, k], k < K (zero weights pad the shorter filters)."""

    source: Tensor  # (B, S, K) int64, within the image
    weight: Tensor  # (B, S, K) float32


def _resize_axis(
    start: Tensor, length: Tensor, out_length: Tensor, offset: Tensor, size: int, gain: float
) -> _Axis:
    # The antialiased bilinear filter of torch's interpolate(antialias=True), which
    # torchvision's resize uses (ATen UpSampleKernel.cpp, _compute_indices_weights_aa,
    # after Pillow): resizing source[start : start + length] to out_length, output
    # positions offset .. offset + size − 1. The triangle filter is widened by the
    # scale when downsampling (support = scale), so every source pixel contributes.
    # In float64 (ATen uses the input's float32; the two agree to ~2e-5 relative).
    n = start.shape[0]
    length_f = length.double().view(n, 1)
    scale = length_f / out_length.double().view(n, 1)
    support = scale.clamp(min=1.0)
    centre = scale * (offset.double().view(n, 1) + torch.arange(size, dtype=torch.float64) + 0.5)
    first = (centre - support + 0.5).trunc().clamp(min=0.0)
    last = torch.minimum((centre + support + 0.5).trunc(), length_f)
    taps = (last - first).clamp(min=1.0)
    k = int(taps.max().item())
    j = torch.arange(k, dtype=torch.float64)
    arg = (j + first.unsqueeze(2) - centre.unsqueeze(2) + 0.5) / support.unsqueeze(2)
    weight = (1.0 - arg.abs()).clamp(min=0.0) * (j < taps.unsqueeze(2))
    total = weight.sum(dim=2, keepdim=True)
    weight = weight * (gain / torch.where(total > 0, total, 1.0))
    index = torch.minimum(first.unsqueeze(2) + j, length_f.unsqueeze(2) - 1)
    return _Axis(index.long() + start.view(n, 1, 1), weight.float())


def _flip_axis(axis: _Axis, flip: Tensor) -> _Axis:
    # Reading the columns in reverse order is the horizontal flip of the output.
    mask = flip.view(-1, 1, 1)
    return _Axis(
        torch.where(mask, axis.source.flip(1), axis.source),
        torch.where(mask, axis.weight.flip(1), axis.weight),
    )


def _resample(src: Tensor, rows: _Axis, cols: _Axis, box: tuple[int, int, int, int]) -> Tensor:
    """``src`` (B, C, H, W) uint8 or float → float32 (B, C, S, S) clamped to [0, 1].

    Columns then rows, each pass a few gathers of whole lines (``index_select``) and
    multiply-adds: the source's ``box = (top, bottom, left, right)`` (the lines any
    image reads) is transposed first, so the columns pass reads rows, and its result
    is transposed back for the rows pass (line gathers are ~4x faster than gathering
    single elements along the last axis)."""
    m, c = src.shape[:2]
    r0, r1, c0, c1 = box
    height, width = r1 - r0, c1 - c0
    size = cols.source.shape[1]
    lines = src[:, :, r0:r1, c0:c1].transpose(2, 3).reshape(m * c * width, height)
    base = (torch.arange(m * c, device=src.device) * width).view(m, c, 1)
    acc: Tensor | None = None
    for k in range(cols.source.shape[2]):
        picked = lines.index_select(0, (base + (cols.source[:, None, :, k] - c0)).view(-1))
        picked, weight = picked.view(m, c, size, height), cols.weight[:, None, :, k, None]
        acc = picked * weight if acc is None else acc.addcmul_(picked, weight)
    assert acc is not None
    lines = acc.transpose(2, 3).reshape(m * c * height, size)
    base = (torch.arange(m * c, device=src.device) * height).view(m, c, 1)
    out: Tensor | None = None
    for k in range(rows.source.shape[2]):
        picked = lines.index_select(0, (base + (rows.source[:, None, :, k] - r0)).view(-1))
        picked, weight = picked.view(m, c, size, size), rows.weight[:, None, :, k, None]
        out = picked.mul_(weight) if out is None else out.addcmul_(picked, weight)
    assert out is not None
    return out.clamp_(min=0.0).clamp_(max=1.0)


def resized_crop(images: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """torchvision's ``resized_crop(..., antialias=True)`` for a batch, one box
    ``(top, left, height, width)`` per image, optionally mirrored: uint8 (or [0, 1]
    float) ``(B, 3, H, W)`` → float32 ``(B, 3, size, size)`` in [0, 1]."""
    rows, cols = _crop_axes(boxes.cpu(), size, _gain(images))
    if flip is not None:
        cols = _flip_axis(cols, flip.cpu())
    device = images.device
    rows = _Axis(rows.source.to(device), rows.weight.to(device))
    cols = _Axis(cols.source.to(device), cols.weight.to(device))
    return _resample(images, rows, cols, (0, images.shape[2], 0, images.shape[3]))


def _crop_axes(boxes: Tensor, size: int, gain: float) -> tuple[_Axis, _Axis]:
    n = boxes.shape[0]
    out = torch.full((n,), size, dtype=torch.long)
    zero = torch.zeros(n, dtype=torch.long)
    rows = _resize_axis(boxes[:, 0], boxes[:, 2], out, zero, size, gain)
    cols = _resize_axis(boxes[:, 1], boxes[:, 3], out, zero, size, 1.0)
    return rows, cols


def _centre_square_axes(
    heights: Tensor, widths: Tensor, size: int, gain: float
) -> tuple[_Axis, _Axis]:
    # torchvision's resize(size) (shorter side to `size`, the longer to
    # int(size·long/short)) then center_crop(size) (anchor int(round((new − size)/2))),
    # as one resampling: the crop selects output positions of the resize.
    hs, ws = heights.tolist(), widths.tolist()
    new_h, new_w = [], []
    for h, w in zip(hs, ws, strict=True):
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        new_h.append(size if h <= w else new_long)
        new_w.append(size if w < h else new_long)
    new_h_t, new_w_t = torch.tensor(new_h), torch.tensor(new_w)
    top = torch.tensor([round((nh - size) / 2.0) for nh in new_h])
    left = torch.tensor([round((nw - size) / 2.0) for nw in new_w])
    zero = torch.zeros_like(heights)
    rows = _resize_axis(zero, heights, new_h_t, top, size, gain)
    cols = _resize_axis(zero, widths, new_w_t, left, size, 1.0)
    return rows, cols


# ------------------------------------------------------------------- the parameters


@dataclass(frozen=True)
class ViewParams:
    """One view's per-image random parameters, CPU tensors (:func:`draw_view_params`).

    Attributes:
        boxes: (B, 4) int64 crop boxes ``(top, left, height, width)`` in the source.
        flip: (B,) bool, horizontal flip.
        jitter: (B,) bool, colour jitter applied (RandomApply).
        factors: (B, 4) float32 brightness, contrast, saturation factors and hue shift.
        order: (B, 4) int64, the jitter operations' order (a permutation of 0..3).
        gray / blur / solarize: (B,) bool, each operation applied.
        sigma: (B,) float32, the blur's σ in pixels.
    """

    boxes: Tensor
    flip: Tensor
    jitter: Tensor
    factors: Tensor
    order: Tensor
    gray: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor

    def select(self, index: Tensor | slice) -> ViewParams:
        """The parameters of the images ``index`` selects."""
        return ViewParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def draw_view_params(
    view: ViewAugmentation, heights: Tensor, widths: Tensor, generator: torch.Generator
) -> ViewParams:
    """Draw one view's parameters for images of sizes ``heights × widths`` from
    ``generator`` (a CPU generator).

    The draws, in this order, each a whole-batch tensor, all made whatever the recipe's
    probabilities (so the layout depends on the batch size only): the crops
    (:func:`random_resized_crop_boxes`: float64 (B, 10), (B, 10), (B, 2)); then float32
    uniforms: flip (B,), jitter applied (B,), jitter factors (B, 4), jitter order
    (B, 4, argsort), grayscale (B,), blur applied (B,), blur σ (B,), solarize (B,).
    The views of a seed are those of this layout: a checkpoint written with the
    layout of commit 5f3d2a6 or earlier (one draw per try of the crop, a whole-image
    fallback, jitter order as argsort per position) resumes with other views than its
    uninterrupted run would have seen; a run started with this one replays exactly.
    """
    n = heights.shape[0]
    boxes = random_resized_crop_boxes(heights, widths, view.crop_scale, generator)

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    flip = uniform(n) < view.flip_p
    jitter = uniform(n) < (view.jitter_p if view.jitter is not None else 0.0)
    b, c, s, h = view.jitter if view.jitter is not None else (0.0, 0.0, 0.0, 0.0)
    low = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    high = torch.tensor([1 + b, 1 + c, 1 + s, h])
    factors = low + (high - low) * uniform(n, 4)
    order = torch.argsort(uniform(n, 4), dim=1, stable=True)
    gray = uniform(n) < view.gray_p
    blur = uniform(n) < view.blur_p
    sigma = view.blur_sigma[0] + (view.blur_sigma[1] - view.blur_sigma[0]) * uniform(n)
    solarize = uniform(n) < view.solarize_p
    return ViewParams(boxes, flip, jitter, factors, order, gray, blur, sigma, solarize)


def _jitter_enabled(view: ViewAugmentation) -> tuple[bool, bool, bool, bool]:
    if view.jitter is None:
        return (False, False, False, False)
    b, c, s, h = view.jitter
    return (b > 0, c > 0, s > 0, h > 0)


# ------------------------------------------------------------------- one-transfer move

_Layout = list[tuple[int, int, torch.dtype, torch.Size]]


def _pack(tensors: Sequence[Tensor]) -> tuple[Tensor, _Layout]:
    """CPU tensors as one uint8 buffer (each at an 8-byte aligned offset) and its layout."""
    parts: list[Tensor] = []
    layout: _Layout = []
    offset = 0
    for t in tensors:
        raw = t.detach().contiguous().view(-1).view(torch.uint8)
        pad = -offset % 8
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8))
            offset += pad
        parts.append(raw)
        layout.append((offset, raw.numel(), t.dtype, t.shape))
        offset += raw.numel()
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)), layout


def _unpack(buffer: Tensor, layout: _Layout) -> list[Tensor]:
    """The tensors :func:`_pack` packed, as views of ``buffer`` (on any device)."""
    return [buffer[o : o + size].view(dtype).view(shape) for o, size, dtype, shape in layout]


def _to_device(tensors: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """Move CPU tensors to ``device`` in one host-to-device copy, from pinned memory on
    CUDA (asynchronous: the host does not wait for the device)."""
    if device.type == "cpu":
        return list(tensors)
    buffer, layout = _pack(tensors)
    if device.type == "cuda":
        buffer = buffer.pin_memory()
    return _unpack(buffer.to(device, non_blocking=True), layout)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    # Small constants made once per device: a fresh host-to-device copy from pageable
    # memory each call would wait for the device.
    return torch.tensor(values, dtype=dtype, device=device).view(1, len(values), 1, 1)


# ---------------------------------------------------------------------- the augmenters

Images = Tensor | Sequence[Tensor]


def _device(images: Images) -> torch.device:
    return images.device if isinstance(images, Tensor) else images[0].device


def _gain(images: Images) -> float:
    # uint8 → [0, 1] is folded into the resampling weights.
    first = images if isinstance(images, Tensor) else images[0]
    return 1.0 / 255.0 if first.dtype == torch.uint8 else 1.0


def _image(images: Images, i: int) -> Tensor:
    return images[i : i + 1] if isinstance(images, Tensor) else images[i].unsqueeze(0)


def _sizes(images: Images) -> tuple[Tensor, Tensor]:
    if isinstance(images, Tensor):
        n, _, h, w = images.shape
        return torch.full((n,), h, dtype=torch.long), torch.full((n,), w, dtype=torch.long)
    shapes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.long)
    shapes = shapes.view(-1, 2)
    return shapes[:, 0].contiguous(), shapes[:, 1].contiguous()


def _pad_batch(images: Sequence[Tensor]) -> Tensor:
    # Images of different sizes, one buffer: each at the top-left of a zero canvas (the
    # resampling never reads outside an image's own box). One copy per image.
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    first = images[0]
    batch = torch.zeros(len(images), 3, height, width, dtype=first.dtype, device=first.device)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[-2], : image.shape[-1]].copy_(image)
    return batch


def _normalise(x: Tensor, mean: Tensor, std: Tensor, out: Tensor | None = None) -> Tensor:
    # torchvision's normalize: (x − mean) / std.
    return torch.div(x.sub_(mean), std, out=out) if out is not None else x.sub_(mean).div_(std)


def _flat(axes: tuple[_Axis, _Axis]) -> list[Tensor]:
    return [axes[0].source, axes[0].weight, axes[1].source, axes[1].weight]


def _axis(axis: _Axis, i: int) -> _Axis:
    return _Axis(axis.source[i : i + 1], axis.weight[i : i + 1])


# The CPU strategy's chunks: below 128 px, as many images as make 2 MiB of float32 (a
# chunk's pass per operation then runs from cache, not memory, and the Python dispatch
# of ~100 operations is paid per chunk); from 128 px, one image at a time (its 0.2-0.6
# MiB and temporaries stay in L2, and its parameters are Python numbers). Measured on
# one core at 32-224 px: whole-batch passes stream 38 MB per operation at 64 x 224 px;
# one image at a time is 3x slower than chunks at 32 px, chunks 1.2x slower at 224 px.
_CHUNK_BYTES = 2 * 1024 * 1024
_PER_IMAGE_FROM = 128


def chunk_size(image_size: int) -> int:
    """How many images the CPU strategy augments at a time at ``image_size`` px."""
    if image_size >= _PER_IMAGE_FROM:
        return 1
    return max(1, _CHUNK_BYTES // (3 * image_size * image_size * 4))


@dataclass
class _Plan:
    """A view's work on the batch path: CPU tensors (the crop's axes, then each step's
    indices and values, moved in one transfer) and the steps, each
    ``(operation, slot of its image indices or -1 for all, slot of its values)``."""

    tensors: list[Tensor]
    steps: list[tuple[str, int, int]]


class BatchViewAugment:
    """One view's augmentation vectorised over a batch, per-sample random parameters.

    torchvision's operations (RandomResizedCrop's sampling and antialiased resize,
    horizontal flip, ColorJitter in a random order per image, RandomGrayscale,
    GaussianBlur, RandomSolarize, Normalize) with every random number drawn on the CPU
    from the ``generator`` it is given, so the result is a pure function of the images
    and the generator's seed. Images: uint8 (or [0, 1] float) ``(B, 3, H, W)`` on any
    device, or a list of ``(3, H_i, W_i)`` images of different sizes (cropped from the
    full image).

    Two strategies compute the same function: ``chunked`` (the CPU's default) runs the
    batch :func:`chunk_size` images at a time, so each chunk stays in cache through the
    pipeline (one image at a time at large sizes and for full images of different
    sizes); otherwise (an accelerator's default) the whole batch at once, its
    parameters moved in one transfer and every index chosen on the CPU. On one device
    they agree bit for bit but for the blur's skipped taps (~1e-7, see ``_trim``).
    """

    def __init__(self, view: ViewAugmentation, mean: Sequence[float], std: Sequence[float]) -> None:
        self.view = view
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: Images, generator: torch.Generator) -> Tensor:
        """Images → normalised float32 ``(B, 3, S, S)`` on the images' device."""
        heights, widths = _sizes(images)
        return self.apply(images, draw_view_params(self.view, heights, widths, generator))

    def apply(self, images: Images, params: ViewParams, *, chunked: bool | None = None) -> Tensor:
        """Apply drawn ``params``; ``chunked`` forces a strategy (default: chunked on
        the CPU, the whole batch elsewhere)."""
        device = _device(images)
        if chunked if chunked is not None else device.type == "cpu":
            return self.apply_chunked(images, params)
        plan = self.plan(images, params)
        *moved, mean, std = _to_device([*plan.tensors, self.mean, self.std], device)
        src = images if isinstance(images, Tensor) else _pad_batch(images)
        return self.run(src, plan, moved, mean, std)

    # The CPU: chunk by chunk -----------------------------------------------------------

    def apply_chunked(self, images: Images, params: ViewParams) -> Tensor:
        """The chunked strategy (see the class)."""
        size = self.view.image_size
        chunk = chunk_size(size)
        if chunk == 1 or not isinstance(images, Tensor):
            # (Full images of different sizes: each cropped from its own box, not padded.)
            return self._per_image(images, params)
        device = _device(images)
        n = params.boxes.shape[0]
        out = torch.empty(n, 3, size, size, device=device)
        mean, std = self.mean.to(device), self.std.to(device)
        for start in range(0, n, chunk):
            part = slice(start, min(n, start + chunk))
            sub = images[part]
            plan = self.plan(sub, params.select(part))
            self.run(sub, plan, plan.tensors, mean, std, out=out[part])
        return out

    def _per_image(self, images: Images, params: ViewParams) -> Tensor:
        # Chunks of one image, without the batch path's bookkeeping: its steps are plain
        # calls on the same operations (so the result is the same, bit for bit).
        view, size = self.view, self.view.image_size
        device = _device(images)
        n = params.boxes.shape[0]
        out = torch.empty(n, 3, size, size, device=device)
        if n == 0:
            return out
        rows, cols = _crop_axes(params.boxes, size, _gain(images))
        cols = _flip_axis(cols, params.flip)
        enabled = _jitter_enabled(view)
        mean, std = self.mean.to(device), self.std.to(device)
        boxes = params.boxes.tolist()
        jitter, order = params.jitter.tolist(), params.order.tolist()
        factors = params.factors.view(n, 4, 1, 1, 1).to(device)
        gray, blur, solar = params.gray.tolist(), params.blur.tolist(), params.solarize.tolist()
        kernels = gaussian_kernels(_blur_kernel_size(view.blur_kernel, size, size), params.sigma)
        for i in range(n):
            top, left, height, width = boxes[i]
            box = (top, top + height, left, left + width)
            x = _resample(_image(images, i), _axis(rows, i), _axis(cols, i), box)
            if jitter[i]:
                for op in order[i]:
                    if enabled[op]:
                        x = _JITTER_OPS[op](x, factors[i, op : op + 1])
            if gray[i]:
                x = _gray_(x)
            if blur[i]:
                x = _blur(x, _trim(kernels[i : i + 1]).to(device))
            if solar[i]:
                x = _solarize_(x)
            _normalise(x, mean, std, out=out[i : i + 1])
        return out

    # A batch at once -------------------------------------------------------------------

    def plan(self, images: Images, params: ViewParams) -> _Plan:
        """Everything :meth:`run` needs, as CPU tensors (to move in one transfer): the
        crop's axes, then for each operation the images it applies to (chosen here, on
        the CPU, so the device never reports back) and its per-image values."""
        view, size = self.view, self.view.image_size
        rows, cols = _crop_axes(params.boxes, size, _gain(images))
        cols = _flip_axis(cols, params.flip)
        tensors = [rows.source, rows.weight, cols.source, cols.weight]
        steps: list[tuple[str, int, int]] = []
        n = params.boxes.shape[0]

        def add(tensor: Tensor) -> int:
            tensors.append(tensor)
            return len(tensors) - 1

        def subset(mask: Tensor) -> int | None:
            # The slot of the image indices `mask` selects; -1: every image; None: none.
            count = int(mask.sum())
            if count == 0:
                return None
            return -1 if count == n else add(torch.nonzero(mask).view(-1))

        enabled = _jitter_enabled(view)
        for position in range(4):
            for op in range(4):
                mask = params.jitter & (params.order[:, position] == op)
                slot = subset(mask) if enabled[op] else None
                if slot is not None:
                    factors = params.factors[mask, op].view(-1, 1, 1, 1)
                    steps.append((f"jitter{op}", slot, add(factors)))
        slot = subset(params.gray)
        if slot is not None:
            steps.append(("gray", slot, -1))
        slot = subset(params.blur)
        if slot is not None:
            k_size = _blur_kernel_size(view.blur_kernel, size, size)
            kernels = _trim(gaussian_kernels(k_size, params.sigma[params.blur]))
            steps.append(("blur", slot, add(kernels)))
        slot = subset(params.solarize)
        if slot is not None:
            steps.append(("solarize", slot, -1))
        return _Plan(tensors, steps)

    def run(
        self,
        src: Tensor,
        plan: _Plan,
        moved: list[Tensor],
        mean: Tensor,
        std: Tensor,
        *,
        out: Tensor | None = None,
    ) -> Tensor:
        """Execute ``plan`` on the batch ``src`` (the plan's tensors ``moved`` where
        ``src`` is); every operation on the whole batch or on the sub-batch it selects."""
        rows, cols = _Axis(moved[0], moved[1]), _Axis(moved[2], moved[3])
        x = _resample(src, rows, cols, (0, src.shape[2], 0, src.shape[3]))
        for name, slot, values in plan.steps:
            index = None if slot == -1 else moved[slot]
            sub = x if index is None else x.index_select(0, index)
            if name.startswith("jitter"):
                sub = _JITTER_OPS[int(name[-1])](sub, moved[values])
            elif name == "gray":
                sub = _gray_(sub)
            elif name == "blur":
                sub = _blur(sub, moved[values])
            else:
                sub = _solarize_(sub)
            x = sub if index is None else x.index_copy_(0, index, sub)
        return _normalise(x, mean, std, out=out)


class AugmentedViews(NamedTuple):
    """A batch's two views and, when asked for, its clean normalised images."""

    view1: Tensor
    view2: Tensor
    clean: Tensor | None


class TwoViewAugment:
    """A raw batch → its two augmented views (and clean images), on any device.

    The views are those the SSL loader's workers make for the same batch (the same
    parameters, drawn from ``torch.Generator().manual_seed(seed)`` on the CPU, view 1
    then view 2): bitwise on the CPU, to float rounding on a GPU (whose convolution,
    reduction order and JPEG decoder differ). ``images`` are either uint8
    ``(B, 3, H, W)`` already on the target device (a non-blocking copy of the loader's
    pinned batch), or :class:`EncodedImages` (an image folder's files), which are
    decoded on ``device`` — nvJPEG on CUDA — and cropped from the full image. On a GPU
    all the batch's parameters go to the device in one transfer, every index is chosen
    on the CPU, and nothing waits for the device.

    ``clean``: the un-augmented normalised images, for the online probe: the batch as
    is, or for full images the evaluation transform (shorter side to S, centre crop).
    """

    def __init__(
        self,
        kind: str,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        with_clean: bool = False,
    ) -> None:
        first, second = view_augmentations(kind, image_size)
        self.views = (BatchViewAugment(first, mean, std), BatchViewAugment(second, mean, std))
        self.image_size = image_size
        self.with_clean = with_clean
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(
        self,
        images: Tensor | Sequence[Tensor] | EncodedImages,
        seed: int,
        *,
        device: torch.device | str | None = None,
        chunked: bool | None = None,
    ) -> AugmentedViews:
        """Make the views of a batch whose seed is ``seed`` (the loader's batch seed).

        ``images``: uint8 ``(B, 3, H, W)``, a list of uint8 ``(3, H_i, W_i)`` full
        images, or :class:`EncodedImages`. ``device``: where to decode the latter
        (default CPU), or where to move the others first (non-blocking); default: where
        the images are. ``chunked`` forces a strategy (:class:`BatchViewAugment`).
        """
        batch: Images
        if isinstance(images, EncodedImages):
            batch = decode_batch(images.split(), torch.device(device or "cpu"))
        elif isinstance(images, Tensor):
            batch = images if device is None else images.to(device, non_blocking=True)
        else:
            batch = [
                image if device is None else image.to(device, non_blocking=True) for image in images
            ]
        generator = torch.Generator().manual_seed(seed)
        heights, widths = _sizes(batch)
        first, second = self.views
        params1 = draw_view_params(first.view, heights, widths, generator)
        params2 = draw_view_params(second.view, heights, widths, generator)
        target = _device(batch)
        if chunked if chunked is not None else target.type == "cpu":
            view1 = first.apply_chunked(batch, params1)
            view2 = second.apply_chunked(batch, params2)
            clean = self._clean_per_image(batch) if self.with_clean else None
            return AugmentedViews(view1, view2, clean)
        plan1, plan2 = first.plan(batch, params1), second.plan(batch, params2)
        square = self._is_square(batch)
        clean_axes = [] if square or not self.with_clean else _flat(self._clean_axes(batch))
        tensors = [*plan1.tensors, *plan2.tensors, *clean_axes, self.mean, self.std]
        moved = _to_device(tensors, target)
        mean, std = moved[-2], moved[-1]
        moved1 = moved[: len(plan1.tensors)]
        moved2 = moved[len(plan1.tensors) : len(plan1.tensors) + len(plan2.tensors)]
        src = batch if isinstance(batch, Tensor) else _pad_batch(batch)
        view1 = first.run(src, plan1, moved1, mean, std)
        view2 = second.run(src, plan2, moved2, mean, std)
        clean = None
        if self.with_clean and square:
            clean = self._normalise_square(src, mean, std)
        elif self.with_clean:
            axes = moved[len(moved1) + len(moved2) : -2]
            rows, cols = _Axis(axes[0], axes[1]), _Axis(axes[2], axes[3])
            full = (0, src.shape[2], 0, src.shape[3])
            clean = _normalise(_resample(src, rows, cols, full), mean, std)
        return AugmentedViews(view1, view2, clean)

    def clean(self, images: Images, *, chunked: bool | None = None) -> Tensor:
        """The evaluation images, normalised: a square batch of side S as is (uint8
        scaled to [0, 1]); images of other sizes resized (shorter side to S,
        antialiased) and centre-cropped, as torchvision's ``resize`` + ``center_crop``."""
        device = _device(images)
        if chunked if chunked is not None else device.type == "cpu":
            return self._clean_per_image(images)
        mean, std = _to_device([self.mean, self.std], device)
        src = images if isinstance(images, Tensor) else _pad_batch(images)
        if self._is_square(images):
            return self._normalise_square(src, mean, std)
        rows, cols = self._clean_axes(images)
        moved = _to_device(_flat((rows, cols)), device)
        full = (0, src.shape[2], 0, src.shape[3])
        x = _resample(src, _Axis(moved[0], moved[1]), _Axis(moved[2], moved[3]), full)
        return _normalise(x, mean, std)

    def _is_square(self, images: Images) -> bool:
        size = self.image_size
        return isinstance(images, Tensor) and tuple(images.shape[-2:]) == (size, size)

    @staticmethod
    def _normalise_square(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        # As the evaluation loader: (x / 255 − mean) / std.
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (x - mean) / std

    def _clean_axes(self, images: Images) -> tuple[_Axis, _Axis]:
        heights, widths = _sizes(images)
        return _centre_square_axes(heights, widths, self.image_size, _gain(images))

    def _clean_per_image(self, images: Images) -> Tensor:
        device = _device(images)
        mean, std = self.mean.to(device), self.std.to(device)
        if self._is_square(images):
            assert isinstance(images, Tensor)
            return self._normalise_square(images, mean, std)
        size = self.image_size
        rows, cols = self._clean_axes(images)
        n = rows.source.shape[0]
        out = torch.empty(n, 3, size, size, device=device)
        for i in range(n):
            src = _image(images, i)
            full = (0, src.shape[2], 0, src.shape[3])
            x = _resample(src, _axis(rows, i), _axis(cols, i), full)
            _normalise(x, mean, std, out=out[i : i + 1])
        return out
