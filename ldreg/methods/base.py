"""What every SSL method shares: its output, the MLP heads, and the EMA target update.

A method is an ``nn.Module`` built from ``(spec, backbone, feat_dim)``. Its ``forward``
takes two augmented views and returns a :class:`MethodOutput`; the training loop adds
the LDReg term to ``output.loss`` in the same way for every method, reading the
regularized tensor from ``output.features`` (or ``output.projections``) and the
reference set from those rows plus ``output.extra_reference``.

Usage::

    method = build_method(spec, backbone, feat_dim)
    out = method(view1, view2)          # out.loss, out.features (2B, D), ...
    out.loss.backward(); optimizer.step()
    method.update_target(step=s, total_steps=S)   # EMA methods only
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ldreg import registry
from ldreg.registry import AugmentationRecipe, Heads, LDRegReduction
from ldreg.spec import PretrainSpec


@dataclass
class MethodOutput:
    """One training step of a method.

    Attributes:
        loss: the method's own SSL loss (a scalar to back-propagate).
        features: backbone features of both views, ``(2B, D)``, view 1's rows first —
            what LDReg regularizes by default and what the online probe reads (detached).
        projections: the projector's outputs for both views, ``(2B, P)``, or ``None``
            when the method has no projector (MAE).
        extra_reference: detached tensors that join the LDReg reference set, keyed by
            target (``"features"`` / ``"projections"``); BYOL puts its target
            encoder's outputs here as the authors' code does.
    """

    loss: Tensor
    features: Tensor
    projections: Tensor | None
    extra_reference: dict[str, Tensor] = field(default_factory=dict)


class SSLMethod(nn.Module):
    """Base class of the SSL methods.

    Attributes:
        name: registry name (``simclr``, ``byol``, ...).
        backbone: the online encoder; the one evaluated and saved.
        feat_dim: width of ``backbone``'s features.
    """

    name: ClassVar[str]

    @property
    def augmentation(self) -> AugmentationRecipe:
        """The two-view recipe it trains on (its registry entry)."""
        return registry.METHODS[self.name].augmentation

    @property
    def heads(self) -> Heads:
        """Its default heads (its registry entry); ``method_options`` override them."""
        return registry.METHODS[self.name].heads

    @property
    def ldreg_reduction(self) -> LDRegReduction:
        """How the LDReg term combines the rows of the two views (its registry entry;
        docs/science.md, "LDReg's strength per method")."""
        return registry.METHODS[self.name].ldreg_reduction

    def __init__(self, spec: PretrainSpec, backbone: nn.Module, feat_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim

    def forward(self, view1: Tensor, view2: Tensor) -> MethodOutput:
        raise NotImplementedError

    @torch.no_grad()
    def update_target(self, *, step: int, total_steps: int) -> None:
        """Called after every optimizer step; EMA methods move their target here."""


class MomentumMethod(SSLMethod):
    """An SSL method with an EMA target of its backbone and projector (BYOL, MoCo v3):
    the target's plumbing written once, as solo-learn's ``BaseMomentumMethod``.

    A subclass builds ``self.projector``, ``self.predictor`` and ``self.criterion``,
    then calls :meth:`make_target`; the forward pass is shared.
    """

    projector: nn.Module
    predictor: nn.Module
    criterion: nn.Module  # (online predictions of view 1, 2, target outputs of 1, 2) → loss
    target_backbone: nn.Module
    target_projector: nn.Module
    momentum_base: float

    def make_target(self, spec: PretrainSpec) -> None:
        """Frozen copies of backbone and projector; the EMA momentum starts at
        ``method_options.momentum_base`` (0.99, solo-learn's CIFAR value; 0.996 on
        ImageNet) and rises to 1 on a cosine."""
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        base = spec.method_options.momentum_base
        self.momentum_base = 0.99 if base is None else base

    def forward(self, view1: Tensor, view2: Tensor) -> MethodOutput:
        """Each view's prediction against the other view's target output; the target's
        outputs join the LDReg reference set, as in the LDReg authors' BYOL loss."""
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


def check_views(view1: Tensor, view2: Tensor) -> None:
    if view1.shape != view2.shape:
        raise ValueError(
            f"the two views must have the same shape, found {tuple(view1.shape)}"
            f" and {tuple(view2.shape)}"
        )
    if view1.shape[0] < 2:
        raise ValueError(f"views must have batch size > 1 but found {view1.shape[0]}")


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    *,
    num_layers: int = 2,
    bias: bool = True,
    last_bn: bool = False,
    last_bn_affine: bool = True,
) -> nn.Sequential:
    """``num_layers`` Linear layers with BatchNorm + ReLU between them.

    The projector / predictor shape shared by SimCLR (Chen et al. 2020, Sec. 2.1), BYOL
    (Grill et al. 2020, Sec. 3.3), MoCo v3 (Chen et al. 2021, ``_build_mlp`` in
    facebookresearch/moco-v3), Barlow Twins and VICReg; ``last_bn`` adds MoCo v3's final
    BatchNorm.
    """
    if num_layers < 1:
        raise ValueError(f"an MLP needs at least 1 layer, found {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for i in range(num_layers):
        last = i == num_layers - 1
        out = out_dim if last else hidden_dim
        layers.append(nn.Linear(dim, out, bias=bias))
        if not last:
            layers += [nn.BatchNorm1d(out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(out, affine=last_bn_affine))
        dim = out
    return nn.Sequential(*layers)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off: the EMA target of BYOL and MoCo v3."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """EMA momentum rising from ``base`` to 1 on a half cosine.

    τ_k = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2 (Grill et al. 2020, BYOL, Sec. 3.2; MoCo v3
    uses the same schedule, Chen et al. 2021, Sec. 4).
    """
    if total_steps <= 0:
        return base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """ξ ← τ·ξ + (1 − τ)·θ over parameters only, as the authors' BYOL and MoCo v3 code.

    The target runs its BatchNorms in train mode (batch statistics), so its running
    statistics are never read during training and are left to evolve on their own.
    """
    torch._foreach_lerp_(
        list(target.parameters()), [p.detach() for p in online.parameters()], 1.0 - momentum
    )
