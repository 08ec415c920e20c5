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

Exact k-NN search in bounded memory (``knn``): the score matrix |y|^2 - 2 x.y of the
centred data is computed block by block with one GEMM per block (never an N x N
matrix, never a full sort); each block is folded into running lists of k + margin
candidates per query (a Numba heap kernel on the CPU, ``topk`` on CUDA); when the
reference is ``x`` itself only the upper triangle of blocks is multiplied, each block
serving both orientations. The candidates' distances are then recomputed directly as
||x - y|| (no cancellation: duplicates come out exactly 0) and re-ranked, so rounding
in the expansion cannot change the result. Distances are differentiable with respect
to ``x`` and ``reference`` through a custom backward that never materialises an
(N, k, D) tensor outside a chunk.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, SupportsIndex

import torch
from torch import Tensor

from ldreg.errors import UserError

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
# Bytes one chunk of the distance computation may use; bounds peak memory regardless of N.
DEFAULT_BLOCK_BYTES = 256 * 2**20
# Query-reference pairs from which the CPU search uses the Numba selection kernel.
_KERNEL_MIN_SCORES = 2**20

Estimator = Literal["mle", "mom", "tle"]


class LIDInputError(UserError, ValueError):
    """Input an LID estimator cannot work with (bad shape, k out of range, NaN, ...).

    A ``ValueError`` for library users and a ``UserError`` for the worker, which then
    fails the job with ``code="invalid_input"`` instead of retrying it.
    """


# ----------------------------------------------------------------------------- validation


