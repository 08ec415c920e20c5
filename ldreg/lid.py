"""Local intrinsic dimensionality (LID) from k-nearest-neighbour distances.

The LID of a point is estimated from the distances r_1 <= ... <= r_k to its k
nearest neighbours in a reference set (by default the other points of ``x``; the
point's own row is excluded by index, so a duplicate of the point is a real
neighbour at distance 0).

Estimators (all scale-free: functions of the ratios rho_i = r_i / r_k only):

``lid_mle``, ``variant="ldreg"`` (default)
    LID = -k / sum_{i=1}^{k-1} ln(r_i / r_k).
    The MLE of the authors' LDReg code (Huang et al., ICLR 2024, ``lid.py``:
    ``-k / sum(log(a[:, 1:k] / a[:, k]))``); the official code adds 1e-4 inside the log,
    which we replace by the ratio floor below.
``lid_mle``, ``variant="levina_bickel"``
    LID = (k - 1) / sum_{i=1}^{k-1} ln(r_k / r_i)  (Levina & Bickel, NIPS 2004, eq. 8;
    Hill's estimator). Identical to ``skdim.id.MLE().fit(X, n_neighbors=k).dimension_pw_``
    (scikit-dimension's default: no noise model, ``unbiased=False``; its neighbours come
    from ``NearestNeighbors.kneighbors()`` without a query, which also excludes each
    point itself by index).
``lid_mom``, ``variant="ldreg"`` (default)
    m = mean(r_1 .. r_{k-1}),  LID = m / (r_k - m).
    The method-of-moments estimator as the official LDReg code computes it
    (``lid_mom_est``: ``m = mean(a[:, 1:k]); m / (a[:, k] - m)``).
``lid_mom``, ``variant="amsaleg"``
    mu = mean(r_1 .. r_k),  LID = mu / (r_k - mu)  (Amsaleg et al., "Extreme-value-
    theoretic estimation of local intrinsic dimensionality", DMKD 2018, sec. 4.1 with
    the first moment). Identical to ``skdim.id.MOM().fit(X, n_neighbors=k).dimension_pw_``.
``lid_tle``
    Tight local estimator (Amsaleg, Chelly, Houle, Kawarabayashi, Radovanovic,
    Treeratanajaru, "Intrinsic dimensionality estimation within tight localities",
    SDM 2019, eq. 12 with central measurements and reflections; the authors' MATLAB
    ``idtlec.m``). Besides the k distances it uses the k(k-1) pairwise distances among
    the neighbours. Identical to ``skdim.id.TLE(epsilon).fit(X, n_neighbors=k)`` on data
    where no measurement falls below ``epsilon * r_k`` (scikit-dimension compares with
    an absolute ``epsilon``; ours is relative to r_k so the estimate is scale-free).

Degenerate neighbourhoods (documented policy; no estimator returns NaN or inf):

* A ratio r_i / r_k is floored at ``RATIO_FLOOR`` (1e-6): a duplicate or near-
  duplicate neighbour counts as one at a tiny relative distance.
* If all k neighbours coincide with the point (r_k = 0), every ratio is taken as
  ``RATIO_FLOOR`` -- the limit of the previous rule -- so the neighbourhood is
  (almost) zero-dimensional: MLE(ldreg) = k / ((k-1) ln 1e6) ~ 0.072,
  MoM(ldreg) = 1e-6 / (1 - 1e-6) ~ 1e-6.
* If all k neighbours are equidistant (r_1 = r_k), the estimators diverge; the
  MLE denominator is floored at (k-1) * RATIO_FLOOR and the MoM denominator
  (1 - mean ratio) at RATIO_FLOOR, so the LID is capped near 1e6.
* TLE falls back to the MLE (``variant="ldreg"``) of the same distances where its
  pairwise measurements carry no information (r_k = 0, or Amsaleg et al.'s boundary
  case 5: all measurements equal r_k), instead of the 0 the MATLAB code returns.

The exact k-NN search that gives the distances is ``ldreg.knn``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ldreg.knn import (
    DEFAULT_BLOCK_BYTES,
    LIDInputError,
    as_points,
    check_k,
    compute_dtype,
    knn,
    knn_distances,
)

__all__ = [
    "RATIO_FLOOR",
    "TLE_EPSILON",
    "LIDInputError",
    "fisher_rao_distance",
    "geometric_mean",
    "harmonic_mean",
    "knn",
    "knn_distances",
    "lid_from_distances",
    "lid_mle",
    "lid_mom",
    "lid_tle",
    "lid_tle_from_knn",
    "mean",
    "median",
]

RATIO_FLOOR = 1e-6
TLE_EPSILON = 1e-4

Estimator = Literal["mle", "mom", "tle"]


# ----------------------------------------------------------------------------- estimators


def _check_distances(dists: object) -> Tensor:
    if not isinstance(dists, Tensor):
        dists = torch.as_tensor(dists)
    if dists.ndim != 2:
        raise LIDInputError(
            f"dists must be a 2-D (N, k) tensor of neighbour distances, found shape "
            f"{tuple(dists.shape)}"
        )
    if dists.shape[0] == 0:
        raise LIDInputError("dists is empty: no points")
    if dists.shape[1] < 2:
        raise LIDInputError(f"k must be at least 2, found k={dists.shape[1]}")
    if not dists.is_floating_point():
        dists = dists.to(torch.float32)
    if not bool(torch.isfinite(dists).all()):
        raise LIDInputError("dists contains NaN or inf")
    if bool((dists < 0).any()):
        raise LIDInputError("dists contains negative distances")
    if bool((dists[:, 1:] < dists[:, :-1]).any()):
        raise LIDInputError("dists must be sorted ascending along each row")
    return dists


def _ratios(dists: Tensor) -> Tensor:
    """rho_i = r_i / r_k in float64, floored at RATIO_FLOOR; all-duplicate rows -> floor."""
    d = dists.to(torch.float64)
    r_k = d[:, -1:]
    positive = r_k > 0
    rho = torch.where(positive, d / torch.where(positive, r_k, 1.0), RATIO_FLOOR)
    return rho.clamp(min=RATIO_FLOOR, max=1.0)


def _result_dtype(dists: Tensor) -> torch.dtype:
    return torch.float64 if dists.dtype == torch.float64 else torch.float32


_MLE_VARIANTS = ("ldreg", "levina_bickel")
_MOM_VARIANTS = ("ldreg", "amsaleg")


def _check_variant(variant: str, allowed: tuple[str, ...], name: str) -> None:
    if variant not in allowed:
        options = " or ".join(repr(a) for a in allowed)
        raise LIDInputError(f"unknown {name} variant {variant!r}; use {options}")


def _mle(rho: Tensor, variant: str) -> Tensor:
    _check_variant(variant, _MLE_VARIANTS, "MLE")
    k = rho.shape[1]
    # sum_{i<k} ln(r_k / r_i); the i = k term is ln 1 = 0.
    log_sum = (-torch.log(rho[:, :-1])).sum(dim=1).clamp(min=(k - 1) * RATIO_FLOOR)
    return (k if variant == "ldreg" else k - 1) / log_sum


def _mom(rho: Tensor, variant: str) -> Tensor:
    _check_variant(variant, _MOM_VARIANTS, "MoM")
    m = rho[:, :-1].mean(dim=1) if variant == "ldreg" else rho.mean(dim=1)
    return m / (1.0 - m).clamp(min=RATIO_FLOOR)


def _tle(dists: Tensor, pairwise: Tensor, epsilon: float) -> Tensor:
    """TLE (Amsaleg et al. 2019, eq. 12 + boundary cases of ``idtlec.m``), batched.

    dists: (B, k) ascending query-neighbour distances; pairwise: (B, k, k)
    neighbour-neighbour distances. Computed in float64.
    """
    d = dists.to(torch.float64)
    v = pairwise.to(torch.float64)
    k = d.shape[1]
    r = d[:, -1].view(-1, 1, 1)
    di = d.unsqueeze(2).expand(-1, k, k)
    dj = d.unsqueeze(1).expand(-1, k, k)
    di2, dj2, v2 = di.square(), dj.square(), v.square()
    z2 = 2 * di2 + 2 * dj2 - v2  # |x_i + x_j - 2q|^2: the reflection of x_j through x_i
    denom = 2 * (r.square() - di2)
    a_s = di2 + v2 - dj2
    a_t = di2 + z2 - dj2
    s = r * (torch.sqrt(a_s.square() + 4 * v2 * (r.square() - di2)) - a_s) / denom
    t = r * (torch.sqrt(a_t.square() + 4 * z2 * (r.square() - di2)) - a_t) / denom
    # Neighbours at distance exactly r_k: the quadratic degenerates to a linear equation.
    on_boundary = di == r
    s = torch.where(on_boundary, r * v2 / (r.square() + v2 - dj2), s)
    t = torch.where(on_boundary, r * z2 / (r.square() + z2 - dj2), t)
    # u_i = 0: the measurements reduce to u_j.
    s = torch.where(di == 0, dj, s)
    t = torch.where(di == 0, dj, t)
    # u_j = 0: both reduce to r v / (r + v).
    harmonic = r * v / (r + v)
    s = torch.where(dj == 0, harmonic, s)
    t = torch.where(dj == 0, harmonic, t)
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=d.device).unsqueeze(0)
    # v_ij = 0 (duplicate neighbours): both measurements are dropped.
    coincide = (v == 0) & off_diagonal
    # Measurements below epsilon (relative to r_k here) or 0/0 are dropped in pairs.
    tiny = epsilon * r
    dropped = ((t < tiny) | (s < tiny) | t.isnan() | s.isnan()) & off_diagonal & ~coincide
    keep = off_diagonal & ~coincide & ~dropped
    r_safe = torch.where(r > 0, r, 1.0)
    log_t = torch.where(keep, torch.log(torch.where(keep, t, r) / r_safe), 0.0)
    log_s = torch.where(keep, torch.log(torch.where(keep, s, r) / r_safe), 0.0)
    s1 = log_t.sum(dim=(1, 2)) + log_s.sum(dim=(1, 2))
    r_flat = r.view(-1, 1)
    kept_d = d >= epsilon * r_flat
    log_d = torch.where(kept_d, torch.log(torch.where(kept_d, d, 1.0) / r_safe.view(-1, 1)), 0.0)
    s2 = log_d.sum(dim=1)
    n_measurements = (
        k * k - dropped.sum(dim=(1, 2)) - (~kept_d).sum(dim=1) - coincide.sum(dim=(1, 2))
    )
    tle = -2.0 * n_measurements.to(torch.float64) / (s1 + 2.0 * s2)
    informative = (r.view(-1) > 0) & (s1 <= -epsilon)
    fallback = _mle(_ratios(d), "ldreg")
    return torch.where(informative & torch.isfinite(tle) & (tle > 0), tle, fallback)


def lid_from_distances(
    dists: object,
    estimator: Estimator = "mle",
    *,
    variant: str | None = None,
    pairwise: object | None = None,
    epsilon: float = TLE_EPSILON,
) -> Tensor:
    """LIDs from precomputed (N, k) ascending neighbour distances (self already excluded).

    One k-NN pass at the largest k serves every smaller k: ``dists[:, :k]``.

    Args:
        estimator: ``"mle"``, ``"mom"`` or ``"tle"`` (formulas in the module docstring).
        variant: ``"ldreg"`` (default) or ``"levina_bickel"`` for MLE; ``"ldreg"``
            (default) or ``"amsaleg"`` for MoM.
        pairwise: (N, k, k) distances among each point's neighbours; required for TLE
            (see :func:`lid_tle_from_knn`, which builds them chunk by chunk).
        epsilon: TLE only, threshold relative to r_k below which measurements are dropped.

    Returns (N,) float32 LIDs (float64 if ``dists`` is float64), differentiable for
    MLE and MoM.
    """
    d = _check_distances(dists)
    out_dtype = _result_dtype(d)
    if estimator == "mle":
        return _mle(_ratios(d), variant or "ldreg").to(out_dtype)
    if estimator == "mom":
        return _mom(_ratios(d), variant or "ldreg").to(out_dtype)
    if estimator == "tle":
        if variant is not None:
            raise LIDInputError("TLE has no variants")
        if pairwise is None:
            raise LIDInputError("TLE needs the (N, k, k) pairwise neighbour distances")
        p = pairwise if isinstance(pairwise, Tensor) else torch.as_tensor(pairwise)
        if p.shape != (*d.shape, d.shape[1]):
            raise LIDInputError(
                f"pairwise must have shape {(*d.shape, d.shape[1])}, found {tuple(p.shape)}"
            )
        return _tle(d, p, epsilon).to(out_dtype)
    raise LIDInputError(f"unknown estimator {estimator!r}; use 'mle', 'mom' or 'tle'")


def lid_mle(
    x: object,
    k: int = 64,
    reference: object | None = None,
    *,
    variant: Literal["ldreg", "levina_bickel"] = "ldreg",
    self_offset: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-point maximum-likelihood LID, (N,) float32; see the module docstring.

    ``variant="ldreg"``: -k / sum_{i<k} ln(r_i/r_k) (LDReg official code);
    ``variant="levina_bickel"``: (k-1) / sum_{i<k} ln(r_k/r_i) (Levina & Bickel 2004,
    eq. 8; = ``skdim.id.MLE().fit(X, n_neighbors=k).dimension_pw_``).

    Raises:
        LIDInputError (a ValueError): bad shape, NaN/inf, k < 2 or k above the number
        of available neighbours.
    """
    check_k(k)
    _check_variant(variant, _MLE_VARIANTS, "MLE")
    dists = knn_distances(x, k, reference, self_offset=self_offset, chunk_size=chunk_size)
    return _mle(_ratios(dists), variant).to(_result_dtype(dists))


