"""Evaluation of frozen representations: kNN, linear probes, local and global dimension.

Usage::

    train_f, train_y = extract_features(backbone, make_eval_loader(bundle.train, ...), device)
    test_f, test_y = extract_features(backbone, make_eval_loader(bundle.val, ...), device)
    knn = knn_accuracy(train_f, train_y, test_f, test_y, k=20, num_classes=10)
    probe = linear_probe_accuracy(train_f, train_y, test_f, test_y, num_classes=10)
    metrics = representation_metrics(test_f, lid_k=(32, 512))
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

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
        correct += (pred.cpu() == test_y[start : start + chunk_size].long().cpu()).sum().item()
    return correct / test_n.shape[0]


def linear_probe_accuracy(
    train_f: Tensor,
    train_y: Tensor,
    test_f: Tensor,
    test_y: Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    seed: int = 0,
    weight_decay: float = 1e-4,
    device: torch.device | str = "cpu",
) -> float:
    """Test accuracy of multinomial logistic regression on standardised frozen features.

    The L-BFGS logistic-regression protocol of Kornblith et al. 2019 ("Do Better ImageNet
    Models Transfer Better?"), also SimCLR's transfer evaluation: features are standardised with the
    training set's mean and std, then the L2-regularised cross-entropy is minimised full
    batch with L-BFGS (strong-Wolfe line search) for ``epochs`` iterations. Full batch and
    a seeded initialisation make the result deterministic for the same inputs.
    """
    _check_labelled(train_f, train_y, "train")
    _check_labelled(test_f, test_y, "test")
    x_train = train_f.float().to(device)
    x_test = test_f.float().to(device)
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False).clamp_min(1e-6)
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    y_train = train_y.long().to(device)

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(x_train.shape[1], num_classes, generator=generator) * 0.01
    weight = weight.to(device).requires_grad_(True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=epochs,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = x_train @ weight + bias
        loss = F.cross_entropy(logits, y_train) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        pred = (x_test @ weight + bias).argmax(dim=1).cpu()
    return (pred == test_y.long().cpu()).double().mean().item()


class OnlineLinearProbe(nn.Module):
    """A linear classifier trained alongside SSL on detached backbone features.

    The usual online evaluation of SSL frameworks (solo-learn, lightly): its loss is
    added to the training loss, but the features are detached so the classifier's
    gradient never reaches the backbone and cannot shape the representation.

    Usage::

        probe = OnlineLinearProbe(feat_dim=512, num_classes=10)
        probe_loss, acc = probe.loss_and_acc(features.detach(), labels)
        (ssl_loss + probe_loss).backward()
    """

    def __init__(self, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(feat_dim, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(features.detach())

    def loss_and_acc(self, features_detached: Tensor, labels: Tensor) -> tuple[Tensor, float]:
        """Cross-entropy loss (a tensor to back-propagate) and batch accuracy (a float)."""
        logits = self(features_detached.float())
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean().item()
        return loss, acc


@torch.no_grad()
def representation_metrics(
    features: Tensor, *, lid_k: Sequence[int] = (32, 512)
) -> dict[str, float]:
    """Local and global dimensionality of a representation, with DESIGN.md's metric names.

    ``lid_gmean_k{k}`` is the geometric mean of the MLE LID of every point with its
    ``k`` nearest neighbours among the others (Levina & Bickel 2004; the geometric mean
    is LDReg's natural mean of LIDs, Huang et al. 2024, Sec. 4). ``k`` is clipped to
    ``N - 1`` with a warning; the key keeps the requested ``k`` so series stay aligned.
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
        metrics[f"lid_gmean_k{k}"] = float(geometric_mean(lid_mle(x, k=k_used)))
    metrics["effective_rank"] = float(effective_rank(x))
    metrics["alpha_req"] = float(alpha_req(x))
    return metrics
