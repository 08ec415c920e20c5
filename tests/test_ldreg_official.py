"""LDReg's term per method against transcriptions of the authors' losses.

The authors' code is github.com/HanxunH/LDReg (commit 48956d2). Each ``official_*``
function below transcribes the lines that build the LDReg term of one loss, keeping
the authors' names; the SSL part of their loss is left out, since the term is added
to it. Value and gradient must agree to 1e-5 (relative), in float64 so that the
comparison measures the formula, not rounding.

MoCo v3, Barlow Twins and VICReg have no official LDReg loss; their forms are chosen
in docs/science.md ("LDReg's strength per method") and checked here to follow the
closest official method (BYOL for MoCo v3, SimCLR for the other two).
"""

from __future__ import annotations

import pytest
import torch

from ldreg.registry import METHODS
from ldreg.spec import DEFAULT_ALPHA, PretrainSpec
from ldreg.train import build_train_module, ldreg_term

K = 16
B = 40  # rows per view; the authors' lid_mom_est clips k to B - 2


def official_lid_mom_est(data, reference, k):
    """``lid.py`` lines 29-37 (``lid_mom_est``), with the exact-distance ``compute_mode``
    that the function takes as a parameter."""
    b = data.shape[0]
    k = min(k, b - 2)
    data = torch.flatten(data, start_dim=1)
    reference = torch.flatten(reference, start_dim=1)
    r = torch.cdist(data, reference, p=2, compute_mode="donot_use_mm_for_euclid_dist")
    a, _idx = torch.sort(r, dim=1)
    m = torch.mean(a[:, 1:k], dim=1)
    lids = m / (a[:, k] - m)
    return lids


def official_simclr_term(f_i, f_j, alpha, k):
    """``losses/ntxent_lid_reg.py`` lines 157-183 (``NTXentLIDReg.forward``, lid_type 'f',
    reg_type 'l1', one process, after warm-up): ``(loss + alpha * lid_reg).mean(dim=0)``,
    of which the LDReg part is ``(alpha * lid_reg).mean(dim=0)``."""
    lid_f_i, lid_f_j = f_i, f_j
    lid_f = torch.cat([lid_f_i, lid_f_j], dim=0)
    full_rank_lid_f = lid_f
    lids = official_lid_mom_est(data=lid_f, reference=full_rank_lid_f.detach(), k=k)
    lid_reg = -torch.abs(torch.log(lids))
    return (alpha * lid_reg).mean(dim=0)


def official_byol_term(f_0, f_1, f_0_m, f_1_m, alpha, k):
    """``losses/byol_loss.py`` lines 141-175 (``BYOLLIDReg.forward``, one process, after
    warm-up): ``(main_loss + alpha * (lid_reg_f_0 + lid_reg_f_1)).mean(dim=0)``, of which
    the LDReg part is ``(alpha * lid_reg).mean(dim=0)``."""
    lid_f_0, lid_f_1 = f_0, f_1
    lid_f = torch.cat([lid_f_0, lid_f_1], dim=0)
    full_rank_lid_f = lid_f
    extend_f = torch.cat([f_0_m, f_1_m], dim=0)
    full_rank_lid_f = torch.cat([full_rank_lid_f, extend_f], dim=0)
    lids_f_0 = official_lid_mom_est(data=lid_f_0, reference=full_rank_lid_f.detach(), k=k)
    lids_f_1 = official_lid_mom_est(data=lid_f_1, reference=full_rank_lid_f.detach(), k=k)
    lid_reg_f_0 = -torch.abs(torch.log(lids_f_0))
    lid_reg_f_1 = -torch.abs(torch.log(lids_f_1))
    lid_reg = lid_reg_f_0 + lid_reg_f_1
    return (alpha * lid_reg).mean(dim=0)


def official_mae_term(cls_token, alpha, k):
    """``losses/mae_loss.py`` lines 78-98 (``MAELDRegLoss.forward``, one process, after
    warm-up): ``loss + self.alpha * lid_reg.mean()``."""
    lid_f = cls_token
    full_rank_lid_f = lid_f
    lids = official_lid_mom_est(data=lid_f, reference=full_rank_lid_f.detach(), k=k)
    lid_reg = -torch.abs(torch.log(lids))
    return alpha * lid_reg.mean()


