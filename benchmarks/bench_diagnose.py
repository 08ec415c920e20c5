"""Diagnosis at scale: exact LID of 100k x 512 against the matmul floor; 1M x 512 sampled.

Two measurements, each against a baseline run in the same process:

``exact``  (issue 5 target: <= 3x the floor, peak memory < 2 GiB)
    ``diagnose_embeddings`` of N x D embeddings at k = 64 (MLE and MoM, every summary,
    the global rank metrics), exact full reference, versus ONE pass of the same-size
    matrix product ``x @ x.T`` computed in row chunks into a reused buffer: the
    arithmetic any exact k-NN must do at least once (the compute floor). Peak memory is
    the process's maximum resident set size read right after the diagnosis (the floor
    runs after it, so it cannot inflate the number).

``large``  (target: < 10 minutes)
    1M x 512 with a sampled reference of M points, and with the approximate (faiss
    IVF-Flat) reference; the error of each against exact LIDs on a random subset of S
    points (their exact k nearest neighbours among all N).

``ann_error``
    20k x 512 without cluster structure (an inverted file's hard case): sampled and
    approximate (nprobe 16/64/128) against exact, on every point.

Data: 100 clusters in R^D, each a 16-dimensional Gaussian (random linear map) plus
small isotropic noise -- embeddings with a low local dimension, like real ones.

Run: ``.venv/bin/python benchmarks/bench_diagnose.py exact`` (or ``large``, ``all``);
``--n`` / ``--dim`` / ``--reference-size`` scale it down for a quick look. Prints one
JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldreg.diagnose import diagnose_embeddings, log_lid_wasserstein
from ldreg.lid import knn_distances, lid_from_distances


def clustered_embeddings(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """``n`` points: 100 clusters, each 16-d Gaussian in R^dim, plus noise (float32)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(100, dim)).astype(np.float32)
    maps = rng.normal(scale=1.0 / math.sqrt(16), size=(100, 16, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    step = 65536
    for s in range(0, n, step):
        e = min(s + step, n)
        c = rng.integers(0, 100, size=e - s)
        z = rng.normal(size=(e - s, 16)).astype(np.float32)
        block = rng.normal(scale=0.02, size=(e - s, dim)).astype(np.float32)
        # One matrix product per cluster (BLAS), not a per-point gathered einsum.
        for cluster in np.unique(c):
            rows = np.nonzero(c == cluster)[0]
            block[rows] += centers[cluster] + z[rows] @ maps[cluster]
        out[s:e] = block
    return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def matmul_floor_seconds(x: torch.Tensor, chunk: int = 1024) -> float:
    """One pass of x @ x.T in row chunks (the result discarded, buffer reused)."""
    buf = torch.empty(chunk, x.shape[0], dtype=x.dtype)
    t0 = time.perf_counter()
    for s in range(0, x.shape[0], chunk):
        q = x[s : s + chunk]
        torch.mm(q, x.T, out=buf[: q.shape[0]])
    return time.perf_counter() - t0


def bench_exact(n: int, dim: int, k: int) -> dict:
    x = torch.from_numpy(clustered_embeddings(n, dim))
    rss_before = peak_rss_gib()
    t0 = time.perf_counter()
    report = diagnose_embeddings(x, k=[k], estimators=["mle", "mom"])
    diag_s = time.perf_counter() - t0
    peak = peak_rss_gib()
    floor_s = matmul_floor_seconds(x)
    return {
        "bench": "exact",
        "n": n,
        "dim": dim,
        "k": k,
        "torch_threads": torch.get_num_threads(),
        "diagnose_s": round(diag_s, 1),
        "diagnose_parts_s": {p: round(v, 1) for p, v in report.seconds.items()},
        "matmul_floor_s": round(floor_s, 1),
        "ratio": round(diag_s / floor_s, 2),
        "peak_rss_gib": round(peak, 2),
        "rss_before_gib": round(rss_before, 2),
        "lid_gmean_mle": round(report.summaries[("mle", k)].gmean, 2),
    }


def unstructured_embeddings(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """One 24-d Gaussian through a random linear map into R^dim, plus noise: no
    cluster structure for an inverted-file index to exploit (its hard case)."""
    rng = np.random.default_rng(seed)
    lift = rng.normal(size=(24, dim)).astype(np.float32) / 5
    noise = rng.normal(scale=0.02, size=(n, dim)).astype(np.float32)
    return rng.normal(size=(n, 24)).astype(np.float32) @ lift + noise


def lid_errors(approx: np.ndarray, exact: np.ndarray) -> dict:
    log_err = np.log(approx) - np.log(exact)
    return {
        "gmean": round(float(np.exp(np.log(approx).mean())), 3),
        "gmean_exact": round(float(np.exp(np.log(exact).mean())), 3),
        "fisher_rao_gmeans": round(float(abs(log_err.mean())), 4),
        "median_abs_log_err": round(float(np.median(np.abs(log_err))), 4),
        "wasserstein_log_lid": round(log_lid_wasserstein(approx, exact), 4),
    }


def bench_large(
    n: int, dim: int, k: int, reference_size: int, subset: int, nprobe: int, modes: list[str]
) -> list:
    t0 = time.perf_counter()
    x = torch.from_numpy(clustered_embeddings(n, dim))
    gen_s = time.perf_counter() - t0
    # Exact LIDs of a random subset: k + 1 neighbours among all N, the first being the
    # point itself (distances are recomputed directly, so its own is exactly 0).
    rows = np.sort(np.random.default_rng(1).choice(n, size=subset, replace=False))
    t0 = time.perf_counter()
    d = knn_distances(x[torch.as_tensor(rows)], k + 1, x)
    assert bool((d[:, 0] == 0).all())
    exact = lid_from_distances(d[:, 1:], "mle").numpy()
    exact_s = time.perf_counter() - t0
    results = []
    options = {"sample": {"reference_size": reference_size}, "approximate": {"nprobe": nprobe}}
    for mode in modes:
        kwargs = options[mode]
        t0 = time.perf_counter()
        report = diagnose_embeddings(x, k=[k], estimators=["mle"], reference=mode, **kwargs)
        diag_s = time.perf_counter() - t0
        results.append(
            {
                "bench": "large",
                "n": n,
                "dim": dim,
                "k": k,
                "reference": mode,
                **kwargs,
                "generate_s": round(gen_s, 1),
                "diagnose_s": round(diag_s, 1),
                "diagnose_parts_s": {p: round(v, 1) for p, v in report.seconds.items()},
                "exact_subset": subset,
                "exact_subset_s": round(exact_s, 1),
                "subset_errors": lid_errors(report.lids[("mle", k)][rows], exact),
                "peak_rss_gib": round(peak_rss_gib(), 2),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def bench_ann_error(n: int, dim: int, k: int) -> None:
    """Error of sampled and approximate references against exact, all N points, on
    data without cluster structure (the inverted file's hard case)."""
    x = torch.from_numpy(unstructured_embeddings(n, dim))
    t0 = time.perf_counter()
    exact = diagnose_embeddings(x, k=[k], estimators=["mle"])
    exact_s = time.perf_counter() - t0
    for kwargs in (
        {"reference": "sample", "reference_size": n // 10},
        {"reference": "approximate", "nprobe": 16},
        {"reference": "approximate", "nprobe": 64},
        {"reference": "approximate", "nprobe": 128},
    ):
        t0 = time.perf_counter()
        report = diagnose_embeddings(x, k=[k], estimators=["mle"], **kwargs)
        result = {
            "bench": "ann_error",
            "n": n,
            "dim": dim,
            "k": k,
            **kwargs,
            "diagnose_s": round(time.perf_counter() - t0, 1),
            "exact_s": round(exact_s, 1),
            **lid_errors(report.lids[("mle", k)], exact.lids[("mle", k)]),
        }
        print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["exact", "large", "ann_error", "all"])
    parser.add_argument("--n", type=int, default=None, help="points (default 100k / 1M)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--reference-size", type=int, default=5_000)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--modes", default="sample,approximate", help="large: which references")
    parser.add_argument("--subset", type=int, default=2000)
    args = parser.parse_args()
    if args.part in ("exact", "all"):
        print(json.dumps(bench_exact(args.n or 100_000, args.dim, args.k)), flush=True)
    if args.part in ("large", "all"):
        bench_large(
            args.n or 1_000_000,
            args.dim,
            args.k,
            args.reference_size,
            args.subset,
            args.nprobe,
            args.modes.split(","),
        )
    if args.part in ("ann_error", "all"):
        bench_ann_error(args.n or 20_000, args.dim, args.k)


if __name__ == "__main__":
    main()
