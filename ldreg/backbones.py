"""Backbones: torchvision ResNets with a small-image stem, and Vision Transformers for MAE.

Every backbone maps float images ``(B, 3, H, W)`` to features ``(B, feature_dim)`` and
carries a ``feature_dim`` attribute; these features are what LDReg regularizes and what
the LID / rank / kNN evaluation reads. Weights are always randomly initialised: no
pretrained weights are ever downloaded or loaded.

Usage::

    backbone, dim = build_backbone("resnet18", image_size=32, width=32)
    features = backbone(images)            # (B, dim)

    vit, dim = build_backbone("vit_tiny", image_size=32)
    cls, tokens, mask, ids_restore = vit.forward_masked(images, mask_ratio=0.75)
"""

from __future__ import annotations

import math

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ldreg import registry
from ldreg.errors import UserError


class ResNetBackbone(ResNet):
    """A torchvision ResNet without its classifier, with a configurable base width.

    torchvision's ``width_per_group`` only widens Bottleneck blocks, so the stage widths
    (``width``, 2×, 4×, 8×) are set here directly; the blocks, ``_make_layer`` and the
    forward pass are torchvision's own.

    Attributes:
        feature_dim: ``8 * width * block.expansion`` (512 for ResNet-18, 2048 for
            ResNet-50 at the standard width 64).
        small_stem: True replaces the 7×7/2 conv + max-pool with a 3×3/1 conv and no
            pooling, as in SimCLR's CIFAR variant (Chen et al. 2020, Appendix B.9), so
            8–64 px inputs are not shrunk 4× before the first stage.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        *,
        width: int = 64,
        small_stem: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        # State torchvision's _make_layer reads.
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64  # keeps Bottleneck's inner width == planes
        self.small_stem = small_stem

        if small_stem:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.feature_dim = width * 8 * block.expansion

        # torchvision's initialisation (He et al. 2015 fan-out for convs).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def sincos_pos_embed_2d(dim: int, grid_size: int, *, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings, ``(1 + grid², dim)`` with a zero CLS row.

    Half the channels encode the row, half the column, each with the 1-D transformer
    encoding of Vaswani et al. 2017 (Sec. 3.5); MAE uses these frozen (He et al. 2022,
    Appendix A.1).
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, found {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    embed = torch.cat([encode(rows), encode(cols)], dim=1)
    if cls_token:
        embed = torch.cat([torch.zeros(1, dim, dtype=torch.float64), embed], dim=0)
    return embed.float()


def random_masking(
    tokens: Tensor, mask_ratio: float, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by argsort of uniform noise (He et al. 2022, Sec. 3).

    Args:
        tokens: ``(B, L, D)`` patch tokens (position embeddings already added).
        mask_ratio: fraction of the ``L`` patches to remove; at least one is kept.

    Returns:
        ``(kept (B, L_keep, D), mask (B, L) float with 1 = removed, ids_restore (B, L))``;
        ``ids_restore`` unshuffles a ``[kept, mask tokens]`` sequence to patch order.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), found {mask_ratio}")
    batch, length, dim = tokens.shape
    keep = max(1, int(length * (1.0 - mask_ratio)))
    noise = torch.rand(batch, length, device=tokens.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=tokens.device)
    mask[:, :keep] = 0.0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W)`` → ``(B, L, p·p·C)`` in the row-major patch order of ``PatchEmbed``."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify` for square images."""
    b, length, _ = patches.shape
    grid = math.isqrt(length)
    if grid * grid != length:
        raise ValueError(f"{length} patches do not form a square grid")
    p = patch_size
    x = patches.reshape(b, grid, grid, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, grid * p, grid * p)


