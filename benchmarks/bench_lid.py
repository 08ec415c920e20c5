"""Exact MLE LID: ldreg.lid vs scikit-dimension vs a full-sort cdist (the official code).

Each measurement runs in a fresh subprocess so its peak resident memory
(``ru_maxrss``) belongs to that method alone; the data are generated identically in
each (same seed) and the per-point LIDs are written back and compared in this
process. All three use the Levina–Bickel convention (k-1 numerator), which is what
``skdim.id.MLE().fit(X, n_neighbors=k).dimension_pw_`` computes, so the LIDs must
agree to 1e-4 relative.

    .venv/bin/python benchmarks/bench_lid.py            # N = 20k, 50k, 100k; D = 512; k = 64
    .venv/bin/python benchmarks/bench_lid.py --quick    # small smoke run (seconds)

Targets (issue 2): >= 2x faster than scikit-dimension at N = 50k, peak memory
< 2 GiB at N = 100k, identical LIDs (1e-4 relative). Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LATENT_DIM = 32


def make_points(n: int, dim: int, seed: int):
    """A 32-dimensional Gaussian, linearly embedded in ``dim`` dimensions, plus noise:
    low local dimension like a real representation, float32."""
    import numpy as np

    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, LATENT_DIM), dtype=np.float32)
    mixing = rng.standard_normal((LATENT_DIM, dim), dtype=np.float32) / np.sqrt(LATENT_DIM)
    noise = 0.05 * rng.standard_normal((n, dim), dtype=np.float32)
    return (latent @ mixing + noise).astype(np.float32)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(method: str, n: int, dim: int, k: int, seed: int, out: Path) -> dict:
    """Runs inside the subprocess: one method on one data set."""
    import numpy as np

    if method == "skdim":
        import skdim  # imported before the timed region: numba compiles on import
    import torch

    points = make_points(n, dim, seed)
    baseline = peak_rss_mib()
    start = time.perf_counter()
    if method == "ldreg":
        from ldreg.lid import lid_mle

        lids = lid_mle(torch.from_numpy(points), k, variant="levina_bickel").numpy()
    elif method == "skdim":
        import skdim

        lids = skdim.id.MLE().fit(points, n_neighbors=k).dimension_pw_
    elif method == "fullsort":
        # The official code's approach (lid.py: cdist, full sort, drop position 0).
        x = torch.from_numpy(points)
        a, _ = torch.sort(torch.cdist(x, x, p=2), dim=1)
        lids = ((k - 1) / torch.log(a[:, k : k + 1] / a[:, 1:k]).sum(dim=1)).numpy()
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    np.save(out, np.asarray(lids, dtype=np.float64))
    return {
        "seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "data_rss_mib": baseline,
        # The machine may be shared: the 1-minute load average when the run ended.
        "load_avg": os.getloadavg()[0],
    }


def run_one(method: str, n: int, dim: int, k: int, seed: int, workdir: Path, timeout: float):
    out = workdir / f"{method}_{n}.npy"
    cmd = [sys.executable, __file__, "--measure", method, "--n", str(n), "--dim", str(dim)]
    cmd += ["--k", str(k), "--seed", str(seed), "--out", str(out)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"skipped": f"exceeded {timeout:.0f} s"}
    if done.returncode != 0:
        return {"skipped": f"failed: {done.stderr.strip().splitlines()[-1:]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["lids"] = str(out)
    return result


def max_relative_difference(a_path: str, b_path: str) -> float:
    import numpy as np

    a, b = np.load(a_path), np.load(b_path)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 2k, 5k; D = 128")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skdim-timeout", type=float, default=600.0)
    parser.add_argument("--fullsort-max-gib", type=float, default=8.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(args.measure, args.n, args.dim, args.k, args.seed, args.out)))
        return
    if args.quick:
        args.sizes, args.dim = [2_000, 5_000], 128

    import torch

    print(f"D={args.dim} k={args.k} torch threads={torch.get_num_threads()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for n in args.sizes:
            row: dict = {"n": n}
            row["ldreg"] = run_one("ldreg", n, args.dim, args.k, args.seed, workdir, 3600)
            row["skdim"] = run_one(
                "skdim", n, args.dim, args.k, args.seed, workdir, args.skdim_timeout
            )
            # cdist output + sorted values (float32) + sort indices (int64).
            fullsort_gib = n * n * 16 / 2**30
            if fullsort_gib <= args.fullsort_max_gib:
                row["fullsort"] = run_one("fullsort", n, args.dim, args.k, args.seed, workdir, 3600)
            else:
                row["fullsort"] = {"skipped": f"needs ~{fullsort_gib:.0f} GiB"}
            ours = row["ldreg"]
            for other in ("skdim", "fullsort"):
                res = row[other]
                if "seconds" in res and "seconds" in ours:
                    res["speedup_of_ldreg"] = res["seconds"] / ours["seconds"]
                    res["max_rel_diff_vs_ldreg"] = max_relative_difference(
                        ours["lids"], res["lids"]
                    )
            for res in (row["ldreg"], row["skdim"], row["fullsort"]):
                res.pop("lids", None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(
        "| N | ldreg s | ldreg peak MiB | skdim s | skdim peak MiB | speed-up | max rel diff "
        "| full-sort s | full-sort peak MiB | speed-up | max rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{row['n']:,}"]
        ours = row["ldreg"]
        cells += [f"{ours['seconds']:.1f}", f"{ours['peak_rss_mib']:.0f}"]
        for other in ("skdim", "fullsort"):
            res = row[other]
            if "seconds" in res:
                cells += [
                    f"{res['seconds']:.1f}",
                    f"{res['peak_rss_mib']:.0f}",
                    f"{res['speedup_of_ldreg']:.2f}x",
                    f"{res['max_rel_diff_vs_ldreg']:.1e}",
                ]
            else:
                cells += [res["skipped"], "", "", ""]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