def lid_mom(
    x: object,
    k: int = 64,
    reference: object | None = None,
    *,
    variant: Literal["ldreg", "amsaleg"] = "ldreg",
    self_offset: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-point method-of-moments LID, (N,) float32; see the module docstring.

    ``variant="ldreg"``: m = mean(r_1..r_{k-1}), m / (r_k - m) (LDReg official code,
    the regularizer's default); ``variant="amsaleg"``: mean over r_1..r_k (Amsaleg et
    al. 2018; = ``skdim.id.MOM().fit(X, n_neighbors=k).dimension_pw_``).
    """
    check_k(k)
    _check_variant(variant, _MOM_VARIANTS, "MoM")
    dists = knn_distances(x, k, reference, self_offset=self_offset, chunk_size=chunk_size)
    return _mom(_ratios(dists), variant).to(_result_dtype(dists))


def lid_tle_from_knn(
    dists: Tensor,
    indices: Tensor,
    reference: Tensor,
    *,
    epsilon: float = TLE_EPSILON,
    chunk_size: int | None = None,
) -> Tensor:
    """TLE from a k-NN result (``knn``), building the neighbours' pairwise distances
    chunk by chunk; ``dists``/``indices`` may be sliced to a smaller k first."""
    d = _check_distances(dists)
    if indices.shape != d.shape:
        raise LIDInputError(
            f"indices must match dists' shape {tuple(d.shape)}, found {tuple(indices.shape)}"
        )
    ref = as_points(reference, "reference")
    dtype = compute_dtype(ref, d)
    k = d.shape[1]
    # _tle keeps about two dozen (chunk, k, k) float64 temporaries alive.
    step = chunk_size or max(1, DEFAULT_BLOCK_BYTES // (8 * k * (24 * k + ref.shape[1])))
    out = torch.empty(d.shape[0], dtype=_result_dtype(d), device=d.device)
    with torch.no_grad():
        for s in range(0, d.shape[0], step):
            neighbours = ref[indices[s : s + step]].to(dtype)
            # Direct differences, not the matmul expansion: coincident neighbours must
            # come out exactly 0 (boundary case 4).
            pairwise = torch.cdist(
                neighbours, neighbours, compute_mode="donot_use_mm_for_euclid_dist"
            )
            out[s : s + step] = _tle(d[s : s + step].detach(), pairwise, epsilon).to(out.dtype)
    return out


def lid_tle(
    x: object,
    k: int = 64,
    reference: object | None = None,
    *,
    epsilon: float = TLE_EPSILON,
    self_offset: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-point tight local estimator (Amsaleg et al. 2019), (N,) float32; not
    differentiable. Costs O(k^2) per point on top of the k-NN search."""
    check_k(k)
    points = as_points(x, "x")
    ref = points if reference is None else as_points(reference, "reference")
    with torch.no_grad():
        dists, indices = knn(points, k, reference, self_offset=self_offset, chunk_size=chunk_size)
    return lid_tle_from_knn(dists, indices, ref, epsilon=epsilon)


# ----------------------------------------------------------------------------- aggregates


def _positive_lids(lids: object) -> Tensor:
    values = lids if isinstance(lids, Tensor) else torch.as_tensor(lids)
    values = values.detach().reshape(-1).to(torch.float64)
    if values.numel() == 0:
        raise LIDInputError("cannot aggregate an empty set of LIDs")
    if not bool(torch.isfinite(values).all()) or bool((values <= 0).any()):
        raise LIDInputError("LIDs must be positive and finite to aggregate")
    return values


def geometric_mean(lids: object) -> float:
    """exp(mean(ln LID)): the Fréchet mean of LIDs under the Fisher–Rao metric
    d(a, b) = |ln a - ln b| (Huang et al., ICLR 2024, sec. 4)."""
    return float(torch.exp(torch.log(_positive_lids(lids)).mean()))


def mean(lids: object) -> float:
    """Arithmetic mean of LIDs."""
    return float(_positive_lids(lids).mean())


def harmonic_mean(lids: object) -> float:
    """1 / mean(1 / LID); MacKay & Ghahramani's aggregate of Levina–Bickel MLEs and what
    ``skdim.id.MLE`` reports as ``dimension_`` (``comb="mle"``)."""
    return float(1.0 / (1.0 / _positive_lids(lids)).mean())


def median(lids: object) -> float:
    """Median of LIDs (mean of the two middle values for an even count)."""
    values = torch.sort(_positive_lids(lids)).values
    n = values.numel()
    mid = n // 2
    return float(values[mid]) if n % 2 else float((values[mid - 1] + values[mid]) / 2)


def fisher_rao_distance(a: float | Tensor, b: float | Tensor) -> float | Tensor:
    """|ln a - ln b|: the Fisher–Rao distance between the distance distributions of two
    points with LIDs a and b (Huang et al., ICLR 2024, sec. 4). Element-wise on tensors."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (torch.log(torch.as_tensor(a)) - torch.log(torch.as_tensor(b))).abs()
    if a <= 0 or b <= 0:
        raise LIDInputError(f"LIDs must be positive, found {a} and {b}")
    return abs(math.log(a) - math.log(b))
