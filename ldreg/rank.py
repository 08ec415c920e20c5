"""Global dimensionality of a representation: effective rank, alpha-ReQ, PCA dimensions.

Where LID (``ldreg.lid``) measures how many directions a neighbourhood spans,
these measure how many the whole embedding matrix spans. Dimensional collapse shows
up here as a small effective rank or a steep eigenspectrum decay (large alpha).

All three work from the spectrum of the (N, D) matrix, computed in float64 from its
min(N, D)-sized Gram matrix accumulated chunk by chunk (memory O(D^2 + chunk * D)).

Degenerate inputs (documented policy):

* an all-zero matrix (rank 0) has effective rank 0.0 and needs 0 PCA dimensions;
* a constant matrix (all rows equal) has rank 1 uncentred -- effective rank 1.0 --
  and no variance once centred: ``pca_dims`` returns 0;
* ``alpha_req`` returns ``math.inf`` when fewer than two eigenvalues are non-zero:
  the spectrum falls to zero after the first eigenvalue, faster than any power law.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldreg.lid import LIDInputError

__all__ = ["alpha_req", "effective_rank", "pca_dims", "singular_values"]

# Eigenvalues below this fraction of the largest are rounding noise of the Gram matrix.
_RELATIVE_TOLERANCE = 1e-12
_CHUNK_ROWS = 8192


def _as_matrix(x: object) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2:
        raise LIDInputError(f"x must be a 2-D (N, D) matrix, found shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise LIDInputError(f"x is empty: shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise LIDInputError(f"x must hold real numbers, found dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise LIDInputError("x contains NaN or inf")
    return x.detach()


def _squared_singular_values(x: Tensor, center: bool) -> Tensor:
    """Descending eigenvalues of X^T X (= squared singular values of X), float64."""
    n, d = x.shape
    mean = x.to(torch.float64).mean(dim=0, keepdim=True) if center else None
    if n >= d:
        gram = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for s in range(0, n, _CHUNK_ROWS):
            block = x[s : s + _CHUNK_ROWS].to(torch.float64)
            if mean is not None:
                block = block - mean
            gram += block.T @ block
    else:
        block = x.to(torch.float64)
        if mean is not None:
            block = block - mean
        gram = block @ block.T
    eigenvalues = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0.0)
    top = eigenvalues[0]
    return torch.where(eigenvalues > _RELATIVE_TOLERANCE * top, eigenvalues, 0.0).cpu()


def singular_values(x: object, *, center: bool = False) -> Tensor:
    """Singular values of the (N, D) matrix, descending, float64 on the CPU."""
    return _squared_singular_values(_as_matrix(x), center).sqrt()


def effective_rank(x: object, *, center: bool = False) -> float:
    """RankMe: exp of the Shannon entropy of the normalised singular values.

    RankMe(Z) = exp(-sum_k p_k ln p_k),  p_k = sigma_k(Z) / ||sigma(Z)||_1
    (Garrido, Balestriero, Najman, LeCun, "RankMe: Assessing the downstream
    performance of pretrained self-supervised representations by their rank",
    ICML 2023, eq. 1; we use the exact limit 0 ln 0 = 0 instead of the paper's
    +1e-7 inside p_k). Ranges from 0 (all-zero matrix) to min(N, D); equals r for
    a matrix with r equal non-zero singular values. RankMe uses the uncentred
    embeddings; ``center=True`` measures the spread around the mean instead.
    """
    sigma = singular_values(x, center=center)
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * torch.log(p)).sum()))


def alpha_req(x: object, *, max_components: int | None = None) -> float:
    """alpha-ReQ: exponent alpha of the power-law decay lambda_i ~ i^(-alpha) of the
    covariance eigenspectrum.

    Agrawal, Mondal, Ghosh, Richards, "alpha-ReQ: Assessing representation quality in
    self-supervised learning by measuring eigenspectrum decay", NeurIPS 2022, sec. 3:
    alpha is the negated slope of the least-squares line through (ln i, ln lambda_i)
    over the non-zero eigenvalues of the centred covariance (the first
    ``max_components`` of them if given). Small alpha: a flat spectrum using many
    dimensions; large alpha: dimensional collapse. ``math.inf`` below two non-zero
    eigenvalues (see the module docstring).
    """
    eigenvalues = _squared_singular_values(_as_matrix(x), center=True)
    eigenvalues = eigenvalues[eigenvalues > 0]
    if max_components is not None:
        if max_components < 2:
            raise LIDInputError(f"max_components must be at least 2, found {max_components}")
        eigenvalues = eigenvalues[:max_components]
    if eigenvalues.numel() < 2:
        return math.inf
    log_index = torch.log(torch.arange(1, eigenvalues.numel() + 1, dtype=torch.float64))
    log_value = torch.log(eigenvalues)
    li = log_index - log_index.mean()
    slope = (li * (log_value - log_value.mean())).sum() / li.square().sum()
    return float(-slope)


def pca_dims(x: object, variance: float = 0.9) -> int:
    """Smallest number of principal components whose explained variance reaches the
    fraction ``variance`` (0 < variance <= 1) of the total; 0 for a constant matrix."""
    if not 0.0 < variance <= 1.0:
        raise LIDInputError(f"variance must be in (0, 1], found {variance}")
    eigenvalues = _squared_singular_values(_as_matrix(x), center=True)
    total = eigenvalues.sum()
    if total <= 0:
        return 0
    explained = torch.cumsum(eigenvalues, dim=0) / total
    # A fraction reached up to rounding counts as reached (9 of 10 equal components
    # explain 0.9 exactly, not 0.8999999999999999).
    reached = explained >= variance - 1e-9
    return int(torch.nonzero(reached)[0, 0]) + 1
