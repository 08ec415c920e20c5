"""Exact k-nearest-neighbour search, and the input checks it shares with ``ldreg.lid``.

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

Usage::

    dists, indices = knn(x, k=64)              # self excluded by index
    dists = knn_distances(x, 64, reference=ref)  # differentiable w.r.t. x and ref
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from concurrent.futures import ThreadPoolExecutor
from typing import SupportsIndex

import torch
from torch import Tensor

from ldreg.errors import UserError

__all__ = ["DEFAULT_BLOCK_BYTES", "LIDInputError", "knn", "knn_distances"]

# Bytes one chunk of the distance computation may use; bounds peak memory regardless of N.
DEFAULT_BLOCK_BYTES = 256 * 2**20
# Query-reference pairs from which the CPU search uses the Numba selection kernel.
_KERNEL_MIN_SCORES = 2**20


class LIDInputError(UserError, ValueError):
    """Input an LID estimator cannot work with (bad shape, k out of range, NaN, ...).

    A ``ValueError`` for library users and a ``UserError`` for the worker, which then
    fails the job with ``code="invalid_input"`` instead of retrying it.
    """


# ----------------------------------------------------------------------------- input checks


def as_points(x: object, name: str) -> Tensor:
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


def check_k(value: object, minimum: int = 2) -> int:
    if isinstance(value, bool) or not isinstance(value, SupportsIndex):
        raise LIDInputError(f"k must be an integer, found {value!r}")
    try:
        k = operator.index(value)
    except TypeError as exc:
        raise LIDInputError(f"k must be an integer, found {value!r}") from exc
    if k < minimum:
        raise LIDInputError(f"k must be at least {minimum}, found k={k}")
    return k


def compute_dtype(*tensors: Tensor) -> torch.dtype:
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
    queries = as_points(x, "x")
    if reference is None:
        ref = queries
        self_offset = 0
    else:
        ref = as_points(reference, "reference")
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
    k = check_k(k, minimum=1)
    if k > available:
        raise LIDInputError(f"k={k} must be at most {available} ({what})")
    if chunk_size is not None and operator.index(chunk_size) < 1:
        raise LIDInputError(f"chunk_size must be positive, found {chunk_size}")

    dtype = compute_dtype(queries, ref)
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
