"""LID and dimensional-collapse diagnosis of any representation.

A diagnosis answers "has this representation collapsed, locally or globally?" for an
(N, D) embedding matrix, without training anything:

- **local**: the LID of every point from the distances to its k nearest neighbours
  (``ldreg.lid``), for each requested estimator and k, from ONE kNN pass at the largest
  k (the k smallest distances of a point are a prefix of its max-k distances) -- exact
  over all points, over a random sample of them, or approximate (faiss IVF-Flat);
  summarised by the geometric mean (the Fisher–Rao mean of LIDs, Huang et al. 2024,
  "LDReg", Sec. 4), mean, median, percentiles, a log-spaced histogram, a per-class
  breakdown, and the **local-collapse alarm**: the fraction of points whose LID lies
  more than one Fisher–Rao unit below the geometric mean (see ``collapse_fraction``);
- **global**: effective rank (RankMe), α-ReQ and PCA dimensions at 90/99 % variance
  (``ldreg.rank``).

Usage::

    report = diagnose_embeddings(x, k=[32, 512], estimators=["mle", "mom"], labels=y)
    report.summary()["lid_gmean"]["mle"]["32"]  # the headline number
    compare_reports(report_a, report_b)[("mle", 32)]["fisher_rao"]

This module imports torch only inside ``diagnose_embeddings``: the comparison maths
(``log_lid_wasserstein``, the summaries) is numpy-only so the API can use it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np

ReferenceMode = Literal["full", "sample", "approximate"]
Estimator = Literal["mle", "mom", "tle"]  # as ldreg.lid.Estimator (imported lazily there)

# A point raises the local-collapse alarm when ln LID_i < ln gmean - FISHER_RAO_THRESHOLD,
# i.e. LID_i < gmean / e. Why one Fisher-Rao unit (c = e): the Fisher-Rao distance between
# two LIDs is |ln a - ln b| (Huang et al. 2024, Sec. 4), so the threshold is scale-free
# (the same for a 10-d and a 300-d representation). And it is far outside the estimator's
# own noise: under a locally uniform density, -ln(r_i / r_k) for i < k are i.i.d.
# Exp(LID) (Levina & Bickel 2004), so ln of the MLE is -ln Gamma(k-1) + const, with
# standard deviation sqrt(trigamma(k-1)): 0.34 at k=10, 0.18 at k=32, 0.13 at k=64.
# The probability that noise alone puts a point below the threshold,
# P(ln G > digamma(k-1) + 1) with G ~ Gamma(k-1, 1), is 1.4 % at k=5, 0.13 % at k=8,
# 0.03 % at k=10, 3e-6 at k=16 and 2e-11 at k=32: an alarm fraction of a few percent
# at k >= 16 is a real population of locally collapsed points, not noise. (MoM: a Monte
# Carlo of uniform neighbourhoods gives 0.15-0.25 % at k=8 and <= 1e-5 from k=16.)
FISHER_RAO_THRESHOLD = 1.0

# Histogram bins shared by every report, so dashboards can overlay two jobs bin by bin:
# 20 log-spaced bins per decade (bin width 0.115 in ln LID, a tenth of the alarm
# threshold) from LID 0.1 to 10^4; values outside are counted in the end bins.
HIST_LOG10_RANGE = (-1.0, 4.0)
HIST_BINS_PER_DECADE = 20

PERCENTILES = (5, 25, 75, 95)

# Rows used for the global metrics; see ``diagnose_embeddings(global_max_points=)``.
GLOBAL_MAX_POINTS = 200_000


@dataclass(frozen=True)
class LIDSummary:
    """Summary statistics of one set of per-point LIDs.

    ``gmean``, ``mean``, ``median`` and the percentiles are over the points whose LID is
    finite and positive (``num_valid``); ``num_degenerate`` points (a zero or undefined
    LID, e.g. exact duplicates of their neighbours) are left out of those and counted as
    collapsed in ``collapse_fraction``, which is over all ``count`` points.
    """

    count: int
    num_valid: int
    num_degenerate: int
    gmean: float
    mean: float
    median: float
    percentiles: dict[str, float]
    collapse_fraction: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "num_valid": self.num_valid,
            "num_degenerate": self.num_degenerate,
            "gmean": self.gmean,
            "mean": self.mean,
            "median": self.median,
            **self.percentiles,
            "collapse_fraction": self.collapse_fraction,
        }


@dataclass(frozen=True)
class LIDHistogram:
    """Counts of LIDs in log-spaced bins (``edges`` has one more entry than ``counts``).

    ``counts`` sums to the number of finite, positive LIDs (values outside the edges land
    in the end bins); ``num_degenerate`` counts the rest, so the two add up to N.
    """

    edges: list[float]
    counts: list[int]
    num_degenerate: int

    def as_dict(self) -> dict[str, Any]:
        return {"edges": self.edges, "counts": self.counts, "num_degenerate": self.num_degenerate}


@dataclass
class DiagnosisReport:
    """Everything a diagnosis computed; ``summary()`` is the job summary of docs/api.md.

    ``lids[(estimator, k)]`` holds the per-point LIDs (float32, in input order);
    ``k_used[k]`` is the k actually used (clipped to the available neighbours).
    """

    num_points: int
    dim: int
    k: list[int]
    k_used: dict[int, int]
    estimators: list[str]
    reference_mode: str
    reference_size: int
    collapse_threshold: float
    lids: dict[tuple[str, int], np.ndarray]
    summaries: dict[tuple[str, int], LIDSummary]
    histograms: dict[tuple[str, int], LIDHistogram]
    per_class: dict[str, dict[tuple[str, int], LIDSummary]] | None
    effective_rank: float
    alpha_req: float
    pca_dims: dict[str, int]
    global_points: int
    seconds: dict[str, float] = field(default_factory=dict)

    def _by_estimator(self, value: Callable[[LIDSummary], Any], summaries=None) -> dict:
        summaries = self.summaries if summaries is None else summaries
        return {
            est: {str(k): value(summaries[(est, k)]) for k in self.k if (est, k) in summaries}
            for est in self.estimators
        }

    def summary(self) -> dict[str, Any]:
        """The job summary: ``{"lid_gmean": {"mle": {"32": 11.2}}, "effective_rank": ...}``.

        JSON-ready (keys of k are strings). Per-point LIDs and histograms are artifacts,
        not part of the summary.
        """
        out: dict[str, Any] = {
            "lid_gmean": self._by_estimator(lambda s: s.gmean),
            "lid_mean": self._by_estimator(lambda s: s.mean),
            "lid_median": self._by_estimator(lambda s: s.median),
            "lid_percentiles": self._by_estimator(lambda s: dict(s.percentiles)),
            "collapse_fraction": self._by_estimator(lambda s: s.collapse_fraction),
            "num_degenerate": self._by_estimator(lambda s: s.num_degenerate),
            "collapse_threshold": {
                "fisher_rao": self.collapse_threshold,
                "lid_ratio": math.exp(-self.collapse_threshold),
            },
            "effective_rank": self.effective_rank,
            "alpha_req": self.alpha_req,
            **{f"pca_dim_{p}": d for p, d in self.pca_dims.items()},
            "global_metrics_points": self.global_points,
            "num_points": self.num_points,
            "dim": self.dim,
            "k_used": {str(k): kk for k, kk in self.k_used.items()},
            "reference": {"mode": self.reference_mode, "size": self.reference_size},
        }
        if self.per_class is not None:
            out["per_class"] = {
                label: {
                    "count": next(iter(s.values())).count,
                    "lid_gmean": self._by_estimator(lambda s: s.gmean, s),
                    "collapse_fraction": self._by_estimator(lambda s: s.collapse_fraction, s),
                }
                for label, s in self.per_class.items()
            }
        return out

    def histogram_data(self) -> dict[str, Any]:
        """Histograms and full per-class summaries, for dashboards (``histogram.json``)."""
        out: dict[str, Any] = {
            "bins": "log10-spaced; values outside the edges are counted in the end bins",
            "histograms": self._by_estimator(lambda h: h.as_dict(), self.histograms),
            "summaries": self._by_estimator(lambda s: s.as_dict()),
        }
        if self.per_class is not None:
            out["per_class"] = {
                label: self._by_estimator(lambda s: s.as_dict(), s)
                for label, s in self.per_class.items()
            }
        return out

    def lid_arrays(self) -> dict[str, np.ndarray]:
        """Per-point LIDs keyed ``"{estimator}_k{k}"`` (for ``np.savez``)."""
        return {f"{est}_k{k}": v for (est, k), v in self.lids.items()}


# ---------------------------------------------------------------------------------------
# Statistics on per-point LIDs (numpy only).


def _valid_log_lids(lids: np.ndarray) -> np.ndarray:
    lids = np.asarray(lids, dtype=np.float64)
    valid = np.isfinite(lids) & (lids > 0)
    return np.log(lids[valid])


def collapse_fraction(
    lids: np.ndarray,
    *,
    threshold: float = FISHER_RAO_THRESHOLD,
    reference_gmean: float | None = None,
) -> float:
    """Fraction of points whose LID lies more than ``threshold`` Fisher–Rao units below
    the geometric mean: ``ln LID_i < ln gmean - threshold``.

    ``reference_gmean`` defaults to the geometric mean of ``lids`` themselves; the
    per-class breakdown passes the whole representation's, so a class's fraction is the
    share of its points that raise the representation's alarm. Degenerate points (LID
    zero or undefined) count as collapsed. See ``FISHER_RAO_THRESHOLD`` for why 1.
    """
    lids = np.asarray(lids, dtype=np.float64)
    if lids.size == 0:
        raise ValueError("collapse_fraction needs at least one LID")
    log_lids = _valid_log_lids(lids)
    degenerate = lids.size - log_lids.size
    if reference_gmean is not None:
        center = math.log(reference_gmean)
    elif log_lids.size:
        center = float(log_lids.mean())
    else:
        return 1.0
    low = int(np.count_nonzero(log_lids < center - threshold))
    return (low + degenerate) / lids.size


def summarize_lids(
    lids: np.ndarray,
    *,
    threshold: float = FISHER_RAO_THRESHOLD,
    reference_gmean: float | None = None,
) -> LIDSummary:
    """Geometric mean (headline), mean, median, p5/p25/p75/p95 and the collapse alarm
    (against ``reference_gmean``, by default these LIDs' own; see ``collapse_fraction``)."""
    lids = np.asarray(lids, dtype=np.float64)
    if lids.ndim != 1 or lids.size == 0:
        raise ValueError(f"LIDs must be a non-empty 1-D array, found shape {lids.shape}")
    log_lids = _valid_log_lids(lids)
    nan = float("nan")
    if log_lids.size == 0:
        pct = {f"p{p}": nan for p in PERCENTILES}
        return LIDSummary(lids.size, 0, lids.size, nan, nan, nan, pct, 1.0)
    valid = np.exp(log_lids)
    # Percentiles of ln LID map to percentiles of LID (exp is monotone), so one sort serves.
    q = np.percentile(log_lids, [50, *PERCENTILES])
    return LIDSummary(
        count=int(lids.size),
        num_valid=int(log_lids.size),
        num_degenerate=int(lids.size - log_lids.size),
        gmean=float(np.exp(log_lids.mean())),
        mean=float(valid.mean()),
        median=float(np.exp(q[0])),
        percentiles={f"p{p}": float(np.exp(v)) for p, v in zip(PERCENTILES, q[1:], strict=True)},
        collapse_fraction=collapse_fraction(
            lids, threshold=threshold, reference_gmean=reference_gmean
        ),
    )


def lid_histogram(lids: np.ndarray) -> LIDHistogram:
    """Counts in the shared log-spaced bins (``HIST_LOG10_RANGE``, 20 per decade)."""
    lids = np.asarray(lids, dtype=np.float64)
    log_lids = _valid_log_lids(lids) / math.log(10.0)
    lo, hi = HIST_LOG10_RANGE
    num_bins = round((hi - lo) * HIST_BINS_PER_DECADE)
    log_edges = np.linspace(lo, hi, num_bins + 1)
    counts, _ = np.histogram(np.clip(log_lids, lo, hi), bins=log_edges)
    return LIDHistogram(
        edges=[float(v) for v in 10.0**log_edges],
        counts=[int(c) for c in counts],
        num_degenerate=int(lids.size - log_lids.size),
    )


# ---------------------------------------------------------------------------------------
# Comparing representations (numpy only: the API's /v1/compare uses these).


def log_lid_wasserstein(lids_a: np.ndarray, lids_b: np.ndarray) -> float:
    """1-D Wasserstein-1 distance between the distributions of ln LID of two point sets.

    Why this distance: with ground metric |ln a - ln b| (the Fisher–Rao distance between
    two LIDs, Huang et al. 2024) it is the least average Fisher–Rao distance over which
    one set of LIDs must be moved to become the other, so it is in the same units as
    ``fisher_rao_distance`` of the geometric means and never below it (|E X - E Y| <=
    E|X - Y| for any coupling), with equality exactly when one ln-LID distribution is a
    shift of the other; it grows beyond it when the shapes differ (e.g. a collapsed tail).
    In one dimension W1 = ∫ |F_a(t) - F_b(t)| dt (Vallender 1973; Villani 2009, Ch. 2),
    computed exactly here from the two empirical CDFs. Degenerate LIDs are ignored.
    """
    a = np.sort(_valid_log_lids(lids_a))
    b = np.sort(_valid_log_lids(lids_b))
    if a.size == 0 or b.size == 0:
        raise ValueError("Wasserstein distance needs at least one valid LID on each side")
    grid = np.concatenate([a, b])
    grid.sort(kind="mergesort")
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / a.size
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / b.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(grid)))


