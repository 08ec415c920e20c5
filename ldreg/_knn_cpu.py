"""Numba kernels behind ``ldreg.knn.knn`` on the CPU.

``fold_block`` folds a block of dot products into per-query candidate lists kept as
4-ary max-heaps; ``pair_distances`` recomputes the candidates' distances directly. Each
call handles a slice of the queries and releases the GIL, so ``ldreg.knn`` runs one
call per thread of its pool.

A separate module so that Numba can cache the compiled kernels on disk (functions
defined inside another function are recompiled in every process). Imported lazily by
``ldreg.knn``; importing it imports Numba.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# A row of scores is screened as up to this many strips (see _fold_rows).
_STRIPS = 16
# References screened together in the transposed fold (see _fold_columns).
_TILE = 8


@numba.njit(inline="always", nogil=True)
def _replace_worst(heap_v, heap_i, h, value, index):
    # heap_v[h] is a 4-ary max-heap (the children of p are 4p+1 .. 4p+4): overwrite the
    # root, the worst candidate, and sift it down. Against a binary heap: half the depth,
    # and the largest of four children is picked with selects, not branches.
    width = heap_v.shape[1]
    pos = 0
    while True:
        first = 4 * pos + 1
        if first >= width:
            break
        child, largest = first, heap_v[h, first]
        if first + 3 < width:
            v = heap_v[h, first + 1]
            child = first + 1 if v > largest else child
            largest = v if v > largest else largest
            v = heap_v[h, first + 2]
            child = first + 2 if v > largest else child
            largest = v if v > largest else largest
            v = heap_v[h, first + 3]
            child = first + 3 if v > largest else child
            largest = v if v > largest else largest
        else:
            for c in range(first + 1, width):
                if heap_v[h, c] > largest:
                    child, largest = c, heap_v[h, c]
        if largest <= value:
            break
        heap_v[h, pos] = largest
        heap_i[h, pos] = heap_i[h, child]
        pos = child
    heap_v[h, pos] = value
    heap_i[h, pos] = index


@numba.njit(inline="always", nogil=True)
def _score(norm, dot):
    # |y|^2 - 2 x.y with one rounding (dot + dot is exact), the same in every loop below
    # and in ldreg.knn's torch fallback (norm + (-2) * dot).
    return norm - (dot + dot)


@numba.njit(nogil=True)
def _strip_minima(row, norms, span, strip_min):
    # The row as strips of `span` columns; strip_min[s] is the smallest score at position
    # s of any strip. A branch-free loop over slices (indices that are visibly
    # non-negative, so Numba's wrap-around check does not stop LLVM from vectorising it).
    for s in range(span):
        strip_min[s] = math.inf
    for base in range(0, row.shape[0], span):
        strip = row[base : base + span]
        strip_norms = norms[base : base + span]
        for s in range(strip.shape[0]):
            value = _score(strip_norms[s], strip[s])
            strip_min[s] = value if value < strip_min[s] else strip_min[s]


@numba.njit(nogil=True, cache=True)
def _fold_rows(dots, col0, norms, heap_v, heap_i, row0, lo, hi):
    n = dots.shape[1]
    width = heap_v.shape[1]
    # Screening a row against a settled heap: _STRIPS strips.
    screen_span = (n + _STRIPS - 1) // _STRIPS
    # Filling an empty heap: fewer strips, at least 4 * width positions each (below).
    fill_strips = max(1, min(_STRIPS, n // (4 * width)))
    fill_span = (n + fill_strips - 1) // fill_strips
    strip_min = np.empty(max(screen_span, fill_span), dtype=heap_v.dtype)
    for q in range(lo, hi):
        h = row0 + q
        row = dots[q]
        # A score enters the heap only if it beats the worst entry, the root.
        bound = heap_v[h, 0]
        if bound < math.inf:
            span = screen_span
            _strip_minima(row, norms, span, strip_min)
        else:
            # A heap still holding +inf (its first block) would take every score of the
            # row. But the strip minima are the scores of `span` distinct columns, so
            # their width-th smallest bounds the width-th smallest score of the row from
            # above: no score above it can end up in the heap. How many pass, for scores
            # in random order: if a fraction p of the row is at or below the bound,
            # 1 - (1 - p)^strips = width / span of the strip minima are, so p * n is
            # about width * (1 + width / (2 span)), at most 1.125 * width with span >=
            # 4 * width -- against width * (1 + ln(n / width)) insertions without it.
            span = fill_span
            _strip_minima(row, norms, span, strip_min)
            if span >= width:
                bound = np.partition(strip_min[:span], width - 1)[width - 1]
        # Only strip positions whose minimum passes are looked at again (a few percent
        # once the heaps have settled).
        for s in range(span):
            if strip_min[s] <= bound and strip_min[s] < heap_v[h, 0]:
                for col in range(s, n, span):
                    value = _score(norms[col], row[col])
                    if value <= bound and value < heap_v[h, 0]:
                        _replace_worst(heap_v, heap_i, h, value, col0 + col)


@numba.njit(nogil=True, cache=True)
def _fold_columns(dots, col0, norms, heap_v, heap_i, row0, lo, hi):
    n_refs = dots.shape[0]
    width = hi - lo
    worst = np.empty(width, dtype=heap_v.dtype)
    for t in range(width):
        worst[t] = heap_v[row0 + lo + t, 0]
    tile_min = np.empty(width, dtype=heap_v.dtype)
    for r0 in range(0, n_refs, _TILE):
        r1 = min(r0 + _TILE, n_refs)
        # Queries are columns: each row of the tile is contiguous, and the element-wise
        # minimum over the tile's rows vectorises; only queries whose minimum beats
        # their worst candidate are looked at again.
        for t in range(width):
            tile_min[t] = math.inf
        for r in range(r0, r1):
            norm = norms[r]
            row = dots[r, lo:hi]
            for t in range(width):
                value = _score(norm, row[t])
                tile_min[t] = value if value < tile_min[t] else tile_min[t]
        for t in range(width):
            if tile_min[t] < worst[t]:
                h = row0 + lo + t
                for r in range(r0, r1):
                    value = _score(norms[r], dots[r, lo + t])
                    if value < worst[t]:
                        _replace_worst(heap_v, heap_i, h, value, col0 + r)
                        worst[t] = heap_v[h, 0]


@numba.njit(nogil=True, cache=True)
def fold_block(dots, col0, norms, heap_v, heap_i, row0, lo, hi, transposed):
    """Fold queries lo..hi-1 of a block of dot products into heaps row0 + lo .. row0 + hi - 1.

    Inputs are centred. The score of query x against reference y is |y|^2 - 2 x.y,
    which ranks x's neighbours as ||x - y||^2 = |x|^2 + |y|^2 - 2 x.y does.
    Not transposed: ``dots[q, c] = x_q . y_{col0 + c}`` and ``norms[c] = |y_{col0 + c}|^2``.
    Transposed (a block computed with the roles swapped): ``dots[r, q] = y_{col0 + r} . x_q``
    and ``norms[r] = |y_{col0 + r}|^2``. A dot product of -inf scores +inf: never a
    candidate (how a query's own row is excluded).

    A heap is touched only when a score beats its current worst entry; a vectorised
    screen (an element-wise minimum over strips of a row, or over a few rows) finds
    those scores, so once the heaps have settled a block costs about one SIMD minimum
    per score.
    """
    if transposed:
        _fold_columns(dots, col0, norms, heap_v, heap_i, row0, lo, hi)
    else:
        _fold_rows(dots, col0, norms, heap_v, heap_i, row0, lo, hi)


@numba.njit(inline="always", nogil=True)
def _squared_distances4(x, y0, y1, y2, y3):
    # Four rows at once: the loads of four rows are in flight together (the loop is
    # bound by memory latency, one row at a time).
    s0 = s1 = s2 = s3 = 0.0
    for d in range(x.shape[0]):
        xd = np.float64(x[d])
        e0 = xd - np.float64(y0[d])
        e1 = xd - np.float64(y1[d])
        e2 = xd - np.float64(y2[d])
        e3 = xd - np.float64(y3[d])
        s0 += e0 * e0
        s1 += e1 * e1
        s2 += e2 * e2
        s3 += e3 * e3
    return s0, s1, s2, s3


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def pair_distances(queries, ref, indices, out, lo, hi, self_offset):
    """out[i, j] = ||queries[i] - ref[indices[i, j]]|| for rows lo..hi-1, from differences.

    ``out`` is float64. Each coordinate is widened to float64 before subtracting, so for
    float32 points each difference is exact or off by one float64 rounding, and the sum
    of squares carries ~D * 2^-53 relative error: candidates are ranked by their true
    distances, and a duplicate's distance is exactly 0. (``reassoc`` and ``contract``
    only let each sum be split into SIMD lanes of fused multiply-adds.)
    Where ``indices[i, j] == self_offset + i`` (the query's own row, ``self_offset``
    >= 0), the distance is +inf.
    """
    width = indices.shape[1]
    for i in range(lo, hi):
        x = queries[i]
        for j in range(0, width, 4):
            # The last group repeats the last column rather than running a remainder loop.
            j1, j2, j3 = min(j + 1, width - 1), min(j + 2, width - 1), min(j + 3, width - 1)
            s0, s1, s2, s3 = _squared_distances4(
                x, ref[indices[i, j]], ref[indices[i, j1]], ref[indices[i, j2]], ref[indices[i, j3]]
            )
            out[i, j], out[i, j1], out[i, j2], out[i, j3] = (
                math.sqrt(s0),
                math.sqrt(s1),
                math.sqrt(s2),
                math.sqrt(s3),
            )
        if self_offset >= 0:
            for j in range(width):
                if indices[i, j] == self_offset + i:
                    out[i, j] = math.inf
