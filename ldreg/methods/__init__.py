"""SSL methods, one per file; adding a method is one file plus one line in ``METHODS``.

Usage::

    from ldreg.methods import build_method
    method = build_method(spec, backbone, feat_dim)
    out = method(view1, view2)       # MethodOutput(loss, features, projections, ...)
"""

from __future__ import annotations

from torch import nn

from ldreg.errors import UserError
from ldreg.methods.barlow_twins import BarlowTwins
from ldreg.methods.base import MethodOutput, SSLMethod
from ldreg.methods.byol import BYOL
from ldreg.methods.mae import MAE
from ldreg.methods.moco_v3 import MoCoV3
from ldreg.methods.simclr import SimCLR
from ldreg.methods.vicreg import VICReg
from ldreg.spec import PretrainSpec

METHODS: dict[str, type[SSLMethod]] = {
    "simclr": SimCLR,
    "byol": BYOL,
    "moco_v3": MoCoV3,
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
    "mae": MAE,
}


def build_method(spec: PretrainSpec, backbone: nn.Module, feat_dim: int) -> SSLMethod:
    """The method ``spec.method`` around ``backbone`` (whose features are ``feat_dim`` wide)."""
    try:
        cls = METHODS[spec.method]
    except KeyError:
        raise UserError(
            f"unknown method '{spec.method}'; expected one of {', '.join(METHODS)}",
            code="invalid_spec",
        ) from None
    return cls(spec, backbone, feat_dim)


__all__ = ["METHODS", "MethodOutput", "SSLMethod", "build_method"]
