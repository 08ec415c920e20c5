"""MAE (He, Chen, Xie, Li, Dollár, Girshick 2022, "Masked Autoencoders Are Scalable
Vision Learners", CVPR; authors' code: facebookresearch/mae, ``models_mae.py``).

Usage::

    loss = mae_loss(images, pred, mask, patch_size=4)   # pred: (B, L, p·p·3)
"""

from __future__ import annotations

from typing import cast

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ldreg.backbones import VisionTransformer, patchify, sincos_pos_embed_2d
from ldreg.errors import UserError
from ldreg.methods.base import MethodOutput, SSLMethod, check_views
from ldreg.spec import PretrainSpec


def mae_loss(
    images: Tensor, pred: Tensor, mask: Tensor, *, patch_size: int, norm_pix: bool = True
) -> Tensor:
    """Mean squared error on the removed patches only, against per-patch normalised pixels.

    With ``norm_pix`` each target patch is standardised by its own mean and variance
    (He et al. 2022, Sec. 3 "Reconstruction target"; the authors' ``norm_pix_loss``).
    """
    target = patchify(images, patch_size)
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction must be {tuple(target.shape)} (B, L, p·p·C), found {tuple(pred.shape)}"
        )
    if mask.shape != target.shape[:2]:
        raise ValueError(f"mask must be {tuple(target.shape[:2])}, found {tuple(mask.shape)}")
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


class MAEDecoder(nn.Module):
    """Lightweight transformer decoder: visible tokens + mask tokens → pixels per patch.

    As the authors' decoder (embed, append mask tokens, unshuffle with ``ids_restore``,
    add fixed sin-cos positions, pre-norm blocks, LayerNorm, linear to p·p·3) but
    narrower and shallower by default, since inputs here are small images.
    """

    pos_embed: Tensor  # a buffer: fixed sin-cos embeddings

    def __init__(
        self,
        *,
        embed_dim: int,
        decoder_dim: int,
        depth: int,
        num_heads: int,
        grid_size: int,
        patch_size: int,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "pos_embed",
            sincos_pos_embed_2d(decoder_dim, grid_size, cls_token=True).unsqueeze(0),
            persistent=False,
        )
        self.blocks = nn.Sequential(
            *[Block(decoder_dim, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.pred = nn.Linear(decoder_dim, patch_size * patch_size * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.embed(tokens)
        b, kept, dim = x.shape
        length = ids_restore.shape[1]
        masks = self.mask_token.expand(b, length + 1 - kept, -1)
        patches = torch.cat([x[:, 1:], masks], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])


class MAE(SSLMethod):
    """ViT encoder on the visible patches + small decoder, normalised-pixel loss.

    Both views are reconstructed (each with its own random mask) so that, like every
    method, ``features`` holds both views; these are the encoder's CLS tokens, which
    LDReg regularizes for MAE (Huang et al. 2024, Sec. 5). Defaults: mask ratio 0.75,
    decoder 128 wide and 2 blocks deep.
    """

    name = "mae"

    def __init__(self, spec: PretrainSpec, backbone: nn.Module, feat_dim: int) -> None:
        super().__init__(spec, backbone, feat_dim)
        if not isinstance(backbone, VisionTransformer):
            raise UserError(
                "method 'mae' needs a ViT backbone with a masked forward", code="invalid_spec"
            )
        if spec.ldreg is not None and spec.ldreg.target == "projections":
            raise UserError(
                "method 'mae' has no projector: use ldreg.target 'features' (the CLS token)",
                code="invalid_spec",
            )
        opts = spec.method_options
        self.mask_ratio = 0.75 if opts.mask_ratio is None else opts.mask_ratio
        self.patch_size = backbone.patch_size
        decoder_dim = opts.decoder_dim or self.heads.decoder_dim
        if decoder_dim % 4:
            raise UserError(
                f"method_options.decoder_dim must be divisible by 4, found {decoder_dim}",
                code="invalid_spec",
            )
        heads = next(h for h in (8, 4, 2, 1) if decoder_dim % h == 0)
        self.decoder = MAEDecoder(
            embed_dim=backbone.embed_dim,
            decoder_dim=decoder_dim,
            depth=opts.decoder_depth or self.heads.decoder_depth,
            num_heads=heads,
            grid_size=backbone.grid_size,
            patch_size=self.patch_size,
        )

    @property
    def vit(self) -> VisionTransformer:
        """The backbone, typed (``__init__`` checked it is a ViT)."""
        return cast(VisionTransformer, self.backbone)

    def forward(self, view1: Tensor, view2: Tensor) -> MethodOutput:
        check_views(view1, view2)
        images = torch.cat([view1, view2])
        cls, tokens, mask, ids_restore = self.vit.forward_masked(images, self.mask_ratio)
        pred = self.decoder(tokens, ids_restore)
        loss = mae_loss(images, pred, mask, patch_size=self.patch_size)
        return MethodOutput(loss=loss, features=cls, projections=None)