class VisionTransformer(nn.Module):
    """ViT encoder (Dosovitskiy et al. 2021) with MAE's masked forward (He et al. 2022).

    Built from timm's ``PatchEmbed`` and pre-norm ``Block``; position embeddings are
    the fixed 2-D sin-cos ones MAE uses. The feature of an image is the CLS token after
    the final LayerNorm — the representation LDReg regularizes for MAE (Huang et al.
    2024, Sec. 5: "the CLS token").

    Attributes:
        embed_dim / feature_dim: token width ``D``.
        patch_size: side of a square patch in pixels.
        num_patches: ``L = (image_size / patch_size)²``.
        grid_size: patches per side.
    """

    pos_embed: Tensor  # a buffer: fixed sin-cos embeddings

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise UserError(
                f"image size {image_size} is not divisible by the ViT patch size {patch_size}",
                code="invalid_backbone",
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.feature_dim = embed_dim
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2

        self.patch_embed = PatchEmbed(
            img_size=image_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer(
            "pos_embed",
            sincos_pos_embed_2d(embed_dim, self.grid_size, cls_token=True).unsqueeze(0),
            persistent=False,
        )
        self.blocks = nn.Sequential(
            *[
                Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's initialisation (authors' models_mae.py): xavier on the patch projection
        # viewed as a Linear, N(0, 0.02) CLS token, xavier-uniform Linears.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _patch_tokens(self, x: Tensor) -> Tensor:
        return self.patch_embed(x) + self.pos_embed[:, 1:, :]

    def _encode(self, patch_tokens: Tensor) -> Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(patch_tokens.shape[0], -1, -1)
        return self.norm(self.blocks(torch.cat([cls, patch_tokens], dim=1)))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` → CLS token after the final norm, ``(B, D)``."""
        return self._encode(self._patch_tokens(x))[:, 0]

    def forward_masked(
        self, x: Tensor, mask_ratio: float, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Encode only the visible patches of each image (MAE encoder, He et al. 2022).

        Returns ``(cls (B, D), tokens (B, 1 + L_keep, D), mask (B, L), ids_restore (B, L))``
        where ``tokens`` are the normed encoder outputs (CLS first), ``mask`` is 1 for
        removed patches and ``ids_restore`` restores patch order for the decoder.
        """
        kept, mask, ids_restore = random_masking(
            self._patch_tokens(x), mask_ratio, generator=generator
        )
        tokens = self._encode(kept)
        return tokens[:, 0], tokens, mask, ids_restore


def default_patch_size(image_size: int) -> int:
    """4 px patches up to 32 px images, 8 up to 64, else 16 — 64+ tokens on small images."""
    if image_size <= 32:
        return 4
    if image_size <= 64:
        return 8
    return 16


def build_backbone(
    name: str,
    *,
    image_size: int,
    width: int | None = None,
    small_stem: bool | None = None,
    patch_size: int | None = None,
) -> tuple[nn.Module, int]:
    """Build a randomly initialised backbone and return ``(module, feature_dim)``.

    Args:
        name: a backbone of ``ldreg.registry.BACKBONES``.
        image_size: input side in pixels (sets the ResNet stem default and the ViT grid).
        width: ResNet base width (64 is torchvision's); ignored by ViTs.
        small_stem: ResNet 3×3 stride-1 stem without max-pool; default ``image_size <= 64``.
        patch_size: ViT patch side; default from :func:`default_patch_size`.
    """
    entry = registry.BACKBONES.get(name)
    if entry is None:
        raise UserError(
            f"unknown backbone '{name}'; expected one of {', '.join(registry.BACKBONES)}",
            code="invalid_backbone",
        )
    if entry.family == "resnet":
        block = Bottleneck if entry.bottleneck else BasicBlock
        layers = list(entry.blocks)
        if width is not None and width < 1:
            raise UserError(
                f"ResNet width must be positive, found {width}", code="invalid_backbone"
            )
        model = ResNetBackbone(
            block,
            layers,
            width=64 if width is None else width,
            small_stem=image_size <= 64 if small_stem is None else small_stem,
        )
        return model, model.feature_dim
    vit = VisionTransformer(
        image_size=image_size,
        patch_size=default_patch_size(image_size) if patch_size is None else patch_size,
        embed_dim=entry.dim,
        depth=entry.depth,
        num_heads=entry.heads,
    )
    return vit, vit.feature_dim
