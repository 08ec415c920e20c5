"""SSL methods: each loss against a value worked out by hand, each method end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldreg.backbones import build_backbone, patchify
from ldreg.errors import UserError
from ldreg.methods import METHODS, build_method
from ldreg.methods.barlow_twins import barlow_twins_loss, off_diagonal
from ldreg.methods.base import cosine_momentum, ema_update, frozen_copy, mlp
from ldreg.methods.byol import byol_loss
from ldreg.methods.mae import mae_loss
from ldreg.methods.moco_v3 import moco_v3_loss
from ldreg.methods.simclr import nt_xent_loss
from ldreg.methods.vicreg import covariance_loss, invariance_loss, variance_loss
from ldreg.regularizer import LDReg
from ldreg.spec import METHODS as SPEC_METHODS
from ldreg.spec import PretrainSpec
from ldreg.train import TrainModule, build_train_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spec_for(method: str, **overrides) -> PretrainSpec:
    spec = {
        "method": method,
        "backbone": "vit_tiny" if method == "mae" else "resnet18",
        "width": 4,
        "batch_size": 8,
        "dataset": {"name": "synthetic", "image_size": 8},
        "ldreg": {"k": 4, "warmup_epochs": 0, "alpha": 0.1},
        "method_options": {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16},
    }
    spec.update(overrides)
    return PretrainSpec.model_validate(spec)


def test_every_spec_method_is_registered():
    assert set(METHODS) == set(SPEC_METHODS)


def test_nt_xent_matches_the_hand_computed_value():
    # Two orthonormal pairs: row 0's positive has similarity 1, its 2 negatives 0.
    z = torch.eye(2)
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert nt_xent_loss(z, z.clone(), temperature=t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_equals_the_explicit_per_anchor_sum():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    t, n = 0.2, 10
    total = 0.0
    for i in range(n):
        pos = (i + 5) % n
        others = [j for j in range(n) if j != i]
        denom = sum(math.exp(float(z[i] @ z[j]) / t) for j in others)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / denom)
    assert nt_xent_loss(z1, z2, temperature=t).item() == pytest.approx(total / n, rel=1e-5)


def test_byol_loss_is_zero_when_aligned_and_four_when_opposite():
    p = torch.randn(4, 6)
    assert byol_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, rel=1e-6)


def test_moco_v3_loss_matches_the_hand_computed_value():
    q = torch.eye(3)
    t = 0.2
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2)) * 2 * t
    assert moco_v3_loss(q, q.clone(), temperature=t).item() == pytest.approx(expected, rel=1e-6)


def test_barlow_twins_loss_is_zero_for_identical_decorrelated_embeddings():
    # ±1 columns of a Hadamard matrix: zero mean, unit variance, uncorrelated.
    h = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]).float()
    z = h[:, 1:]
    assert barlow_twins_loss(z, z.clone(), lambda_offdiag=0.005).item() == pytest.approx(
        0.0, abs=1e-4
    )
    # Perfectly correlated dimensions: every off-diagonal C_ij = 1 (6 of them).
    same = torch.cat([z[:, :1]] * 3, dim=1)
    assert barlow_twins_loss(same, same, lambda_offdiag=0.5).item() == pytest.approx(3.0, rel=1e-3)
    assert off_diagonal(torch.arange(9.0).view(3, 3)).tolist() == [1, 2, 3, 5, 6, 7]


def test_vicreg_terms_match_their_definitions():
    z = torch.randn(32, 4)
    assert invariance_loss(z, z).item() == 0.0
    assert variance_loss(torch.ones(8, 3)).item() == pytest.approx(1 - math.sqrt(1e-4))
    h = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]).float()
    assert covariance_loss(h[:, 1:]).item() == pytest.approx(0.0, abs=1e-7)
    # Two identical columns of variance v: the two off-diagonal covariances are v.
    col = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    v = 4 / 3
    assert covariance_loss(torch.cat([col, col], 1)).item() == pytest.approx(2 * v**2 / 2)


def test_mae_loss_counts_only_masked_patches_against_normalised_pixels():
    images = torch.randn(2, 3, 8, 8)
    target = patchify(images, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    pred = target.clone()
    pred[mask == 0] += 5.0  # errors on visible patches do not count
    assert mae_loss(images, pred, mask, patch_size=4).item() == pytest.approx(0.0, abs=1e-6)
    pred = target.clone()
    pred[mask == 1] += 1.0
    assert mae_loss(images, pred, mask, patch_size=4).item() == pytest.approx(1.0, rel=1e-5)


def test_target_momentum_follows_the_cosine_from_base_to_one():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    online = mlp(3, 4, 2)
    target = frozen_copy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
        assert not t.requires_grad


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_its_backbone_and_exposes_both_views(method):
    spec = spec_for(method)
    model = build_train_module(spec, image_size=8, num_classes=3)
    view1, view2 = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    out = model.method(view1, view2)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.features.shape == (16, model.method.feat_dim)
    if method == "mae":
        assert out.projections is None
    else:
        assert out.projections.shape[0] == 16
    step = model(view1, view2, torch.randint(0, 3, (8,)), True)
    (step.ssl_loss + step.ldreg_loss + step.probe_loss).backward()
    assert step.ldreg_loss.item() < 0
    grads = [p.grad for p in model.method.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    frozen = [p for n, p in model.named_parameters() if "target" in n or "momentum_" in n]
    assert all(p.grad is None for p in frozen), "EMA targets get no gradient"


def test_moco_v3_works_on_a_vit_backbone():
    model = build_train_module(
        spec_for("moco_v3", backbone="vit_tiny"), image_size=8, num_classes=3
    )
    out = model.method(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8))
    assert out.features.shape == (8, 192)
    assert len([m for m in model.method.projector if isinstance(m, torch.nn.Linear)]) == 3


def test_ldreg_on_projections_regularizes_the_projector_output():
    spec = spec_for("simclr", ldreg={"k": 4, "warmup_epochs": 0, "target": "projections"})
    model = build_train_module(spec, image_size=8, num_classes=3)
    torch.manual_seed(0)
    v1, v2, y = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    step = model(v1, v2, y, True)
    torch.manual_seed(0)
    out = model.method(v1, v2)
    expected = LDReg(alpha=0.01, k=4)(out.projections.float())
    assert step.ldreg_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mae_refuses_regularizing_projections_it_does_not_have():
    spec = spec_for("mae", ldreg={"k": 4, "target": "projections"})
    backbone, dim = build_backbone("vit_tiny", image_size=8)
    with pytest.raises(UserError, match="no projector"):
        build_method(spec, backbone, dim)


def test_mae_pretrains_end_to_end_on_the_cls_token(tmp_path):
    from ldreg.train import pretrain

    spec = spec_for(
        "mae",
        epochs=1,
        batch_size=16,
        dataset={"name": "synthetic", "image_size": 8, "num_samples": 48},
        optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        eval={"lid_k": [4], "knn_k": [3], "max_samples": 64},
        method_options={"decoder_dim": 32, "decoder_depth": 1},
    )
    summary = pretrain(spec, run_dir=tmp_path, data_root=tmp_path)
    assert summary["ldreg_loss"] < 0
    assert math.isfinite(summary["loss"]) and summary["effective_rank"] > 1.0


def test_train_module_is_built_identically_from_the_seed():
    a = build_train_module(spec_for("simclr"), image_size=8, num_classes=3)
    b = build_train_module(spec_for("simclr"), image_size=8, num_classes=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert isinstance(a, TrainModule)
