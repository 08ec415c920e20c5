"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning", NeurIPS; authors' code: deepmind/deepmind-research/byol).

Usage::

    loss = byol_loss(p1, z2_target) + byol_loss(p2, z1_target)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldreg.methods.base import (
    MethodOutput,
    SSLMethod,
    check_views,
    cosine_momentum,
    ema_update,
    frozen_copy,
    mlp,
)
from ldreg.spec import PretrainSpec


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean of 2 − 2·cos(q, z'), the normalised MSE of Grill et al. 2020, Eq. 2."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction and target must match, found {tuple(prediction.shape)}"
            f" and {tuple(target.shape)}"
        )
    cos = F.cosine_similarity(prediction, target.detach(), dim=1)
    return (2.0 - 2.0 * cos).mean()


class BYOLLoss(nn.Module):
    """Symmetrised BYOL loss: each view's prediction regresses the other view's target."""

    def forward(self, p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
        return byol_loss(p1, t2) + byol_loss(p2, t1)


class BYOL(SSLMethod):
    """Online backbone → projector → predictor; EMA target backbone → projector.

    Defaults: projector and predictor 4096 → 256 (Grill et al. 2020, Sec. 3.3), target
    momentum from 0.99 (solo-learn's CIFAR value; 0.996 on ImageNet) to 1 on a cosine.

    For LDReg the target encoder's features join the reference set and the term is
    summed over the two views, as in the LDReg authors' BYOL loss (Huang et al. 2024,
    ``losses/byol_loss.py``: ``main_loss + alpha * (lid_reg_f_0 + lid_reg_f_1)``).
    """

    name = "byol"

    def __init__(self, spec: PretrainSpec, backbone: nn.Module, feat_dim: int) -> None:
        super().__init__(spec, backbone, feat_dim)
        opts = spec.method_options
        proj_dim = opts.proj_dim or self.heads.proj_dim
        self.projector = mlp(feat_dim, opts.proj_hidden_dim or self.heads.proj_hidden, proj_dim)
        self.predictor = mlp(proj_dim, opts.pred_hidden_dim or self.heads.pred_hidden, proj_dim)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        self.momentum_base = 0.99 if opts.momentum_base is None else opts.momentum_base
        self.criterion = BYOLLoss()

    def forward(self, view1: Tensor, view2: Tensor) -> MethodOutput:
        check_views(view1, view2)
        b = view1.shape[0]
        views = torch.cat([view1, view2])
        features = self.backbone(views)
        projections = self.projector(features)
        predictions = self.predictor(projections)
        with torch.no_grad():
            target_features = self.target_backbone(views)
            target_projections = self.target_projector(target_features)
        loss = self.criterion(
            predictions[:b], predictions[b:], target_projections[:b], target_projections[b:]
        )
        return MethodOutput(
            loss=loss,
            features=features,
            projections=projections,
            extra_reference={
                "features": target_features.detach(),
                "projections": target_projections.detach(),
            },
        )

    @torch.no_grad()
    def update_target(self, *, step: int, total_steps: int) -> None:
        momentum = cosine_momentum(step, total_steps, self.momentum_base)
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)
