"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning", NeurIPS; authors' code: deepmind/deepmind-research/byol).

Usage::

    loss = byol_loss(p1, z2_target) + byol_loss(p2, z1_target)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ldreg.methods.base import (
    MomentumMethod,
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


class BYOL(MomentumMethod):
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
        self.make_target(spec)
        self.criterion = BYOLLoss()
