"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive
Learning of Visual Representations", ICML; authors' code: google-research/simclr).

Usage::

    loss_fn = NTXentLoss(temperature=0.2)
    loss = loss_fn(z1, z2)                  # (B, P) projections of the two views
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldreg import distributed
from ldreg.distributed import gather_for_loss
from ldreg.methods.base import MethodOutput, SSLMethod, check_views, mlp
from ldreg.spec import PretrainSpec


def nt_xent_loss(z1: Tensor, z2: Tensor, *, temperature: float, gather: bool = True) -> Tensor:
    """Normalized-temperature cross-entropy over the (gathered) batch.

    For the 2N projections of the global batch, row i's positive is its other view and
    its 2N − 2 negatives are every other row (Chen et al. 2020, Eq. 1). With
    ``gather=True`` the candidates come from all ranks (:func:`gather_for_loss`), so each
    rank's loss is the mean over its own 2B rows and the ranks' mean is the global loss.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"z1 and z2 must both be (B, P), found {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    b = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]), dim=1)
    candidates = gather_for_loss(local) if gather else local
    offset = (distributed.rank() if gather else 0) * 2 * b
    logits = local @ candidates.T / temperature
    rows = torch.arange(2 * b, device=local.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, offset + rows] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = offset + (rows + b) % (2 * b)
    return F.cross_entropy(logits, positives)


class NTXentLoss(nn.Module):
    """NT-Xent loss with negatives gathered across ranks (``gather_distributed``).

    Attributes:
        temperature: τ in Eq. 1; 0.2 follows the CIFAR settings of solo-learn.
        gather_distributed: take negatives from every rank's batch.
    """

    def __init__(self, temperature: float = 0.2, *, gather_distributed: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, found {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent_loss(z1, z2, temperature=self.temperature, gather=self.gather_distributed)


class SimCLR(SSLMethod):
    """Backbone → 2-layer MLP projector (Linear–BN–ReLU–Linear) → NT-Xent.

    Defaults: projector 2048 → 128 (Chen et al. 2020, Sec. 2.1 / B.9), temperature 0.2.
    """

    name = "simclr"

    def __init__(self, spec: PretrainSpec, backbone: nn.Module, feat_dim: int) -> None:
        super().__init__(spec, backbone, feat_dim)
        opts = spec.method_options
        self.projector = mlp(
            feat_dim,
            opts.proj_hidden_dim or self.heads.proj_hidden,
            opts.proj_dim or self.heads.proj_dim,
        )
        self.criterion = NTXentLoss(opts.temperature or 0.2)

    def forward(self, view1: Tensor, view2: Tensor) -> MethodOutput:
        check_views(view1, view2)
        b = view1.shape[0]
        # One pass over both views: BatchNorm statistics cover the whole local batch.
        features = self.backbone(torch.cat([view1, view2]))
        projections = self.projector(features)
        loss = self.criterion(projections[:b], projections[b:])
        return MethodOutput(loss=loss, features=features, projections=projections)
