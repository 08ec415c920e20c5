"""LDReg: official-formula parity, the effect of its gradient, and distributed equivalence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldreg.distributed import (
    all_gather_rows,
    gather_no_grad,
    gather_with_grad,
    rank,
    world_size,
)
from ldreg.launch import free_port
from ldreg.lid import geometric_mean, lid_mle, lid_mom
from ldreg.regularizer import LDReg


def official_lid_mom_est(data: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """Transcription of ``lid_mom_est`` in the authors' lid.py (full cdist + full sort)."""
    r = torch.cdist(data, reference, p=2)
    a, _ = torch.sort(r, dim=1)
    m = torch.mean(a[:, 1:k], dim=1)
    return m / (a[:, k] - m)


def official_lid_mle(data: torch.Tensor, reference: torch.Tensor, k: int, eps: float = 1e-4):
    """Transcription of ``lid_mle`` in the authors' lid.py (``eps`` = their 1e-4 in the log)."""
    r = torch.cdist(data, reference, p=2)
    a, _ = torch.sort(r, dim=1)
    return -k / torch.sum(torch.log(a[:, 1:k] / a[:, k].view(-1, 1) + eps), dim=1)


def official_reg_loss(features, k, alpha, estimator="mom", reg_type="l1", eps=1e-4):
    """The regularizer term of ``NTXentLIDReg.forward`` (ntxent_lid_reg.py), averaged."""
    if estimator == "mom":
        lids = official_lid_mom_est(features, features.detach(), k)
    else:
        lids = official_lid_mle(features, features.detach(), k, eps)
    lid_reg = -torch.abs(torch.log(lids)) if reg_type == "l1" else -torch.log(lids)
    return (alpha * lid_reg).mean()


def batch_features(n: int = 256, d: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)


@pytest.mark.parametrize("form", ["l1", "log"])
def test_mom_loss_and_gradient_equal_the_official_code(form):
    f_ours = batch_features().requires_grad_(True)
    f_official = f_ours.detach().clone().requires_grad_(True)
    ours = LDReg(alpha=0.01, k=64, estimator="mom", form=form)(f_ours)
    want = official_reg_loss(f_official, 64, 0.01, "mom", "l1" if form == "l1" else "log")
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=0)
    ours.backward()
    want.backward()
    torch.testing.assert_close(f_ours.grad, f_official.grad, rtol=1e-3, atol=1e-9)


def test_mle_loss_equals_the_official_code_up_to_its_log_epsilon():
    features = batch_features(seed=1)
    ours = LDReg(alpha=0.01, k=32, estimator="mle")(features)
    without_eps = official_reg_loss(features, 32, 0.01, "mle", eps=0.0)
    torch.testing.assert_close(ours, without_eps, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        ours, official_reg_loss(features, 32, 0.01, "mle"), rtol=1e-3, atol=0
    )


def test_gradient_descent_on_a_locally_collapsed_cloud_raises_its_lid():
    g = torch.Generator().manual_seed(2)
    # 256 points on a 2-D plane in 16-D with a little noise: locally ~2-dimensional.
    plane = torch.randn(256, 2, generator=g) @ torch.randn(2, 16, generator=g)
    cloud = (plane + 0.01 * torch.randn(256, 16, generator=g)).requires_grad_(True)
    before = geometric_mean(lid_mle(cloud.detach(), 16))
    regularizer = LDReg(alpha=1.0, k=16)  # official defaults: MoM, -|ln LID|
    # Adam: LID is scale-free, so plain SGD's step would depend on the cloud's scale.
    optimizer = torch.optim.Adam([cloud], lr=0.02)
    for _ in range(20):
        optimizer.zero_grad()
        regularizer(cloud).backward()
        optimizer.step()
    after = geometric_mean(lid_mle(cloud.detach(), 16))
    assert before < 2.5
    assert after > 1.3 * before, f"LID {before:.2f} -> {after:.2f}"


def test_reference_is_detached_and_neighbours_come_from_it():
    features = batch_features(64, 8, seed=3).requires_grad_(True)
    reference = batch_features(100, 8, seed=4).requires_grad_(True)
    loss = LDReg(alpha=0.5, k=10, form="log")(features, reference)
    want = 0.5 * -torch.log(lid_mom(features.detach(), 10, reference.detach())).mean()
    torch.testing.assert_close(loss.detach(), want)
    loss.backward()
    assert reference.grad is None and features.grad.abs().sum() > 0


def test_self_offset_excludes_the_features_inside_an_extended_reference():
    features = batch_features(64, 8, seed=5)
    extra = batch_features(30, 8, seed=6)
    reg = LDReg(alpha=1.0, k=10, form="log")
    loss = reg(features, torch.cat([extra, features]), self_offset=30)
    want = -torch.log(lid_mom(torch.cat([extra, features]), 10)[30:]).mean()
    torch.testing.assert_close(loss, want)