def spec_for(method: str) -> PretrainSpec:
    return PretrainSpec.model_validate(
        {
            "method": method,
            "backbone": "vit_tiny" if method == "mae" else "resnet18",
            "width": 4,
            "batch_size": 2 * B,
            "ldreg": {"k": K, "warmup_epochs": 0},
            "method_options": {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16},
        }
    )


def _features(rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, 6, generator=generator, dtype=torch.float64)
    mixing = torch.randn(6, 32, generator=generator, dtype=torch.float64)
    noise = 0.05 * torch.randn(rows, 32, generator=generator, dtype=torch.float64)
    return latent @ mixing + noise


def _ours(method: str, features: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    model = build_train_module(spec_for(method), image_size=8, num_classes=3)
    term, _ = ldreg_term(model.ldreg, features, extra, reduction=model.method.ldreg_reduction)
    return term


def _assert_value_and_gradient_match(ours_fn, official_fn, features: torch.Tensor) -> None:
    mine = features.clone().requires_grad_(True)
    theirs = features.clone().requires_grad_(True)
    ours, official = ours_fn(mine), official_fn(theirs)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=0)
    ours.backward()
    official.backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-12)


def test_simclr_term_equals_the_authors_ntxent_lid_reg() -> None:
    features = _features(2 * B, seed=0)
    alpha = DEFAULT_ALPHA["simclr"]
    _assert_value_and_gradient_match(
        lambda f: _ours("simclr", f, None),
        lambda f: official_simclr_term(f[:B], f[B:], alpha, K),
        features,
    )


@pytest.mark.parametrize("method", ["byol", "moco_v3"])
def test_byol_term_equals_the_authors_byol_loss_and_moco_v3_follows_it(method: str) -> None:
    features = _features(2 * B, seed=1)
    target = _features(2 * B, seed=2) + 0.1 * features  # a target encoder's features
    alpha = DEFAULT_ALPHA[method]
    _assert_value_and_gradient_match(
        lambda f: _ours(method, f, target),
        lambda f: official_byol_term(f[:B], f[B:], target[:B], target[B:], alpha, K),
        features,
    )
    # The authors' BYOL term is twice the mean over all rows: half strength before.
    half = official_simclr_term(features[:B], features[B:], alpha, K)
    assert _ours(method, features, None).item() == pytest.approx(2 * half.item(), rel=1e-9)


def test_mae_term_equals_the_authors_mae_loss() -> None:
    cls_token = _features(B, seed=3)
    alpha = DEFAULT_ALPHA["mae"]
    _assert_value_and_gradient_match(
        lambda f: _ours("mae", f, None),
        lambda f: official_mae_term(f, alpha, K),
        cls_token,
    )


@pytest.mark.parametrize("method", ["barlow_twins", "vicreg"])
def test_methods_without_official_code_take_simclrs_form(method: str) -> None:
    features = _features(2 * B, seed=4)
    alpha = DEFAULT_ALPHA[method]
    _assert_value_and_gradient_match(
        lambda f: _ours(method, f, None),
        lambda f: official_simclr_term(f[:B], f[B:], alpha, K),
        features,
    )


def test_every_method_declares_its_ldreg_form_and_momentum_methods_add_their_target() -> None:
    forms = {name: entry.ldreg_reduction for name, entry in METHODS.items()}
    assert forms == {
        "simclr": "mean",
        "byol": "sum_views",
        "moco_v3": "sum_views",
        "barlow_twins": "mean",
        "vicreg": "mean",
        "mae": "mean",
    }
    for method in ("byol", "moco_v3"):
        model = build_train_module(spec_for(method), image_size=8, num_classes=3)
        out = model.method(torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8))
        extra = out.extra_reference["features"]
        assert extra.shape == out.features.shape and not extra.requires_grad


def test_the_training_step_reports_the_same_term_the_transcription_gives() -> None:
    spec = spec_for("byol")
    model = build_train_module(spec, image_size=8, num_classes=3)
    v1, v2 = torch.randn(B, 3, 8, 8), torch.randn(B, 3, 8, 8)
    labels = torch.randint(0, 3, (B,))
    torch.manual_seed(0)
    step = model(v1, v2, labels, True)
    torch.manual_seed(0)
    out = model.method(v1, v2)
    f = out.features.detach().double()
    t = out.extra_reference["features"].double()
    want = official_byol_term(f[:B], f[B:], t[:B], t[B:], DEFAULT_ALPHA["byol"], K)
    assert step.ldreg_loss.item() == pytest.approx(want.item(), rel=1e-4)
