"""Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny 2021, "Barlow Twins: Self-Supervised
Learning via Redundancy Reduction", ICML; authors' code: facebookresearch/barlowtwins).

Usage::

    loss = barlow_twins_loss(z1, z2, lambda_offdiag=5e-3)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldreg.distributed import gather_for_loss
from ldreg.methods.base import MethodOutput, SSLMethod, check_views, mlp
from ldreg.spec import PretrainSpec


def standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Zero mean, unit (biased) variance per dimension over the batch: the authors'
    affine-free ``BatchNorm1d`` in training mode."""
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def off_diagonal(m: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = m.shape[0]
    if m.shape != (n, n):
        raise ValueError(f"expected a square matrix, found {tuple(m.shape)}")
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins_loss(z1: Tensor, z2: Tensor, *, lambda_offdiag: float) -> Tensor:
    """Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij² with C the cross-correlation of the standardised
    embeddings over the batch (Zbontar et al. 2021, Eq. 1–2). Callers pass the gathered
    global batch so C is the same on every rank, as the authors' ``all_reduce(c)``."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"z1 and z2 must both be (N, P), found {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"Barlow Twins needs batch size > 1 but found {n}")
    c = standardize(z1.float()).T @ standardize(z2.float()) / n
    on_diag = (torch.diagonal(c) - 1.0).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambda_offdiag * off_diag


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss over the batch gathered from all ranks.

    Attributes:
        lambda_offdiag: λ, the redundancy-reduction weight (authors: 0.0051).
        gather_distributed: compute C over the global batch.
    """

    def __init__(self, lambda_offdiag: float = 0.0051, *, gather_distributed: bool = True):
        super().__init__()
        self.lambda_offdiag = lambda_offdiag
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if self.gather_distributed:
            z1, z2 = gather_for_loss(z1), gather_for_loss(z2)
        return barlow_twins_loss(z1, z2, lambda_offdiag=self.lambda_offdiag)


class BarlowTwins(SSLMethod):
    """Backbone → 3-layer projector (bias-free Linears, BN, ReLU) → Barlow Twins loss.

    Defaults: projector 2048–2048–2048 (the authors use 8192 on ImageNet), λ = 0.0051.

    LDReg has no official loss for this method; the closest official method is SimCLR
    (no momentum encoder, one loss over the pair of views), so the term is its mean
    over the rows of both views with SimCLR's α.
    """

    name = "barlow_twins"

    def __init__(self, spec: PretrainSpec, backbone: nn.Module, feat_dim: int) -> None:
        super().__init__(spec, backbone, feat_dim)
        opts = spec.method_options
        self.projector = mlp(
            feat_dim,
            opts.proj_hidden_dim or self.heads.proj_hidden,
            opts.proj_dim or self.heads.proj_dim,
            num_layers=self.heads.proj_layers,
            bias=False,
        )
        lam = 0.0051 if opts.lambda_offdiag is None else opts.lambda_offdiag
        self.criterion = BarlowTwinsLoss(lam)

    def forward(self, view1: Tensor, view2: Tensor) -> MethodOutput:
        check_views(view1, view2)
        b = view1.shape[0]
        features = self.backbone(torch.cat([view1, view2]))
        projections = self.projector(features)
        loss = self.criterion(projections[:b], projections[b:])
        return MethodOutput(loss=loss, features=features, projections=projections)
