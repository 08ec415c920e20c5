"""VICReg (Bardes, Ponce, LeCun 2022, "VICReg: Variance-Invariance-Covariance
Regularization for Self-Supervised Learning", ICLR; authors' code:
facebookresearch/vicreg, ``main_vicreg.py``).

Usage::

    loss = vicreg_loss(z1, z2)   # 25·invariance + 25·variance + 1·covariance
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldreg.distributed import gather_for_loss
from ldreg.methods.barlow_twins import off_diagonal
from ldreg.methods.base import MethodOutput, SSLMethod, check_views, mlp
from ldreg.spec import PretrainSpec


def invariance_loss(z1: Tensor, z2: Tensor) -> Tensor:
    """Mean squared distance between the two views' embeddings (Bardes et al., Eq. 5)."""
    return F.mse_loss(z1, z2)


def variance_loss(z: Tensor, eps: float = 1e-4) -> Tensor:
    """Hinge on the per-dimension std: mean(relu(1 − sqrt(Var(z_j) + ε))) (Eq. 1)."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def covariance_loss(z: Tensor) -> Tensor:
    """Sum of squared off-diagonal covariances divided by the dimension (Eq. 3–4)."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    return off_diagonal(cov).pow(2).sum() / d


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    *,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
) -> Tensor:
    """λ·s(Z, Z') + μ·[v(Z) + v(Z')]/2 + ν·[c(Z) + c(Z')] (Eq. 6; the authors' code halves
    the variance term). Callers pass the gathered global batch, as the authors'
    ``FullGatherLayer``."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"z1 and z2 must both be (N, P), found {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] < 2:
        raise ValueError(f"VICReg needs batch size > 1 but found {z1.shape[0]}")
    z1, z2 = z1.float(), z2.float()
    return (
        sim_coeff * invariance_loss(z1, z2)
        + std_coeff * (variance_loss(z1) + variance_loss(z2)) / 2.0
        + cov_coeff * (covariance_loss(z1) + covariance_loss(z2))
    )


class VICRegLoss(nn.Module):
    """VICReg loss over the batch gathered from all ranks.

    Attributes:
        sim_coeff / std_coeff / cov_coeff: λ, μ, ν (authors: 25, 25, 1).
        gather_distributed: compute the statistics over the global batch.
    """

    def __init__(
        self,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        *,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if self.gather_distributed:
            z1, z2 = gather_for_loss(z1), gather_for_loss(z2)
        return vicreg_loss(
            z1, z2, sim_coeff=self.sim_coeff, std_coeff=self.std_coeff, cov_coeff=self.cov_coeff
        )


class VICReg(SSLMethod):
    """Backbone → 3-layer expander (Linear–BN–ReLU ×2, Linear) → VICReg loss.

    Defaults: expander 2048–2048–2048 (the authors use 8192 on ImageNet).

    LDReg has no official loss for this method; the closest official method is SimCLR
    (no momentum encoder, one loss over the pair of views), so the term is its mean
    over the rows of both views with SimCLR's α.
    """

    name = "vicreg"

    def __init__(self, spec: PretrainSpec, backbone: nn.Module, feat_dim: int) -> None:
        super().__init__(spec, backbone, feat_dim)
        opts = spec.method_options
        self.projector = mlp(
            feat_dim,
            opts.proj_hidden_dim or self.heads.proj_hidden,
            opts.proj_dim or self.heads.proj_dim,
            num_layers=self.heads.proj_layers,
        )
        self.criterion = VICRegLoss()

    def forward(self, view1: Tensor, view2: Tensor) -> MethodOutput:
        check_views(view1, view2)
        b = view1.shape[0]
        features = self.backbone(torch.cat([view1, view2]))
        projections = self.projector(features)
        loss = self.criterion(projections[:b], projections[b:])
        return MethodOutput(loss=loss, features=features, projections=projections)
