"""Exact k-nearest-neighbour search, and the input checks it shares with ``ldreg.lid``.

Exact k-NN search in bounded memory (``knn``). The data are centred on the reference
mean and the dot products x.y are computed block by block, one GEMM per block into one
reused buffer (never an N x N matrix, never a full sort); the score |y|^2 - 2 x.y ranks
x's neighbours as ||x - y||^2 does. Each block is folded into running lists of
k + margin candidates per query (Numba kernels on the CPU, ``topk`` on CUDA). When the
reference is ``x`` itself only the upper triangle of blocks is multiplied, each block
serving both orientations, and the diagonal is covered by smaller blocks so that little
of the GEMM is spent twice. The candidates' distances are then recomputed directly as
||x - y|| (on the CPU in float64: no cancellation, duplicates come out exactly 0) and
re-ranked, so rounding in the expansion changes nothing unless it pushes a true
neighbour past all k // 4 (at least 8) spare candidates; candidates at exactly the same
distance are ordered by index. Distances are differentiable with respect to
``x`` and ``reference`` through a custom backward that never materialises an (N, k, D)
tensor outside a chunk.

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
    # A NaN or inf entry makes its column's sum NaN or inf: one cheap pass, and only if
    # a sum is not finite (or overflowed) are the entries checked one by one.
    if not bool(torch.isfinite(x.sum(dim=0)).all()):
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
    queries = queries.contiguous()
    ref = queries if symmetric else ref.contiguous()
    available = n_ref - (self_offset is not None)
    # Rounding in the expansion can swap near-ties; a few spare candidates, re-ranked by
    # directly computed distances, make the final top-k exact.
    n_candidates = min(k + max(8, k // 4), available)
    # Centring on the reference mean removes most of the expansion's cancellation.
    center = ref.mean(dim=0, keepdim=True)
    ref_c = ref - center
    norms = torch.linalg.vector_norm(ref_c, dim=1).square_()
    candidates = _CandidateLists(
        n_queries, n_candidates, ref.dtype, ref.device, n_scores=n_queries * n_ref
    )
    with candidates:
        if symmetric:
            # Queries = reference: block (i, j) of the dot products also serves,
            # transposed, as block (j, i), so only the upper triangle is multiplied.
            if chunk_size is not None:
                side, diagonal = chunk_size, (chunk_size + 1) // 2
            elif candidates.uses_kernels:
                # Each switch between the GEMM (torch's OpenMP threads, which spin a
                # while after it) and the folds (the pool's threads) costs CPU, so the
                # blocks are as large as block_bytes allows; the diagonal is covered in
                # quarter-side blocks.
                side = max(n_candidates, math.isqrt(block_bytes // elem))
                diagonal = (side + 3) // 4
            else:
                # torch's merge needs room for temporaries of a block's size.
                side = max(n_candidates, math.isqrt(block_bytes // (4 * elem)))
                diagonal = (side + 1) // 2
            buffer = ref_c.new_empty(min(side, n_ref) ** 2)
            for i0, i1, j0, j1 in _upper_triangle(n_ref, side, diagonal):
                dots = _matmul_into(buffer, ref_c[i0:i1], ref_c[j0:j1])
                if j0 == i0:
                    # A score of +inf: a point is not its own neighbour.
                    dots.diagonal().fill_(-math.inf)
                    candidates.fold(i0, dots, j0, norms[j0:j1])
                else:
                    candidates.fold(i0, dots, j0, norms[j0:j1], row_norms=norms[i0:i1])
        else:
            if chunk_size is None:
                chunk_size = max(64, min(4096, block_bytes // (elem * n_ref)))
            block = min(n_ref, max(n_candidates, block_bytes // (elem * chunk_size)))
            buffer = ref_c.new_empty(min(chunk_size, n_queries) * block)
            for start in range(0, n_queries, chunk_size):
                q_c = queries[start : start + chunk_size] - center
                rows = torch.arange(q_c.shape[0], device=q_c.device)
                for b0 in range(0, n_ref, block):
                    dots = _matmul_into(buffer, q_c, ref_c[b0 : b0 + block])
                    if self_offset is not None:
                        cols = self_offset + start + rows - b0
                        inside = (cols >= 0) & (cols < dots.shape[1])
                        dots[rows[inside], cols[inside]] = -math.inf
                    candidates.fold(start, dots, b0, norms[b0 : b0 + block])
        del ref_c, buffer
        best_i = candidates.indices
        out_d = torch.empty(n_queries, k, dtype=queries.dtype, device=queries.device)
        out_i = torch.empty(n_queries, k, dtype=torch.long, device=queries.device)
        step = 16384  # rows re-ranked at a time: their sorts' temporaries stay ~50 MB
        for start in range(0, n_queries, step):
            # Sorted by index first, so that the stable sort by distance breaks exact ties
            # (duplicates) by index, whatever order the candidates were found in.
            chosen = best_i[start : start + step].sort(dim=1).values
            exact = candidates.exact_distances(
                queries, ref, start, chosen, self_offset, block_bytes
            )
            exact, order = exact.sort(dim=1, stable=True)
            out_d[start : start + step] = exact[:, :k]
            out_i[start : start + step] = chosen.gather(1, order[:, :k])
    return out_d, out_i


def _upper_triangle(n: int, side: int, diagonal: int) -> list[tuple[int, int, int, int]]:
    """Blocks (i0, i1, j0, j1) with j0 >= i0 that cover the upper triangle of an n x n
    matrix once, diagonal blocks first: they fill every candidate list, so the folds that
    follow mostly compare and skip. Off the diagonal the blocks are side x side; a
    diagonal block of that side is halved until its parts are at most ``diagonal`` wide
    (each halving leaves one off-diagonal block between the halves), so the redundant
    lower halves of the diagonal blocks cost about n * diagonal / 2 products."""
    on_diagonal: list[tuple[int, int, int, int]] = []
    above: list[tuple[int, int, int, int]] = []

    def split(start: int, stop: int) -> None:
        if stop - start <= diagonal:
            on_diagonal.append((start, stop, start, stop))
            return
        mid = start + (stop - start + 1) // 2
        split(start, mid)
        split(mid, stop)
        above.append((start, mid, mid, stop))

    for i0 in range(0, n, side):
        i1 = min(i0 + side, n)
        split(i0, i1)
        above += [(i0, i1, j0, min(j0 + side, n)) for j0 in range(i1, n, side)]
    return on_diagonal + above


def _matmul_into(buffer: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """a @ b.T written into the front of ``buffer``: one allocation for the whole search
    instead of a fresh (page-faulted) block per GEMM."""
    out = buffer[: a.shape[0] * b.shape[0]].view(a.shape[0], b.shape[0])
    return torch.mm(a, b.T, out=out)


class _CandidateLists:
    """Running lists of the ``width`` smallest scores (and their reference rows) per query.

    The score of query x against reference y is |y|^2 - 2 x.y (centred data): it ranks
    x's neighbours as ||x - y||^2 = |x|^2 + |y|^2 - 2 x.y does. Blocks arrive as dot
    products; a block computed once serves both orientations in the symmetric search.

    On the CPU Numba kernels (``ldreg._knn_cpu``) keep each list as a max-heap, screen a
    block with vectorised comparisons and touch a heap only when a score beats its
    current worst entry, split over ``torch.get_num_threads()`` threads (the kernels
    release the GIL); they also recompute the candidates' distances. ``torch.topk``
    over every score would cost more than the GEMM that produced them. Elsewhere
    (CUDA), or without Numba, torch ops do the same (:func:`_merge_candidates`,
    :func:`_pair_distances`). Use as a context manager (it owns the CPU thread pool).
    """

    def __init__(
        self, n_queries: int, width: int, dtype: torch.dtype, device: torch.device, n_scores: int
    ):
        self.values = torch.full((n_queries, width), math.inf, dtype=dtype, device=device)
        self.indices = torch.zeros(n_queries, width, dtype=torch.long, device=device)
        # Small searches (a training batch) are not worth a thread pool or loading Numba.
        on_cpu = self.values.device.type == "cpu"
        self._kernels = _cpu_kernels() if on_cpu and n_scores >= _KERNEL_MIN_SCORES else None
        self.uses_kernels = self._kernels is not None
        self._pool: ThreadPoolExecutor | None = None
        self._workers = max(1, torch.get_num_threads())

    def __enter__(self) -> _CandidateLists:
        if self._kernels is not None:
            # One pool per search, never a global one: a pool inherited across fork()
            # (Celery prefork workers) would deadlock.
            self._pool = ThreadPoolExecutor(max_workers=self._workers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def fold(
        self,
        row0: int,
        dots: Tensor,
        col0: int,
        col_norms: Tensor,
        row_norms: Tensor | None = None,
    ) -> None:
        """Fold ``dots[q, c]`` = x_{row0 + q} . y_{col0 + c} (centred): query row0 + q
        scores ``col_norms[c] - 2 dots[q, c]`` against reference col0 + c. With
        ``row_norms`` (a block of the symmetric search), also transposed: query col0 + c
        scores ``row_norms[q] - 2 dots[q, c]`` against reference row0 + q."""
        if self._pool is None:
            scores = torch.add(col_norms, dots, alpha=-2.0)
            _merge_candidates(self.values, self.indices, row0, scores, col0, transposed=False)
            if row_norms is not None:
                torch.add(row_norms.unsqueeze(1), dots, alpha=-2.0, out=scores)
                _merge_candidates(self.values, self.indices, col0, scores, row0, transposed=True)
            return
        assert self._kernels is not None
        fold_block = self._kernels[0]
        block, values, indices = dots.numpy(), self.values.numpy(), self.indices.numpy()
        # Both orientations touch disjoint lists (rows row0.. and col0..), so their parts
        # share one round of the pool.
        jobs = [
            (block, col0, col_norms.numpy(), values, indices, row0, lo, hi, False)
            for lo, hi in self._parts(dots.shape[0])
        ]
        if row_norms is not None:
            jobs += [
                (block, row0, row_norms.numpy(), values, indices, col0, lo, hi, True)
                for lo, hi in self._parts(dots.shape[1])
            ]
        self._map(fold_block, jobs)

    def exact_distances(
        self,
        queries: Tensor,
        ref: Tensor,
        start: int,
        chosen: Tensor,
        self_offset: int | None,
        block_bytes: int,
    ) -> Tensor:
        """||queries[start + i] - ref[chosen[i, j]]||, computed from differences (exact
        zeros for duplicates); +inf where ``chosen`` is the query's own row."""
        rows = queries[start : start + chosen.shape[0]]
        if self._pool is None:
            exact = _pair_distances(rows, ref, chosen, block_bytes)
            if self_offset is not None:
                own = self_offset + start + torch.arange(len(chosen), device=ref.device)
                exact = exact.masked_fill(chosen == own.unsqueeze(1), math.inf)
            return exact
        assert self._kernels is not None
        pair_distances = self._kernels[1]
        out = torch.empty(chosen.shape, dtype=torch.float64)
        first_own = -1 if self_offset is None else self_offset + start
        arrays = (rows.numpy(), ref.numpy(), chosen.numpy(), out.numpy())
        jobs = [(*arrays, lo, hi, first_own) for lo, hi in self._parts(len(rows))]
        self._map(pair_distances, jobs)
        return out

    def _parts(self, n: int) -> list[tuple[int, int]]:
        # A few parts per thread, taken in turn: a thread slowed by other processes on
        # the machine does not hold the others up at the end of each round.
        n_parts = min(4 * self._workers, n)
        return list(itertools.pairwise(n * p // n_parts for p in range(n_parts + 1)))

    def _map(self, kernel, jobs: list[tuple]) -> None:
        assert self._pool is not None
        for future in [self._pool.submit(kernel, *job) for job in jobs]:
            future.result()


@functools.cache
def _cpu_kernels():
    """``(fold_block, pair_distances)`` from ``ldreg._knn_cpu`` (Numba kernels, compiled
    once and cached on disk), or None where Numba is missing."""
    try:
        from ldreg._knn_cpu import fold_block, pair_distances
    except ImportError:  # pragma: no cover - numba is a dependency; torch ops still work
        return None
    return fold_block, pair_distances


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
