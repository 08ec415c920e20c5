"""Evaluation: feature extraction, kNN, linear probes, representation metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ldreg.evaluation import (
    L2_GRID,
    OnlineLinearProbe,
    extract_features,
    knn_accuracy,
    linear_probe,
    representation_metrics,
)
from ldreg.lid import geometric_mean, lid_mle


def _clusters(n_per_class: int, classes: int, dim: int, *, spread: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * 5
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return points, labels


def test_extract_features_runs_in_eval_mode_and_restores_the_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5))
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])) for _ in range(3)]
    stats_before = model[2].running_mean.clone()
    features, labels = extract_features(model.train(), batches, "cpu")
    assert features.shape == (12, 5) and features.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 3] * 3 and labels.dtype == torch.long
    assert not features.requires_grad
    assert model.training and torch.equal(model[2].running_mean, stats_before)
    extract_features(model.eval(), batches, "cpu")
    assert not model.training


def test_knn_is_perfect_on_separable_clusters_and_chance_on_random_labels() -> None:
    train_f, train_y = _clusters(50, 5, 16, spread=0.5, seed=0)
    test_f, test_y = _clusters(20, 5, 16, spread=0.5, seed=0)
    assert knn_accuracy(train_f, train_y, test_f, test_y, k=20, num_classes=5) == 1.0

    generator = torch.Generator().manual_seed(1)
    noise_train = torch.randn(2000, 32, generator=generator)
    noise_test = torch.randn(1000, 32, generator=generator)
    random_train = torch.randint(0, 10, (2000,), generator=generator)
    random_test = torch.randint(0, 10, (1000,), generator=generator)
    acc = knn_accuracy(
        noise_train, random_train, noise_test, random_test, k=20, num_classes=10, chunk_size=128
    )
    assert 0.05 < acc < 0.15


def test_knn_votes_are_weighted_by_similarity_and_k_is_clipped() -> None:
    # Two far neighbours of class 0 against one very close neighbour of class 1.
    train_f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]])
    train_y = torch.tensor([1, 0, 0])
    test_f = torch.tensor([[1.0, 0.3]])
    test_y = torch.tensor([1])
    assert knn_accuracy(train_f, train_y, test_f, test_y, k=3, num_classes=2) == 1.0
    # A huge temperature makes votes equal: the majority (class 0) wins.
    flat = knn_accuracy(train_f, train_y, test_f, test_y, k=3, temperature=100.0, num_classes=2)
    assert flat == 0.0
    clipped = knn_accuracy(
        train_f, train_y, test_f, test_y, k=500, temperature=100.0, num_classes=2
    )
    assert clipped == flat


def test_linear_probe_separates_linear_classes_and_is_deterministic() -> None:
    train_f, train_y = _clusters(40, 4, 64, spread=3.0, seed=2)
    test_f, test_y = _clusters(25, 4, 64, spread=3.0, seed=2)
    first = linear_probe(train_f, train_y, test_f, test_y, num_classes=4, seed=1)
    again = linear_probe(train_f, train_y, test_f, test_y, num_classes=4, seed=1)
    assert first.accuracy > 0.95 and first == again
    assert first.l2 in L2_GRID and first.selection_accuracy > 0.95

    generator = torch.Generator().manual_seed(3)
    random_y = torch.randint(0, 4, (100,), generator=generator)
    chance = linear_probe(
        test_f, random_y, train_f, torch.randint(0, 4, (160,), generator=generator), num_classes=4
    )
    assert chance.accuracy < 0.45


def test_linear_probe_chooses_a_stronger_l2_where_a_weak_one_overfits() -> None:
    # 400 points in 300 dimensions, the class in 5 noisy directions: an almost
    # unregularised probe nearly interpolates the noise; the chosen λ is a strong one
    # and generalises better.
    generator = torch.Generator().manual_seed(0)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 2, (n,), generator=generator)
        x = torch.randn(n, 300, generator=generator)
        x[:, :5] += 0.7 * (2 * y - 1)[:, None]
        return x, y

    train_f, train_y = sample(400)
    test_f, test_y = sample(2000)
    weak = linear_probe(train_f, train_y, test_f, test_y, num_classes=2, l2_grid=(1e-7,))
    tuned = linear_probe(train_f, train_y, test_f, test_y, num_classes=2)
    assert weak.l2 == 1e-7
    assert tuned.l2 >= 1e-1
    assert tuned.accuracy > weak.accuracy + 0.02


def test_online_probe_learns_without_sending_gradients_to_the_backbone() -> None:
    torch.manual_seed(0)
    features, labels = _clusters(30, 3, 8, spread=0.5, seed=4)
    features.requires_grad_(True)
    probe = OnlineLinearProbe(feat_dim=8, num_classes=3)
    optimizer = probe.make_optimizer(lr=0.1)
    _, acc_start = probe.loss_and_acc(features, labels)
    for _ in range(30):
        loss, acc = probe.loss_and_acc(features, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.requires_grad and loss.ndim == 0
    assert features.grad is None
    assert acc == 1.0 and acc_start < 1.0
    assert probe.accuracy(features.detach(), labels) == 1.0 and probe.training


def test_online_probe_optimizer_has_no_weight_decay_no_lars_and_a_constant_lr() -> None:
    probe = OnlineLinearProbe(feat_dim=8, num_classes=3)
    optimizer = probe.make_optimizer(lr=0.25)
    assert isinstance(optimizer, torch.optim.SGD)
    (group,) = optimizer.param_groups
    assert group["lr"] == 0.25 and group["weight_decay"] == 0.0 and group["momentum"] == 0.9
    assert {id(p) for p in group["params"]} == {id(p) for p in probe.parameters()}


def test_representation_metrics_report_the_design_metric_names() -> None:
    generator = torch.Generator().manual_seed(0)
    # 600 points on a 4-dimensional subspace of R^64: local and global dimension ~4.
    latent = torch.randn(600, 4, generator=generator)
    features = latent @ torch.randn(4, 64, generator=generator)
    metrics = representation_metrics(features, lid_k=(32, 512))
    assert set(metrics) == {"lid_gmean_k32", "lid_gmean_k512", "effective_rank", "alpha_req"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert 2.5 < metrics["lid_gmean_k32"] < 6.0
    assert 1.0 < metrics["effective_rank"] <= 4.0 + 1e-3


def test_lid_k_above_the_sample_count_is_clipped_and_named_by_the_k_used() -> None:
    features = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="LID k=512 exceeds the 39 available neighbours"):
        metrics = representation_metrics(features, lid_k=(8, 512))
    assert "lid_gmean_k512" not in metrics  # the name would claim 512 neighbours
    assert metrics["lid_gmean_k39"] == pytest.approx(geometric_mean(lid_mle(features, k=39)))
