"""Editing a job spec by dotted field paths: clone a job with a few changes.

    from client import LDRegClient, apply_overrides

    with LDRegClient() as api:
        base = api.job("3f2a9c")                       # a job id, or a unique prefix
        spec = apply_overrides(base.spec, {"ldreg.alpha": 0.05, "epochs": 3})
        api.submit(base.kind, spec)

The service validates the result: an unknown field or a bad value is its 422 naming
the field (``ApiError.field``, e.g. ``spec.ldreg.alpha``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any


def apply_overrides(
    spec: Mapping[str, Any], overrides: Mapping[str, Any] | Iterable[tuple[str, Any]]
) -> dict[str, Any]:
    """A copy of ``spec`` with each dotted field set to its value, in order.

    ``{"ldreg.alpha": 0.05}`` sets one field of a section; a section that is missing or
    null on the way becomes a mapping holding just that field (the service fills in
    the rest with defaults); ``{"ldreg": None}`` sets a whole section to null (for
    ``ldreg``: the plain baseline). ``ValueError`` for a path with an empty part.
    """
    out: dict[str, Any] = copy.deepcopy(dict(spec))
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for path, value in items:
        keys = str(path).split(".")
        if not all(keys):
            raise ValueError(f"field path {path!r} has an empty part; use e.g. 'ldreg.alpha'")
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[keys[-1]] = copy.deepcopy(value)
    return out
