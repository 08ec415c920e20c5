"""Numba kernel behind ``ldreg.knn.knn`` on the CPU: folding a block of scores into
per-query candidate lists kept as max-heaps.

A separate module so that Numba can cache the compiled kernel on disk (functions
defined inside another function are recompiled in every process). Imported lazily by
``ldreg.lid``; importing it imports Numba.
"""

from __future__ import annotations

import numba


@numba.njit(inline="always", nogil=True)
def _replace_worst(heap_v, heap_i, q, value, index):
    # heap_v[q] is a max-heap: overwrite the root (the worst candidate) and sift down.
    width = heap_v.shape[1]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= width:
            break
        if child + 1 < width and heap_v[q, child + 1] > heap_v[q, child]:
            child += 1
        if heap_v[q, child] <= value:
            break
        heap_v[q, pos] = heap_v[q, child]
        heap_i[q, pos] = heap_i[q, child]
        pos = child
    heap_v[q, pos] = value
    heap_i[q, pos] = index


@numba.njit(nogil=True, cache=True)
def merge_block(scores, col0, heap_v, heap_i, row0, lo, hi, transposed, ref_norms, query_norms):
    """Fold queries lo..hi-1 of a score block into heaps row0 + lo .. row0 + hi - 1.

    Not transposed: ``scores[q, c]`` is query q against reference col0 + c.
    Transposed: ``scores[r, q] + ref_norms[r] - query_norms[q]`` is query q against
    reference col0 + r (the block was computed with the roles swapped).
    A heap is touched only when a score beats its current worst entry, so after the
    first block this is about one comparison per score.
    """
    if transposed:
        # Queries are columns: walk the block row by row (contiguous memory).
        worst = heap_v[row0 + lo : row0 + hi, 0].copy()
        for r in range(scores.shape[0]):
            for t in range(hi - lo):
                value = scores[r, lo + t] + ref_norms[r] - query_norms[lo + t]
                if value < worst[t]:
                    _replace_worst(heap_v, heap_i, row0 + lo + t, value, col0 + r)
                    worst[t] = heap_v[row0 + lo + t, 0]
    else:
        for q in range(lo, hi):
            worst = heap_v[row0 + q, 0]
            for c in range(scores.shape[1]):
                value = scores[q, c]
                if value < worst:
                    _replace_worst(heap_v, heap_i, row0 + q, value, col0 + c)
                    worst = heap_v[row0 + q, 0]