def test_non_finite_features_give_a_nan_loss_for_the_training_loop_to_report():
    features = batch_features(64, 8, seed=9)
    features[3, 2] = float("inf")
    features.requires_grad_(True)
    loss = LDReg(alpha=0.01, k=8)(features)
    assert torch.isnan(loss)
    loss.backward()  # still part of the graph


def test_half_precision_features_give_a_finite_float32_loss_and_gradient():
    features = batch_features(128, 16, seed=7).half().requires_grad_(True)
    loss = LDReg(alpha=0.01, k=16)(features)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert features.grad.dtype == torch.float16 and torch.isfinite(features.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -1.0}, "alpha must be a finite number >= 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number >= 0"),
        ({"alpha": 0.1, "k": 1}, "k must be an integer >= 2"),
        ({"alpha": 0.1, "estimator": "tle"}, "estimator must be 'mom' or 'mle'"),
        ({"alpha": 0.1, "form": "l2"}, "form must be 'l1' or 'log'"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LDReg(**kwargs)


def test_a_batch_not_larger_than_k_is_refused_with_the_sizes():
    with pytest.raises(ValueError, match=r"k=64 needs more than 64 samples .* found 32"):
        LDReg(alpha=0.01, k=64)(torch.randn(32, 8))
    with pytest.raises(ValueError, match=r"found \(32,\)"):
        LDReg(alpha=0.01, k=4)(torch.randn(32))


def test_distributed_helpers_are_the_identity_without_a_process_group():
    x = torch.randn(5, 3, requires_grad=True)
    assert (world_size(), rank()) == (1, 0)
    assert gather_with_grad(x) is x
    assert not gather_no_grad(x).requires_grad
    gathered, offset = all_gather_rows(x, keep_local_grad=False)
    assert offset == 0 and torch.equal(gathered, x.detach())


# ----------------------------------------------------------------------------- two ranks

RANK_SIZES = (40, 24)  # uneven on purpose: the gather pads and trims


def _rank_main(rank_id: int, port: int, features: torch.Tensor, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank_id, world_size=len(RANK_SIZES)
    )
    try:
        torch.set_num_threads(1)
        start = sum(RANK_SIZES[:rank_id])
        local = features[start : start + RANK_SIZES[rank_id]]
        result: dict[str, object] = {"rank": rank(), "world_size": world_size()}
        for estimator in ("mom", "mle"):
            rows = local.clone().requires_grad_(True)
            loss = LDReg(alpha=0.5, k=8, estimator=estimator, gather_distributed=True)(rows)
            loss.backward()
            result[estimator] = (loss.detach(), rows.grad)
        rows = local.clone().requires_grad_(True)
        gathered = gather_with_grad(rows)
        weights = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)
        (gathered * weights).sum().backward()
        result["gathered"] = gathered.detach()
        result["gather_grad"] = rows.grad
        result["offset"] = all_gather_rows(rows, keep_local_grad=False)[1]
        # Rank 1 diverges: both ranks must still join the gather and both report NaN.
        diverged = local.clone()
        if rank_id == 1:
            diverged[0, 0] = float("nan")
        result["nan_loss"] = LDReg(alpha=0.5, k=8, gather_distributed=True)(diverged)
        torch.save(result, Path(out_dir) / f"rank{rank_id}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_reproduce_the_single_process_loss_and_gradients(tmp_path):
    features = batch_features(sum(RANK_SIZES), 6, seed=8)
    mp.spawn(
        _rank_main,
        args=(free_port(), features, str(tmp_path)),
        nprocs=len(RANK_SIZES),
        join=True,
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(RANK_SIZES))]
    total = sum(RANK_SIZES)
    starts = [0, RANK_SIZES[0]]
    for estimator in ("mom", "mle"):
        single = features.clone().requires_grad_(True)
        single_loss = LDReg(alpha=0.5, k=8, estimator=estimator)(single)
        single_loss.backward()
        # Each rank averages over its own rows; weighting by rows gives the global mean.
        combined = sum(res[estimator][0] * n for res, n in zip(results, RANK_SIZES, strict=True))
        torch.testing.assert_close(combined / total, single_loss.detach(), rtol=1e-5, atol=0)
        for res, start, n in zip(results, starts, RANK_SIZES, strict=True):
            local_grad = res[estimator][1]
            # d(global mean)/d(row) = (n / total) * d(local mean)/d(row).
            torch.testing.assert_close(
                local_grad * n / total, single.grad[start : start + n], rtol=1e-4, atol=1e-7
            )
    assert all(torch.isnan(res["nan_loss"]) for res in results)
    weights = torch.arange(total * 6, dtype=torch.float32).view(total, 6)
    for res, start, n in zip(results, starts, RANK_SIZES, strict=True):
        assert (res["rank"], res["world_size"], res["offset"]) == (starts.index(start), 2, start)
        torch.testing.assert_close(res["gathered"], features)
        # Gradient reaches this rank's rows only, from this rank's loss only.
        torch.testing.assert_close(res["gather_grad"], weights[start : start + n])
