"""Backbones: output shapes, ResNet stems and widths, the ViT's MAE masking."""

from __future__ import annotations

import pytest
import torch

from ldreg.backbones import (
    build_backbone,
    default_patch_size,
    patchify,
    random_masking,
    unpatchify,
)
from ldreg.errors import UserError

EXPECTED_DIM = {"resnet18": 512, "resnet50": 2048, "vit_tiny": 192, "vit_small": 384}


@pytest.mark.parametrize("name", sorted(EXPECTED_DIM))
@torch.no_grad()
def test_backbone_maps_images_to_its_feature_dim(name: str) -> None:
    torch.manual_seed(0)
    for image_size in (16, 32):
        model, dim = build_backbone(name, image_size=image_size)
        out = model.eval()(torch.randn(1, 3, image_size, image_size))
        assert dim == EXPECTED_DIM[name] == model.feature_dim
        assert out.shape == (1, dim)
        assert torch.isfinite(out).all()


@torch.no_grad()
def test_vit_base_has_768_dim_features_at_tiny_image_size() -> None:
    model, dim = build_backbone("vit_base", image_size=8, patch_size=4)
    assert (dim, model.embed_dim, model.num_patches) == (768, 768, 4)
    assert len(model.blocks) == 12
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 768)


def test_resnet_stem_is_small_for_small_images_and_standard_for_large() -> None:
    small, _ = build_backbone("resnet18", image_size=32, width=8)
    large, _ = build_backbone("resnet18", image_size=96, width=8)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, torch.nn.MaxPool2d)
    forced, _ = build_backbone("resnet18", image_size=32, width=8, small_stem=False)
    assert forced.conv1.kernel_size == (7, 7)


@pytest.mark.parametrize(("name", "width", "dim"), [("resnet18", 16, 128), ("resnet50", 8, 256)])
def test_resnet_width_scales_every_stage(name: str, width: int, dim: int) -> None:
    model, feature_dim = build_backbone(name, image_size=16, width=width)
    standard, _ = build_backbone(name, image_size=16)
    assert feature_dim == dim
    assert model.conv1.out_channels == width
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, dim)
    narrow = sum(p.numel() for p in model.parameters())
    assert narrow < sum(p.numel() for p in standard.parameters()) / 10


def test_backbones_start_from_random_weights_not_a_fixed_checkpoint() -> None:
    torch.manual_seed(0)
    a, _ = build_backbone("resnet18", image_size=16, width=8)
    torch.manual_seed(1)
    b, _ = build_backbone("resnet18", image_size=16, width=8)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)


def test_default_patch_size_follows_image_size() -> None:
    assert [default_patch_size(s) for s in (16, 32, 64, 96, 224)] == [4, 4, 8, 16, 16]
    model, _ = build_backbone("vit_tiny", image_size=64)
    assert (model.patch_size, model.num_patches) == (8, 64)


def test_forward_masked_removes_the_requested_fraction_of_patches() -> None:
    torch.manual_seed(0)
    model, dim = build_backbone("vit_tiny", image_size=32)
    cls, tokens, mask, ids_restore = model.forward_masked(torch.randn(3, 3, 32, 32), 0.75)
    assert model.num_patches == 64
    assert cls.shape == (3, dim)
    assert tokens.shape == (3, 1 + 16, dim)
    assert mask.shape == ids_restore.shape == (3, 64)
    assert mask.sum(dim=1).tolist() == [48.0, 48.0, 48.0]
    assert torch.equal(cls, tokens[:, 0])
    assert torch.equal(ids_restore.sort(dim=1).values, torch.arange(64).expand(3, 64))
    assert not torch.equal(mask[0], mask[1])  # masks are drawn per sample


def test_forward_masked_without_masking_equals_the_plain_forward() -> None:
    # Attention is permutation-equivariant once positions are embedded, so encoding the
    # shuffled full sequence must give the plain forward's CLS token.
    torch.manual_seed(0)
    model, _ = build_backbone("vit_tiny", image_size=16)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    cls, *_ = model.forward_masked(x, 0.0)
    torch.testing.assert_close(cls, model(x), atol=1e-4, rtol=1e-4)


def test_random_masking_keeps_exactly_the_unmasked_patches() -> None:
    tokens = torch.arange(10, dtype=torch.float32).view(1, 10, 1).repeat(4, 1, 3)
    kept, mask, ids_restore = random_masking(
        tokens, 0.6, generator=torch.Generator().manual_seed(0)
    )
    assert kept.shape == (4, 4, 3)
    for row in range(4):
        visible = torch.nonzero(mask[row] == 0).squeeze(1).float()
        assert torch.equal(kept[row, :, 0].sort().values, visible)
    # Unshuffling [kept, masked placeholders] with ids_restore puts every kept token back.
    placeholders = torch.full((4, 6, 3), -1.0)
    restored = torch.gather(
        torch.cat([kept, placeholders], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, 3)
    )
    assert torch.equal(restored[..., 0] >= 0, mask == 0)
    assert torch.equal(restored[..., 0][mask == 0], tokens[..., 0][mask == 0])


def test_patchify_order_matches_the_patch_embedding() -> None:
    # MAE's reconstruction target must line up with the encoder's patch tokens.
    torch.manual_seed(0)
    model, _ = build_backbone("vit_tiny", image_size=16)
    x = torch.randn(2, 3, 16, 16)
    proj = model.patch_embed.proj
    weight = proj.weight.permute(0, 2, 3, 1).reshape(proj.out_channels, -1)
    expected = patchify(x, 4) @ weight.T + proj.bias
    torch.testing.assert_close(model.patch_embed(x), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(unpatchify(patchify(x, 4), 4), x)


def test_unknown_backbone_and_indivisible_patch_size_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown backbone 'resnet7'"):
        build_backbone("resnet7", image_size=32)
    with pytest.raises(UserError, match="not divisible by the ViT patch size 5"):
        build_backbone("vit_tiny", image_size=32, patch_size=5)