def _as_points(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise LIDInputError(f"{name} must be an (N, D) array of points: {exc}") from exc
    if x.ndim != 2:
        raise LIDInputError(
            f"{name} must be a 2-D (N, D) tensor of points, found shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise LIDInputError(f"{name} is empty: shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise LIDInputError(f"{name} must hold real numbers, found dtype {x.dtype}")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise LIDInputError(f"{name} contains NaN or inf in {bad} of {x.numel()} entries")
    return x


def _check_k(value: object, minimum: int = 2) -> int:
    if isinstance(value, bool) or not isinstance(value, SupportsIndex):
        raise LIDInputError(f"k must be an integer, found {value!r}")
    try:
        k = operator.index(value)
    except TypeError as exc:
        raise LIDInputError(f"k must be an integer, found {value!r}") from exc
    if k < minimum:
        raise LIDInputError(f"k must be at least {minimum}, found k={k}")
    return k


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # float64 stays float64; half precision and float32 are computed in float32.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------- k-NN search


def knn(
    x: object,
    k: int,
    reference: object | None = None,
    *,
    self_offset: int | None = None,
    chunk_size: int | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours: ``(distances, indices)``, both (N, k), ascending.

    Args:
        x: (N, D) query points.
        k: number of neighbours, 1 <= k <= available reference points.
        reference: (M, D) points to take neighbours from; default ``x`` itself.
        self_offset: ``x[i]`` is ``reference[self_offset + i]`` and is excluded from its
            own neighbours by index. Implied (0) when ``reference`` is None; give it when
            the reference is a gathered batch that contains ``x`` (as LDReg does).
        chunk_size: queries per block of the score matrix (its side when ``reference``
            is None); default sized from ``block_bytes``.
        block_bytes: memory one block of scores (and one chunk of gathered neighbours)
            may use. Peak memory beyond the inputs: one centred copy of the reference,
            about ``block_bytes``, and the (N, k + margin) candidate lists.

    Distances are float32 (float64 if an input is float64) and differentiable with
    respect to ``x`` and ``reference``; indices point into ``reference``.
    """
    queries = _as_points(x, "x")
    if reference is None:
        ref = queries
        self_offset = 0
    else:
        ref = _as_points(reference, "reference")
        if ref.shape[1] != queries.shape[1]:
            raise LIDInputError(
                f"x and reference must have the same dimension, found {queries.shape[1]} "
                f"and {ref.shape[1]}"
            )
        if ref.device != queries.device:
            raise LIDInputError(
                f"x and reference must be on the same device, found {queries.device} "
                f"and {ref.device}"
            )
    n_queries, n_ref = queries.shape[0], ref.shape[0]
    if self_offset is not None:
        self_offset = operator.index(self_offset)
        if self_offset < 0 or self_offset + n_queries > n_ref:
            raise LIDInputError(
                f"self_offset={self_offset} places the {n_queries} query rows outside the "
                f"{n_ref} reference rows"
            )
        available, what = n_ref - 1, f"{n_ref} points, each point's own row excluded"
    else:
        available, what = n_ref, f"{n_ref} reference points"
    k = _check_k(k, minimum=1)
    if k > available:
        raise LIDInputError(f"k={k} must be at most {available} ({what})")
    if chunk_size is not None and operator.index(chunk_size) < 1:
        raise LIDInputError(f"chunk_size must be positive, found {chunk_size}")

    dtype = _compute_dtype(queries, ref)
    queries = queries.to(dtype)
    ref = queries if reference is None else ref.to(dtype)
    with torch.no_grad():
        dists, indices = _search(
            queries.detach(),
            ref.detach(),
            k,
            self_offset,
            chunk_size,
            block_bytes,
            symmetric=reference is None,
        )
    if torch.is_grad_enabled() and (queries.requires_grad or ref.requires_grad):
        dists = _NeighbourDistances.apply(queries, ref, indices, dists, block_bytes)
    return dists, indices


def knn_distances(
    x: object,
    k: int,
    reference: object | None = None,
    *,
    self_offset: int | None = None,
    chunk_size: int | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Tensor:
    """(N, k) ascending distances to the k nearest neighbours; see :func:`knn`."""
    dists, _ = knn(
        x, k, reference, self_offset=self_offset, chunk_size=chunk_size, block_bytes=block_bytes
    )
    return dists


def _search(
    queries: Tensor,
    ref: Tensor,
    k: int,
    self_offset: int | None,
    chunk_size: int | None,
    block_bytes: int,
    symmetric: bool,
) -> tuple[Tensor, Tensor]:
    n_queries, n_ref = queries.shape[0], ref.shape[0]
    elem = queries.element_size()
    available = n_ref - (self_offset is not None)
    # Rounding in the expansion can swap near-ties; a few spare candidates, re-ranked by
    # directly computed distances, make the final top-k exact.
    n_candidates = min(k + max(8, k // 4), available)
    center = ref.mean(dim=0, keepdim=True)
    ref_aug = _augmented_reference(ref, center)
    candidates = _CandidateLists(
        n_queries, n_candidates, ref.dtype, ref.device, n_scores=n_queries * n_ref
    )
    with candidates:
        if symmetric:
            # Queries = reference: block (i, j) of the score matrix also serves, transposed,
            # as block (j, i), so only the upper triangle is multiplied (half the GEMM).
            # Diagonal blocks go first: they seed every candidate list, so the transposed
            # merges that follow mostly compare and skip.
            side = chunk_size or max(n_candidates, math.isqrt(block_bytes // (4 * elem)))
            sq_norms = ref_aug[:, -1].contiguous()
            starts = range(0, n_ref, side)
            pairs = [(i0, i0) for i0 in starts] + [(i, j) for i in starts for j in starts if j > i]
            for i0, j0 in pairs:
                i1, j1 = min(i0 + side, n_ref), min(j0 + side, n_ref)
                scores = _augmented_queries(queries[i0:i1], center) @ ref_aug[j0:j1].T
                if j0 == i0:
                    scores.diagonal().fill_(math.inf)
                candidates.merge(i0, scores, j0)
                if j0 != i0:
                    candidates.merge_transposed(j0, scores, i0, sq_norms[i0:i1], sq_norms[j0:j1])
        else:
            if chunk_size is None:
                chunk_size = max(64, min(4096, block_bytes // (elem * n_ref)))
            block = min(n_ref, max(n_candidates, block_bytes // (elem * chunk_size)))
            for start in range(0, n_queries, chunk_size):
                q_aug = _augmented_queries(queries[start : start + chunk_size], center)
                rows = torch.arange(q_aug.shape[0], device=q_aug.device)
                for b0 in range(0, n_ref, block):
                    scores = q_aug @ ref_aug[b0 : b0 + block].T
                    if self_offset is not None:
                        cols = self_offset + start + rows - b0
                        inside = (cols >= 0) & (cols < scores.shape[1])
                        scores[rows[inside], cols[inside]] = math.inf
                    candidates.merge(start, scores, b0)
    best_i = candidates.indices
    del ref_aug, candidates

    out_d = torch.empty(n_queries, k, dtype=queries.dtype, device=queries.device)
    out_i = torch.empty(n_queries, k, dtype=torch.long, device=queries.device)
    step = 65536
    for start in range(0, n_queries, step):
        chosen = best_i[start : start + step]
        exact = _pair_distances(queries[start : start + step], ref, chosen, block_bytes)
        if self_offset is not None:
            own = self_offset + torch.arange(start, start + len(chosen), device=ref.device)
            exact = exact.masked_fill(chosen == own.unsqueeze(1), math.inf)
        exact, order = exact.sort(dim=1)
        out_d[start : start + step] = exact[:, :k]
        out_i[start : start + step] = chosen.gather(1, order[:, :k])
    return out_d, out_i


def _augmented_reference(ref: Tensor, center: Tensor) -> Tensor:
    """[-2 (y - c), |y - c|^2] per row: one GEMM with [x - c, 1] then gives
    |y - c|^2 - 2 (x - c).(y - c) = ||x - y||^2 - |x - c|^2, which ranks x's neighbours
    exactly as the squared distance does, with no extra pass over the scores. Centring
    on the reference mean removes most of the expansion's cancellation."""
    n, dim = ref.shape
    out = torch.empty(n, dim + 1, dtype=ref.dtype, device=ref.device)
    for s in range(0, n, 8192):
        centred = ref[s : s + 8192] - center
        out[s : s + 8192, dim] = centred.square().sum(dim=1)
        out[s : s + 8192, :dim] = centred.mul_(-2.0)
    return out


def _augmented_queries(q: Tensor, center: Tensor) -> Tensor:
    out = torch.empty(q.shape[0], q.shape[1] + 1, dtype=q.dtype, device=q.device)
    out[:, :-1] = q - center
    out[:, -1] = 1.0
    return out


class _CandidateLists:
    """Running lists of the ``width`` smallest scores (and their reference rows) per query.

    On the CPU a Numba kernel (``ldreg._knn_cpu``) keeps each list as a max-heap and
    scans a score block once, touching a list only when a score beats its current worst
    -- about one comparison per score, split over ``torch.get_num_threads()`` threads
    (the kernel releases the GIL). ``torch.topk`` over every score would cost more than
    the GEMM that produced them. Elsewhere (CUDA), or without Numba,
    :func:`_merge_candidates` does it with torch ops.
    Use as a context manager (it owns the CPU thread pool).
    """

    def __init__(
        self, n_queries: int, width: int, dtype: torch.dtype, device: torch.device, n_scores: int
    ):
        self.values = torch.full((n_queries, width), math.inf, dtype=dtype, device=device)
        self.indices = torch.zeros(n_queries, width, dtype=torch.long, device=device)
        # Small searches (a training batch) are not worth a thread pool or loading Numba.
        on_cpu = self.values.device.type == "cpu"
        self._kernel = _cpu_merge_kernel() if on_cpu and n_scores >= _KERNEL_MIN_SCORES else None
        self._pool: ThreadPoolExecutor | None = None
        self._workers = max(1, torch.get_num_threads())
        self._empty = torch.empty(0, dtype=dtype).numpy() if self._kernel else None

    def __enter__(self) -> _CandidateLists:
        if self._kernel is not None:
            # One pool per search, never a global one: a pool inherited across fork()
            # (Celery prefork workers) would deadlock.
            self._pool = ThreadPoolExecutor(max_workers=self._workers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def merge(self, row0: int, scores: Tensor, col0: int) -> None:
        """Fold (queries, references) scores of query rows row0.. and reference rows col0.."""
        if self._pool is None:
            _merge_candidates(self.values, self.indices, row0, scores, col0, transposed=False)
        else:
            self._run(row0, scores, col0, False, self._empty, self._empty)

    def merge_transposed(
        self, row0: int, scores: Tensor, col0: int, ref_norms: Tensor, query_norms: Tensor
    ) -> None:
        """Fold a block computed with the roles swapped: entry (r, q) is
        |y_q|^2 - 2 y_r.y_q (centred), so query q's score against reference r,
        |y_r|^2 - 2 y_r.y_q, is entry + ref_norms[r] - query_norms[q]."""
        if self._pool is None:
            scores.add_(ref_norms.unsqueeze(1)).sub_(query_norms.unsqueeze(0))
            _merge_candidates(self.values, self.indices, row0, scores, col0, transposed=True)
        else:
            self._run(row0, scores, col0, True, ref_norms.numpy(), query_norms.numpy())

    def _run(self, row0, scores, col0, transposed, ref_norms, query_norms) -> None:
        assert self._pool is not None and self._kernel is not None
        n_rows = scores.shape[1] if transposed else scores.shape[0]
        n_parts = min(self._workers, n_rows)
        bounds = [n_rows * p // n_parts for p in range(n_parts + 1)]
        block, values, indices = scores.numpy(), self.values.numpy(), self.indices.numpy()
        jobs = [
            self._pool.submit(
                self._kernel,
                block,
                col0,
                values,
                indices,
                row0,
                lo,
                hi,
                transposed,
                ref_norms,
                query_norms,
            )
            for lo, hi in itertools.pairwise(bounds)
        ]
        for job in jobs:
            job.result()


@functools.cache
def _cpu_merge_kernel():
    """``ldreg._knn_cpu.merge_block`` (a Numba kernel, compiled once and cached on disk),
    or None where Numba is missing."""
    try:
        from ldreg._knn_cpu import merge_block
    except ImportError:  # pragma: no cover - numba is a dependency; torch ops still work
        return None
    return merge_block


def _merge_candidates(
    best_v: Tensor, best_i: Tensor, row0: int, scores: Tensor, col0: int, *, transposed: bool
) -> None:
    """Fold a block of scores into the running candidates of query rows row0.. .

    ``scores`` is (queries, references) -- or (references, queries) with ``transposed``
    -- and reference c of the block is reference row col0 + c. ``topk`` over every
    score costs more than the GEMM that produced them, so once every query holds a full
    candidate list only the scores below its current worst candidate (typically a
    handful per query) are extracted and merged.
    """
    width = best_v.shape[1]
    n_rows = scores.shape[1] if transposed else scores.shape[0]
    rows = slice(row0, row0 + n_rows)
    threshold = best_v[rows].amax(dim=1)
    if bool(torch.isinf(threshold).any()):
        block = scores.T.contiguous() if transposed else scores
        v, i = block.topk(min(width, block.shape[1]), dim=1, largest=False, sorted=False)
    else:
        if transposed:
            # Transposing the boolean mask (a quarter of the bytes) keeps the hits grouped
            # by query without a sort.
            hits = (scores < threshold.unsqueeze(0)).T.contiguous()
            row, col = hits.nonzero(as_tuple=True)
            values = scores[col, row]
        else:
            row, col = (scores < threshold.unsqueeze(1)).nonzero(as_tuple=True)
            values = scores[row, col]
        if row.numel() == 0:
            return
        per_row = torch.bincount(row, minlength=n_rows)
        slot = torch.arange(row.numel(), device=row.device) - (per_row.cumsum(0) - per_row)[row]
        most = int(per_row.max())
        v = torch.full((n_rows, most), math.inf, dtype=scores.dtype, device=scores.device)
        i = torch.zeros((n_rows, most), dtype=torch.long, device=scores.device)
        v[row, slot] = values
        i[row, slot] = col
    v = torch.cat([best_v[rows], v], dim=1)
    i = torch.cat([best_i[rows], i + col0], dim=1)
    v, keep = v.topk(width, dim=1, largest=False, sorted=False)
    best_v[rows] = v
    best_i[rows] = i.gather(1, keep)


def _rows_per_chunk(width: int, dim: int, elem: int, block_bytes: int) -> int:
    return max(1, block_bytes // max(1, width * dim * elem))


def _pair_distances(q: Tensor, ref: Tensor, indices: Tensor, block_bytes: int) -> Tensor:
    """||q_i - ref[indices[i, j]]|| computed from differences (exact zeros for duplicates)."""
    n, width = indices.shape
    dim = q.shape[1]
    out = torch.empty(n, width, dtype=q.dtype, device=q.device)
    # Memory-bound: one reused buffer avoids allocating (and page-faulting) a fresh
    # (rows, width, D) tensor per step.
    step = min(n, _rows_per_chunk(width, dim, q.element_size(), block_bytes))
    buffer = torch.empty(step * width, dim, dtype=q.dtype, device=q.device)
    for s in range(0, n, step):
        flat = indices[s : s + step].reshape(-1)
        gathered = buffer[: flat.numel()]
        torch.index_select(ref, 0, flat, out=gathered)
        diff = gathered.view(-1, width, dim)
        diff.sub_(q[s : s + step].unsqueeze(1))
        torch.linalg.vector_norm(diff, dim=2, out=out[s : s + step])
    return out


class _NeighbourDistances(torch.autograd.Function):
    """d_ij = ||x_i - ref[idx_ij]|| with a chunked backward (no (N, k, D) tensor kept).

    d d_ij / d x_i = (x_i - y_j) / d_ij; at d_ij = 0 (duplicates) we use the
    subgradient 0.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, ref: Tensor, indices: Tensor, dists: Tensor, block_bytes: int
    ) -> Tensor:
        ctx.save_for_backward(x, ref, indices, dists)
        ctx.block_bytes = block_bytes
        return dists.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        x, ref, indices, dists = ctx.saved_tensors
        weight = torch.where(dists > 0, grad / torch.where(dists > 0, dists, 1.0), 0.0)
        grad_x = grad_ref = None
        step = _rows_per_chunk(indices.shape[1], x.shape[1], x.element_size(), ctx.block_bytes)
        if ctx.needs_input_grad[0]:
            grad_x = x * weight.sum(dim=1, keepdim=True)
            for s in range(0, x.shape[0], step):
                neighbours = ref[indices[s : s + step]]
                grad_x[s : s + step] -= torch.bmm(
                    weight[s : s + step].unsqueeze(1), neighbours
                ).squeeze(1)
        if ctx.needs_input_grad[1]:
            per_ref = torch.zeros(ref.shape[0], dtype=ref.dtype, device=ref.device)
            per_ref.index_add_(0, indices.reshape(-1), weight.reshape(-1))
            grad_ref = ref * per_ref.unsqueeze(1)
            for s in range(0, x.shape[0], step):
                w = weight[s : s + step].unsqueeze(2)
                contrib = (w * x[s : s + step].unsqueeze(1)).reshape(-1, x.shape[1])
                grad_ref.index_add_(0, indices[s : s + step].reshape(-1), contrib, alpha=-1.0)
        return grad_x, grad_ref, None, None, None


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
    _check_k(k)
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
    _check_k(k)
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
    ref = _as_points(reference, "reference")
    dtype = _compute_dtype(ref, d)
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
    _check_k(k)
    points = _as_points(x, "x")
    ref = points if reference is None else _as_points(reference, "reference")
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
