"""SSL methods, one per file, each listed once in ``ldreg.registry.METHODS``.

Usage::

    from ldreg.methods import build_method
    method = build_method(spec, backbone, feat_dim)
    out = method(view1, view2)       # MethodOutput(loss, features, projections, ...)
"""

from __future__ import annotations

from importlib import import_module

from torch import nn

from ldreg import registry
from ldreg.errors import UserError
from ldreg.methods.base import MethodOutput, SSLMethod
from ldreg.spec import PretrainSpec


def _load(implementation: str) -> type[SSLMethod]:
    module, _, name = implementation.partition(":")
    cls = getattr(import_module(module), name)
    if not issubclass(cls, SSLMethod):
        raise TypeError(f"{implementation} is not an SSLMethod")
    return cls


# name → class, in the registry's order.
METHODS: dict[str, type[SSLMethod]] = {
    name: _load(entry.implementation) for name, entry in registry.METHODS.items()
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
