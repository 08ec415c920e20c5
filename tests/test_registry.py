"""The registry (ldreg/registry.py) drives every list of names: nothing else keeps one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ldreg import registry
from ldreg.backbones import build_backbone
from ldreg.methods import METHODS as METHOD_CLASSES
from ldreg.spec import DEFAULT_ALPHA, DatasetSpec, PretrainSpec
from service.admission import estimate_pretrain

ROOT = Path(__file__).resolve().parents[1]


def _schema_enum(model: type, field: str) -> list[str]:
    return model.model_json_schema()["properties"][field]["enum"]


def test_the_spec_and_its_json_schema_accept_exactly_the_registered_names() -> None:
    assert _schema_enum(PretrainSpec, "method") == list(registry.METHODS)
    assert _schema_enum(PretrainSpec, "backbone") == list(registry.BACKBONES)
    assert _schema_enum(DatasetSpec, "name") == list(registry.DATASETS)
    assert {n: m.default_alpha for n, m in registry.METHODS.items()} == DEFAULT_ALPHA
    with pytest.raises(ValueError, match="unknown method 'nope'; expected one of simclr"):
        PretrainSpec.model_validate({"method": "nope"})


def test_every_registered_method_has_its_class_and_the_class_its_entry() -> None:
    assert list(METHOD_CLASSES) == list(registry.METHODS)
    for name, cls in METHOD_CLASSES.items():
        assert cls.name == name
        entry = registry.METHODS[name]
        assert entry.augmentation in ("simclr", "byol", "mae")
        assert entry.ldreg_reduction in ("mean", "sum_views")


@pytest.mark.parametrize("name", list(registry.BACKBONES))
def test_every_registered_backbone_builds_with_its_registered_shape(name: str) -> None:
    entry = registry.BACKBONES[name]
    _backbone, feat_dim = build_backbone(name, image_size=16, width=8)
    if entry.family == "vit":
        assert feat_dim == entry.dim
    else:
        assert feat_dim == 8 * (32 if entry.bottleneck else 8)


VALID_PAIRS = [
    (method, backbone)
    for method, entry in registry.METHODS.items()
    for backbone, b in registry.BACKBONES.items()
    if not entry.needs_vit or b.family == "vit"  # MAE on a ResNet is refused by the spec
]


@pytest.mark.parametrize(("method", "backbone"), VALID_PAIRS)
def test_the_api_can_size_every_method_on_every_backbone(method: str, backbone: str) -> None:
    estimate = estimate_pretrain(
        PretrainSpec.model_validate({"method": method, "backbone": backbone})
    )
    assert estimate.host_bytes > 0 and estimate.device_bytes > 0


def test_no_other_file_keeps_its_own_list_of_names() -> None:
    """A list of three or more method (or backbone) names anywhere in the code, the
    dashboard included, is a copy that would drift; the registry is the only one."""
    sources = [
        *ROOT.glob("ldreg/**/*.py"),
        *ROOT.glob("api/**/*.py"),
        *ROOT.glob("service/**/*.py"),
        *ROOT.glob("worker/**/*.py"),
        *ROOT.glob("cli/**/*.py"),
        *ROOT.glob("client/**/*.py"),
        *ROOT.glob("api/dashboard/js/*.js"),
    ]
    for names in (registry.METHODS, registry.BACKBONES):
        alternatives = "|".join(names)
        quoted = r"""["'](""" + alternatives + r""")["']"""
        listed = re.compile(r"(" + quoted + r"""[\s,\]\)\}:]+.{0,80}?){3,}""", re.DOTALL)
        for path in sources:
            if path.name == "registry.py":
                continue
            text = path.read_text()
            match = listed.search(text)
            assert match is None, f"{path.relative_to(ROOT)} lists names: {match.group(0)[:120]!r}"


def test_the_docs_name_every_registered_method_backbone_and_dataset() -> None:
    api_doc = (ROOT / "docs" / "api.md").read_text()
    for name in (*registry.METHODS, *registry.BACKBONES, *registry.DATASETS):
        assert f"`{name}`" in api_doc, name
