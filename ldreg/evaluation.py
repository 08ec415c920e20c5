"""Evaluation of frozen representations: kNN, linear probes, local and global dimension.

Usage::

    train_f, train_y = extract_features(backbone, make_eval_loader(bundle.train, ...), device)
    test_f, test_y = extract_features(backbone, make_eval_loader(bundle.val, ...), device)
    knn = knn_accuracy(train_f, train_y, test_f, test_y, k=20, num_classes=10)
    probe = linear_probe(train_f, train_y, test_f, test_y, num_classes=10)  # .accuracy, .l2
    metrics = representation_metrics(test_f, lid_k=(32, 512))
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldreg.lid import geometric_mean, lid_mle
from ldreg.rank import alpha_req, effective_rank


def _check_labelled(features: Tensor, labels: Tensor, what: str) -> None:
    if features.ndim != 2:
        raise ValueError(f"{what} features must be (N, D), found shape {tuple(features.shape)}")
    if labels.shape != (features.shape[0],):
        raise ValueError(
            f"{what} labels must be ({features.shape[0]},), found shape {tuple(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError(f"{what} set is empty")


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: Iterable, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """Run ``backbone`` in eval mode over ``loader``; return float32 CPU features and labels.

    The loader yields ``(images, labels, ...)``; the backbone's previous train/eval mode
    is restored afterwards so a call in the middle of training changes nothing.
    """
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for batch in loader:
            images, targets = batch[0], batch[1]
            out = backbone(images.to(device, non_blocking=True))
            features.append(out.float().cpu())
            labels.append(targets.long().cpu())
    finally:
        backbone.train(was_training)
    if not features:
        raise ValueError("the loader yielded no batches")
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(
    train_f: Tensor,
    train_y: Tensor,
    test_f: Tensor,
    test_y: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int,
    chunk_size: int = 1024,
) -> float:
    """Weighted k-nearest-neighbour accuracy on cosine similarity.

    Each of the ``k`` most similar training points votes for its class with weight
    ``exp(s / τ)`` (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
    Instance Discrimination", Sec. 3.4; DINO's ``eval_knn.py``). ``k`` is clipped to the
    training-set size; test rows are processed in chunks to bound memory.
    """
    _check_labelled(train_f, train_y, "train")
    _check_labelled(test_f, test_y, "test")
    if k < 1:
        raise ValueError(f"k must be >= 1, found {k}")
    k = min(k, train_f.shape[0])
    train_n = F.normalize(train_f.float(), dim=1)
    test_n = F.normalize(test_f.float(), dim=1)
    train_y = train_y.long().to(train_n.device)
    correct = 0
    for start in range(0, test_n.shape[0], chunk_size):
        sims = test_n[start : start + chunk_size] @ train_n.T
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, train_y[top_idx], weights)
        pred = votes.argmax(dim=1)
        correct += int((pred.cpu() == test_y[start : start + chunk_size].long().cpu()).sum())
    return correct / test_n.shape[0]


# Kornblith et al. 2019 (Sec. 3.1, App. A.3) pick the L2 weight of their L-BFGS
# logistic regression on a held-out part of the training set from 45 log-spaced values
# in [1e-6, 1e5] (as C = 1/λ). This grid covers the part that matters for mean
# cross-entropy + λ·||W||²: below 1e-7 the penalty is inert, above 1e1 it zeroes W.
L2_GRID = tuple(10.0**e for e in range(-7, 2))
PROBE_SPLIT = 0.2  # share of the training features held out to choose λ


@dataclass(frozen=True)
class LinearProbeResult:
    """An offline linear probe: its test accuracy and how it was chosen.

    Attributes:
        accuracy: test accuracy of the probe refitted on all training features.
        l2: the chosen L2 weight (λ of ``CE + λ·||W||²``).
        selection_accuracy: accuracy on the held-out part of the training features
            at the chosen λ.
    """

    accuracy: float
    l2: float
    selection_accuracy: float


def _fit_logistic_regression(
    x: Tensor,
    y: Tensor,
    *,
    num_classes: int,
    l2: float,
    max_iter: int,
    init: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor]:
    """Full-batch L-BFGS (strong-Wolfe) on mean cross-entropy + ``l2``·||W||²."""
    weight = init[0].clone().requires_grad_(True)
    bias = init[1].clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> float:
    with torch.no_grad():
        return ((x @ weight + bias).argmax(dim=1) == y).double().mean().item()


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mean = train.mean(dim=0)
    std = train.std(dim=0, unbiased=False).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def _stratified_holdout(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (fit, held out): ``fraction`` of every class held out, seeded."""
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_held = round(fraction * len(idx)) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def linear_probe(
    train_f: Tensor,
    train_y: Tensor,
    test_f: Tensor,
    test_y: Tensor,
    *,
    num_classes: int,
    seed: int = 0,
    l2_grid: Sequence[float] = L2_GRID,
    max_iter: int = 500,
    device: torch.device | str = "cpu",
) -> LinearProbeResult:
    """Offline linear probe whose L2 weight is chosen on held-out training features.

    The protocol of Kornblith et al. 2019 ("Do Better ImageNet Models Transfer Better?",
    Sec. 3.1 and App. A.3), also SimCLR's linear evaluation of transfer: multinomial
    logistic regression on standardised frozen features, fitted full batch with L-BFGS.
    The L2 weight λ is chosen from ``l2_grid`` by accuracy on a stratified
    ``PROBE_SPLIT`` of the training features (ties go to the stronger penalty), then
    the probe is refitted on all training features with that λ. A fixed λ can decide
    the sign of a comparison between two backbones; a chosen one cannot be tuned to it.

    Deterministic for the same inputs and ``seed`` (the split and the initialisation are
    seeded; L-BFGS is full batch). The grid is walked from strong to weak penalty, each
    fit warm-started from the previous one, which also makes each fit converge faster.
    """
    _check_labelled(train_f, train_y, "train")
    _check_labelled(test_f, test_y, "test")
    if not l2_grid:
        raise ValueError("l2_grid must name at least one value")
    x_train, x_test = train_f.float().to(device), test_f.float().to(device)
    y_train, y_test = train_y.long().to(device), test_y.long().to(device)
    fit_idx, held_idx = _stratified_holdout(train_y.long().cpu(), PROBE_SPLIT, seed)
    generator = torch.Generator().manual_seed(seed)
    init = (
        (torch.randn(x_train.shape[1], num_classes, generator=generator) * 0.01).to(device),
        torch.zeros(num_classes, device=device),
    )
    grid = sorted(l2_grid, reverse=True)
    best_l2, best_acc = grid[0], -1.0
    if len(grid) > 1 and len(held_idx) > 0:
        x_fit, x_held = _standardise(x_train[fit_idx.to(device)], x_train[held_idx.to(device)])
        y_fit, y_held = y_train[fit_idx.to(device)], y_train[held_idx.to(device)]
        params = init
        for l2 in grid:
            params = _fit_logistic_regression(
                x_fit, y_fit, num_classes=num_classes, l2=l2, max_iter=max_iter, init=params
            )
            acc = _accuracy(x_held, y_held, *params)
            if acc > best_acc:
                best_l2, best_acc = l2, acc
    x_all, x_eval = _standardise(x_train, x_test)
    params = _fit_logistic_regression(
        x_all, y_train, num_classes=num_classes, l2=best_l2, max_iter=max_iter, init=init
    )
    return LinearProbeResult(
        accuracy=_accuracy(x_eval, y_test, *params),
        l2=best_l2,
        selection_accuracy=best_acc if best_acc >= 0 else float("nan"),
    )


class OnlineLinearProbe(nn.Module):
    """A linear classifier trained alongside SSL on detached backbone features.

    The usual online evaluation of SSL frameworks (solo-learn's ``classifier``, the
    LDReg authors' ``online_prob_loss``): its loss is added to the training loss, but the
    features are detached so its gradient never reaches the backbone. It has its own
    optimizer (:meth:`make_optimizer`: momentum SGD, constant learning rate, no weight
    decay), not the SSL one — LARS would scale its steps by the trust ratio (0.001) and
    the SSL schedule would decay them to zero, and it would not learn.

    A BatchNorm without affine parameters standardises the features first, as MAE's
    linear probe (He et al. 2022, Sec. A.2): backbone features of very different scales
    then need one learning rate.

    Usage::

        probe = OnlineLinearProbe(feat_dim=512, num_classes=10)
        probe_optimizer = probe.make_optimizer(lr=0.1)
        probe_loss, acc = probe.loss_and_acc(features.detach(), labels)
        probe_loss.backward(); probe_optimizer.step()
    """

    def __init__(self, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(feat_dim, affine=False)
        self.classifier = nn.Linear(feat_dim, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.norm(features.detach()))

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)

    def loss_and_acc(self, features_detached: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy loss (a tensor to back-propagate) and batch accuracy (a 0-d
        tensor on the features' device: reading it is the caller's host sync)."""
        logits = self(features_detached.float())
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean().detach()
        return loss, acc

    @torch.no_grad()
    def accuracy(self, features: Tensor, labels: Tensor, *, batch_size: int = 1024) -> float:
        """Held-out accuracy in eval mode (BatchNorm's running statistics)."""
        was_training = self.training
        self.eval()
        try:
            device = self.classifier.weight.device
            correct = 0
            for start in range(0, features.shape[0], batch_size):
                logits = self(features[start : start + batch_size].to(device).float())
                pred = logits.argmax(dim=1).cpu()
                correct += (pred == labels[start : start + batch_size].cpu()).sum().item()
        finally:
            self.train(was_training)
        return correct / max(1, features.shape[0])


@torch.no_grad()
def representation_metrics(
    features: Tensor, *, lid_k: Sequence[int] = (32, 512)
) -> dict[str, float]:
    """Local and global dimensionality of a representation, named as in docs/science.md.

    ``lid_gmean_k{k}`` is the geometric mean of the MLE LID of every point with its
    ``k`` nearest neighbours among the others, in the LDReg authors' tracking variant
    ``-k / Σ_{i<k} ln(r_i / r_k)`` (``lid_mle`` variant ``"ldreg"``, their ``lid.py``;
    Levina & Bickel 2004 put ``k - 1`` in the numerator, so these values are
    ``k / (k - 1)`` times theirs). The geometric mean is LDReg's natural mean of LIDs
    (Huang et al. 2024, Sec. 4). A ``k`` above ``N - 1`` is clipped to ``N - 1`` with
    a warning, and the key names the ``k`` actually used (``k=512`` on 359 points gives
    ``lid_gmean_k358``): a metric's name never claims a neighbourhood it did not use.
    ``effective_rank`` is RankMe (Garrido et al. 2023) and ``alpha_req`` the eigenspectrum
    power-law exponent (Agrawal et al. 2022).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), found shape {tuple(features.shape)}")
    n = features.shape[0]
    if n < 3:
        raise ValueError(f"representation metrics need at least 3 points, found {n}")
    x = features.float()
    metrics: dict[str, float] = {}
    for k in lid_k:
        k_used = k
        if k > n - 1:
            k_used = n - 1
            warnings.warn(
                f"LID k={k} exceeds the {n - 1} available neighbours; using k={k_used}",
                stacklevel=2,
            )
        metrics[f"lid_gmean_k{k_used}"] = float(geometric_mean(lid_mle(x, k=k_used)))
    metrics["effective_rank"] = float(effective_rank(x))
    metrics["alpha_req"] = float(alpha_req(x))
    return metrics