def compare_reports(
    a: DiagnosisReport, b: DiagnosisReport
) -> dict[tuple[str, int], dict[str, float]]:
    """For each (estimator, k) both reports have: the Fisher–Rao distance of their
    geometric-mean LIDs (signed change ``ln(b/a)`` too) and the ln-LID Wasserstein-1."""
    from ldreg.lid import fisher_rao_distance

    out: dict[tuple[str, int], dict[str, float]] = {}
    for key in a.lids:
        if key not in b.lids:
            continue
        ga, gb = a.summaries[key].gmean, b.summaries[key].gmean
        out[key] = {
            "gmean_a": ga,
            "gmean_b": gb,
            "fisher_rao": float(fisher_rao_distance(ga, gb)),
            "log_ratio": math.log(gb / ga),
            "wasserstein_log_lid": log_lid_wasserstein(a.lids[key], b.lids[key]),
        }
    return out


# ---------------------------------------------------------------------------------------
# The diagnosis.


class ApproximateNeighbours:
    """k nearest neighbours of every point among the others, through faiss IVF-Flat.

    An inverted-file index (Jégou, Douze, Schmid, "Product quantization for nearest
    neighbor search", TPAMI 2011, Sec. 4; faiss ``IndexIVFFlat``): k-means cuts R^D into
    ``nlist`` cells, each point is stored in its cell, and a query scans only the
    ``nprobe`` cells whose centroids are nearest -- about nprobe/nlist of the data
    instead of all of it, with exact distances inside the scanned cells. A neighbour
    in an unscanned cell is missed and replaced by the next one found, so a distance
    can only come out too large. Defaults: nlist ≈ 2·sqrt(N) (cells of ~sqrt(N)/2
    points), nprobe = 16, k-means on 64 points per cell; a query whose scanned cells
    hold fewer than k + 1 points is answered exactly instead. CPU only (the faiss-cpu
    wheel); on a GPU worker "full" is the faster choice anyway.
    """

    def __init__(
        self,
        points: Any,
        k: int,
        *,
        nlist: int | None = None,
        nprobe: int = 16,
        seed: int = 0,
    ) -> None:
        try:
            import faiss
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise ImportError("reference mode 'approximate' needs faiss-cpu") from exc
        import torch

        self.points = points
        self.k = k
        x = np.ascontiguousarray(points.detach().cpu().numpy(), dtype=np.float32)
        self._x = x
        n, dim = x.shape
        # faiss wants >= 39 training points per centroid.
        self.nlist = nlist or max(1, min(round(2 * math.sqrt(n)), n // 39))
        self.nprobe = min(nprobe, self.nlist)
        quantizer = faiss.IndexFlatL2(dim)
        self.index = faiss.IndexIVFFlat(quantizer, dim, self.nlist, faiss.METRIC_L2)
        self.index.cp.seed = seed
        train_size = min(n, 64 * self.nlist)
        train_rows = np.sort(np.random.default_rng(seed).choice(n, train_size, replace=False))
        self.index.train(x[train_rows])
        self.index.add(x)
        self.index.nprobe = self.nprobe
        self._torch = torch

    def search(self, start: int, stop: int):
        """Distances (ascending) and indices of rows ``start:stop``'s k neighbours,
        each point's own row excluded by index."""
        torch = self._torch
        q = self._x[start:stop]
        sq, ids = self.index.search(q, self.k + 1)
        # The point itself (found in its own cell) and empty slots (-1: the scanned cells
        # held fewer than k + 1 points) sort last; the first k are the neighbours.
        own = np.arange(start, stop)[:, None]
        sq = np.where((ids == own) | (ids < 0), np.inf, sq)
        order = np.argsort(sq, axis=1, kind="stable")[:, : self.k]
        sq = np.take_along_axis(sq, order, axis=1)
        ids = np.take_along_axis(ids, order, axis=1)
        # IVF-Flat scans with direct differences (no |x|^2 - 2x.y expansion), so the
        # square root is accurate and duplicates come out exactly 0.
        dists = torch.from_numpy(np.sqrt(np.maximum(sq, 0.0)).astype(np.float32))
        indices = torch.from_numpy(ids.astype(np.int64))
        short = np.nonzero(~np.isfinite(sq).all(axis=1))[0]
        if short.size:
            from ldreg.lid import knn

            x_t = torch.from_numpy(self._x)
            for r in short:
                row = start + int(r)
                d, i = knn(x_t[row : row + 1], self.k, x_t, self_offset=row)
                dists[r], indices[r] = d[0], i[0]
        device = self.points.device
        return dists.to(device), indices.to(device)


def _progress_blocks(n: int, minimum: int = 2048, updates: int = 50) -> int:
    """Queries per k-NN call: about ``updates`` progress reports, never tiny calls (each
    call re-centres the reference set, an O(M·D) copy)."""
    return max(minimum, -(-n // updates))


def diagnose_embeddings(
    x: Any,
    *,
    k: Sequence[int],
    estimators: Iterable[str] = ("mle", "mom"),
    labels: Any | None = None,
    reference: ReferenceMode = "full",
    reference_size: int | None = None,
    seed: int = 0,
    collapse_threshold: float = FISHER_RAO_THRESHOLD,
    device: Any | None = None,
    global_max_points: int | None = GLOBAL_MAX_POINTS,
    nprobe: int = 16,
    progress: Callable[[float], None] | None = None,
) -> DiagnosisReport:
    """Diagnose local and global dimensionality of the (N, D) embeddings ``x``.

    Args:
        x: (N, D) array or tensor (float16/32/64; a numpy memmap is fine), computed in
            float32 (float64 stays float64).
        k: neighbourhood sizes; each is clipped to the neighbours available (N - 1, or
            ``reference_size - 1``), the clipped value is in ``report.k_used``.
        estimators: any of ``"mle"``, ``"mom"``, ``"tle"`` (``ldreg.lid``, LDReg variants).
        labels: optional (N,) class labels for the per-class breakdown.
        reference: ``"full"``: each point's neighbours are the N - 1 other points, exact.
            ``"approximate"``: the N - 1 other points through an inverted-file index
            (``ApproximateNeighbours``, faiss IVF-Flat): the same scale as "full", but a
            missed true neighbour is replaced by a farther one, which biases LIDs low by
            an amount that depends on ``nprobe`` and the data (none on clustered
            embeddings, up to 0.2 in ln LID at nprobe=16 on unclustered ones; measured
            in benchmarks/README.md).
            ``"sample"``: they come from ``reference_size`` points drawn at random
            (``seed``) without replacement; a point of the sample excludes itself.
            **Bias of "sample"**: the sample is N/M times sparser, so the k-th
            neighbour in it sits near the (k·N/M)-th neighbour of the full set: the LIDs
            describe the data at the scale of k·N/M full-set neighbours (the estimator's
            variance stays that of k). Real embeddings' LID depends on scale, so this
            moves the estimates either way (benchmarks/README.md: far up on clustered
            data, down on unclustered data), and a collapse confined to small scales
            can be missed; prefer ``"full"`` (on a GPU worker even N = 10^6 is
            minutes) or ``"approximate"``.
        collapse_threshold: the local-collapse alarm's distance below the geometric
            mean in Fisher–Rao units (``FISHER_RAO_THRESHOLD``; 1 means LID < gmean / e).
        device: where the k-NN search runs (default: ``x``'s device, CPU for numpy).
        nprobe: "approximate" only: index cells scanned per query (more: slower, closer
            to exact; see ``ApproximateNeighbours``).
        global_max_points: the global metrics use at most this many rows (a seeded
            random subset; None: all). They depend only on the normalised eigenspectrum
            of the covariance, which n >> D random rows estimate with relative error
            O(sqrt(D / n)) (Vershynin 2012, "How close is the sample covariance matrix
            to the actual covariance matrix?"): about 5 % at D = 512, n = 200k, while
            each metric's pass over 10^6 rows costs minutes on a small CPU.
        progress: called with the fraction of points whose neighbours are done, in
            [0, 1], non-decreasing, last call 1.0.

    Cost: one exact k-NN pass at max(k) in chunks (``ldreg.knn.knn``: memory bounded
    independently of N); the per-point LIDs of every (estimator, k) are computed from
    each chunk's distances before the chunk is dropped, so memory beyond ``x`` is
    O(N · #estimators · #k) for the results. The global metrics (``ldreg.rank``) each
    accumulate a D × D Gram matrix in chunks.

    Raises:
        ValueError (``ldreg.lid.LIDInputError``): bad shape, NaN/inf, fewer than 3
        points, an unknown estimator or reference mode, labels of the wrong length.
    """
    from ldreg.lid import LIDInputError

    timings: dict[str, float] = {}
    points = _as_float_tensor(x, device, LIDInputError)
    n, dim = points.shape
    estimators, ks, label_array = _check_options(
        n, estimators, k, labels, collapse_threshold, LIDInputError
    )
    ref_idx, n_ref = _reference_rows(reference, reference_size, n, seed, LIDInputError)
    # One neighbourhood size for every point: a sampled point has n_ref - 1 others.
    k_used = {kk: min(kk, n_ref - 1) for kk in ks}
    if min(k_used.values()) < 2:
        raise LIDInputError(f"the reference set of {n_ref} points leaves fewer than 2 neighbours")
    keys = [(est, kk) for est in estimators for kk in ks]
    lids = {key: np.empty(n, dtype=np.float32) for key in keys}

    t0 = time.perf_counter()
    if progress is not None:
        progress(0.0)
    done = 0
    blocks = _neighbour_blocks(
        points, reference, ref_idx, max(k_used.values()), nprobe=nprobe, seed=seed
    )
    for rows, dists, indices, ref in blocks:
        for key, values in _block_lids(keys, k_used, dists, indices, ref).items():
            lids[key][rows] = values
        done += dists.shape[0]
        if progress is not None:
            progress(min(1.0, done / n))
    timings["knn_lid"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    summaries = {key: summarize_lids(v, threshold=collapse_threshold) for key, v in lids.items()}
    histograms = {key: lid_histogram(v) for key, v in lids.items()}
    per_class = (
        None
        if label_array is None
        else _per_class_summaries(lids, label_array, summaries, collapse_threshold)
    )
    timings["summaries"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    effective, alpha, dims = _global_metrics(points, global_max_points, seed)
    timings["rank"] = time.perf_counter() - t0
    if progress is not None:
        progress(1.0)
    return DiagnosisReport(
        num_points=n,
        dim=dim,
        k=ks,
        k_used=k_used,
        estimators=estimators,
        reference_mode=reference,
        reference_size=n_ref,
        collapse_threshold=float(collapse_threshold),
        lids=lids,
        summaries=summaries,
        histograms=histograms,
        per_class=per_class,
        effective_rank=effective,
        alpha_req=alpha,
        pca_dims=dims,
        global_points=min(n, global_max_points or n),
        seconds=timings,
    )


def _check_options(
    n: int,
    estimators: Iterable[str],
    k: Sequence[int],
    labels: Any | None,
    collapse_threshold: float,
    error: type[Exception],
) -> tuple[list[str], list[int], np.ndarray | None]:
    """The estimators (unique, in order), the sorted unique k, and the labels as an
    array; every bad option refused with ``error``."""
    if n < 3:
        raise error(f"a diagnosis needs at least 3 points, found {n}")
    names = list(dict.fromkeys(estimators))
    unknown = [e for e in names if e not in ("mle", "mom", "tle")]
    if unknown or not names:
        raise error(f"unknown estimators {unknown}; use 'mle', 'mom' or 'tle'")
    ks = sorted({int(v) for v in k})
    if not ks or ks[0] < 2:
        raise error(f"every k must be at least 2, found {list(k)}")
    if not collapse_threshold > 0:
        raise error(f"collapse_threshold must be positive, found {collapse_threshold}")
    label_array = None
    if labels is not None:
        label_array = np.asarray(labels).reshape(-1)
        if label_array.shape[0] != n:
            raise error(f"labels must have one entry per point ({n}), found {label_array.shape[0]}")
    return names, ks, label_array


def _reference_rows(
    reference: str, reference_size: int | None, n: int, seed: int, error: type[Exception]
) -> tuple[np.ndarray | None, int]:
    """The rows of the reference set (None: all of them) and its size."""
    if reference in ("full", "approximate"):
        return None, n
    if reference != "sample":
        raise error(f"unknown reference mode {reference!r}; use 'full', 'sample' or 'approximate'")
    if reference_size is None or reference_size < 3:
        raise error(f"sample reference needs reference_size >= 3, found {reference_size}")
    n_ref = min(int(reference_size), n)
    # Sorted indices keep the reference gather sequential (a memmap reads in order).
    return np.sort(np.random.default_rng(seed).choice(n, size=n_ref, replace=False)), n_ref


def _neighbour_blocks(
    points: Any,
    reference: str,
    ref_idx: np.ndarray | None,
    k_max: int,
    *,
    nprobe: int,
    seed: int,
) -> Iterator[tuple[np.ndarray | slice, Any, Any, Any]]:
    """Every point's ``k_max`` nearest neighbours, block by block:
    ``(rows, distances, indices into ref, ref)``. Each point excludes itself by index
    when it is part of the reference."""
    import torch

    from ldreg.lid import knn

    n = points.shape[0]
    step = _progress_blocks(n)
    with torch.no_grad():
        if reference == "approximate":
            searcher = ApproximateNeighbours(points, k_max, nprobe=nprobe, seed=seed)
            for s in range(0, n, step):
                e = min(s + step, n)
                dists, indices = searcher.search(s, e)
                yield slice(s, e), dists, indices, points
            return
        if ref_idx is None:
            for s in range(0, n, step):
                e = min(s + step, n)
                # The queries are rows s..e of the reference: each excludes itself.
                dists, indices = knn(points[s:e], k_max, points, self_offset=s)
                yield slice(s, e), dists, indices, points
            return
        ref = points.index_select(0, torch.as_tensor(ref_idx, device=points.device))
        # Sampled points are the reference itself: their own row is excluded by index.
        for s in range(0, ref.shape[0], step):
            e = min(s + step, ref.shape[0])
            dists, indices = knn(ref[s:e], k_max, ref, self_offset=s)
            yield ref_idx[s:e], dists, indices, ref
        outside = np.setdiff1d(np.arange(n), ref_idx, assume_unique=True)
        for s in range(0, outside.size, step):
            rows = outside[s : s + step]
            queries = points.index_select(0, torch.as_tensor(rows, device=points.device))
            dists, indices = knn(queries, k_max, ref)
            yield rows, dists, indices, ref


def _block_lids(
    keys: list[tuple[str, int]], k_used: dict[int, int], dists: Any, indices: Any, ref: Any
) -> dict[tuple[str, int], np.ndarray]:
    """The LIDs of one block's points for every (estimator, k), from its distances."""
    from ldreg.lid import lid_from_distances, lid_tle_from_knn

    out = {}
    for est, kk in keys:
        kd = dists[:, : k_used[kk]]
        if est == "tle":
            values = lid_tle_from_knn(kd, indices[:, : k_used[kk]], ref)
        else:
            values = lid_from_distances(kd, cast(Estimator, est))
        out[(est, kk)] = values.cpu().numpy()
    return out


def _per_class_summaries(
    lids: dict[tuple[str, int], np.ndarray],
    label_array: np.ndarray,
    summaries: dict[tuple[str, int], LIDSummary],
    threshold: float,
) -> dict[str, dict[tuple[str, int], LIDSummary]]:
    """Each class's summaries. The alarm is the whole representation's: a class's
    collapsed fraction is the share of its points below the overall gmean / e."""
    per_class = {}
    for label in np.unique(label_array):
        mask = label_array == label
        per_class[str(label.item() if hasattr(label, "item") else label)] = {
            key: summarize_lids(v[mask], threshold=threshold, reference_gmean=summaries[key].gmean)
            for key, v in lids.items()
        }
    return per_class


def _global_metrics(
    points: Any, global_max_points: int | None, seed: int
) -> tuple[float, float, dict[str, int]]:
    """Effective rank, α-ReQ and the PCA dimensions for 90 / 99 % of the variance, on
    at most ``global_max_points`` seeded random rows."""
    import torch

    from ldreg.rank import alpha_req, effective_rank, pca_dims

    n = points.shape[0]
    rows_used = points
    if global_max_points is not None and n > global_max_points:
        rng = np.random.default_rng(seed + 1)
        rows = np.sort(rng.choice(n, size=global_max_points, replace=False))
        rows_used = points.index_select(0, torch.as_tensor(rows, device=points.device))
    return (
        float(effective_rank(rows_used)),
        float(alpha_req(rows_used)),
        {"90": pca_dims(rows_used, 0.9), "99": pca_dims(rows_used, 0.99)},
    )


def _as_float_tensor(x: Any, device: Any, error: type[Exception]):
    """(N, D) float32 tensor (float64 kept) on ``device``; NaN/inf refused, checked in
    row chunks so a huge memmap never needs an N × D boolean mask."""
    import torch

    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        ):
            raise error(f"embeddings must be numbers, found dtype {arr.dtype}")
        if arr.ndim != 2:
            raise error(f"embeddings must be a 2-D (N, D) array, found shape {arr.shape}")
        dtype = np.float64 if arr.dtype == np.float64 else np.float32
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=dtype))
    if t.ndim != 2:
        raise error(f"embeddings must be a 2-D (N, D) array, found shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise error(f"embeddings are empty: shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise error(f"embeddings must be real numbers, found dtype {t.dtype}")
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    if device is not None:
        t = t.to(device)
    rows = max(1, (64 * 2**20) // max(1, t.shape[1]))
    for s in range(0, t.shape[0], rows):
        bad = ~torch.isfinite(t[s : s + rows])
        if bool(bad.any()):
            row = s + int(bad.any(dim=1).nonzero()[0, 0])
            raise error(
                f"embeddings contain NaN or inf (first at row {row}); remove or fix those rows"
            )
    return t.contiguous()
