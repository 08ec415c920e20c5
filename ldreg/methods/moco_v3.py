"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers", ICCV; authors' code: facebookresearch/moco-v3, ``moco/builder.py``).

Usage::

    loss = moco_v3_loss(q1, k2, temperature=0.2) + moco_v3_loss(q2, k1, temperature=0.2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldreg import distributed
from ldreg.methods.base import (
    MomentumMethod,
    mlp,
)
from ldreg.spec import PretrainSpec


def moco_v3_loss(
    queries: Tensor, keys: Tensor, *, temperature: float, gather: bool = True
) -> Tensor:
    """InfoNCE of each query against all keys of the (gathered) batch, scaled by 2τ.

    The positive of local query i is key ``rank·B + i``; keys come from the momentum
    encoder without gradient (Chen et al. 2021, Algorithm 1; the 2τ factor is the
    authors' ``contrastive_loss``).
    """
    if queries.shape != keys.shape or queries.ndim != 2:
        raise ValueError(
            f"queries and keys must both be (B, P), found {tuple(queries.shape)}"
            f" and {tuple(keys.shape)}"
        )
    q = F.normalize(queries, dim=1)
    k = F.normalize(keys.detach(), dim=1)
    all_keys = distributed.gather_no_grad(k) if gather else k
    offset = (distributed.rank() if gather else 0) * q.shape[0]
    logits = q @ all_keys.T / temperature
    labels = offset + torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * (2.0 * temperature)


class MoCoV3Loss(nn.Module):
    """Symmetrised MoCo v3 contrastive loss with keys gathered across ranks."""

    def __init__(self, temperature: float, *, gather_distributed: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor) -> Tensor:
        t, gather = self.temperature, self.gather_distributed
        return moco_v3_loss(q1, k2, temperature=t, gather=gather) + moco_v3_loss(
            q2, k1, temperature=t, gather=gather
        )


class MoCoV3(MomentumMethod):
    """Backbone → projector → predictor against a momentum backbone → projector.

    Heads as the authors' builder: projector 3 layers for ViT, 2 for ResNet, hidden
    4096, output 256, ending in an affine-free BatchNorm; predictor 2 layers without it.
    The temperature defaults to the authors' 0.2 for ViT and 1.0 for ResNet; momentum
    rises from 0.99 to 1 on a cosine.

    LDReg has no official MoCo v3 loss; the closest official method is BYOL (a momentum
    encoder, a loss summed over the two views), so MoCo v3 takes its form: the momentum
    encoder's features join the reference set and the term is summed over the views.
    """

    name = "moco_v3"

    def __init__(self, spec: PretrainSpec, backbone: nn.Module, feat_dim: int) -> None:
        super().__init__(spec, backbone, feat_dim)
        opts = spec.method_options
        vit = spec.backbone.startswith("vit")
        hidden = opts.proj_hidden_dim or self.heads.proj_hidden
        proj_dim = opts.proj_dim or self.heads.proj_dim
        self.projector = mlp(
            feat_dim,
            hidden,
            proj_dim,
            num_layers=self.heads.proj_layers + 1 if vit else self.heads.proj_layers,
            bias=False,
            last_bn=True,
            last_bn_affine=False,
        )
        self.predictor = mlp(proj_dim, opts.pred_hidden_dim or hidden, proj_dim, bias=False)
        self.make_target(spec)
        temperature = opts.temperature or (0.2 if vit else 1.0)
        self.criterion = MoCoV3Loss(temperature)
