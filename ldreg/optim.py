"""Optimizers and learning-rate schedule for SSL pretraining.

Usage::

    lr = scaled_lr(spec.optimizer, global_batch=256)
    optimizer = build_optimizer(spec.optimizer, model.named_parameters(), lr=lr)
    for step in range(total):
        set_lr(optimizer, cosine_lr(step, total_steps=total, warmup_steps=w, base_lr=lr))
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from timm.optim import Lars
from torch import nn

from ldreg.spec import OptimizerSpec


def scaled_lr(opt: OptimizerSpec, *, global_batch: int) -> float:
    """Base lr scaled with the global batch: linear ``lr·B/256`` (Goyal et al. 2017, Sec. 2.1;
    SimCLR/BYOL) or square-root ``lr·sqrt(B/256)`` (SimCLR, Chen et al. 2020, App. B.1)."""
    if opt.lr_scaling == "linear":
        return opt.lr * global_batch / 256
    if opt.lr_scaling == "sqrt":
        return opt.lr * math.sqrt(global_batch / 256)
    return opt.lr


def excluded_from_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and normalisation parameters (all 1-D tensors): no weight decay and no LARS
    adaptation, as SimCLR, BYOL and Barlow Twins do (e.g. BYOL, Grill et al. 2020, App. J)."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float
) -> list[dict]:
    """Split trainable parameters into a decayed/adapted group and an excluded group."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if excluded_from_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": no_decay, "weight_decay": 0.0, "lars_adapt": False},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    opt: OptimizerSpec, named_params: Iterable[tuple[str, nn.Parameter]], *, lr: float
) -> torch.optim.Optimizer:
    """LARS (timm's, You et al. 2017, trust coefficient 0.001), SGD or AdamW.

    LARS adapts the decayed group even with zero weight decay (``always_adapt``); the
    excluded group gets neither decay nor adaptation, i.e. plain momentum SGD.
    """
    groups = param_groups(named_params, opt.weight_decay)
    if opt.name == "lars":
        for g in groups:
            g["always_adapt"] = g.pop("lars_adapt")
        return Lars(groups, lr=lr, momentum=opt.momentum, trust_coeff=0.001)
    for g in groups:
        g.pop("lars_adapt")
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opt.momentum)
    if opt.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(opt.momentum, 0.95))
    raise ValueError(f"unknown optimizer '{opt.name}'")


def cosine_lr(
    step: int, *, total_steps: int, warmup_steps: int, base_lr: float, final_lr: float = 0.0
) -> float:
    """Linear warm-up to ``base_lr`` then half-cosine decay to ``final_lr``
    (Loshchilov & Hutter 2017, SGDR, Eq. 5 without restarts; Goyal et al. 2017 warm-up).

    A pure function of the step, so a resumed run follows the same schedule."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
