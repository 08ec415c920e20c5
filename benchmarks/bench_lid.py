"""Exact per-point LID: ldreg.lid vs faiss IndexFlatL2 + the same formula vs scikit-dimension.

One run measures, back to back on the same data and with the same thread count:

- ``ldreg-mle``: ``ldreg.lid.lid_mle(x, k, variant="levina_bickel")``;
- ``ldreg-mom``: ``ldreg.lid.lid_mom(x, k, variant="amsaleg")``;
- ``faiss``: an exact ``faiss.IndexFlatL2`` search of every point (k + 1 neighbours, the
  point's own row dropped by index), then the same two formulas
  (``ldreg.lid.lid_from_distances``); its MLE time is search + MLE formula, its MoM
  time search + MoM formula;
- ``skdim``: ``skdim.id.MLE().fit(X, n_neighbors=k).dimension_pw_`` (the
  Levina–Bickel MLE, which is why ldreg's MLE uses that variant here);
- ``fullsort`` (only with ``--fullsort``): ``torch.cdist`` + a full sort, the official
  LDReg code's approach; it needs N^2 x 16 bytes;
- ``ldreg-profile`` (only with ``--profile``): ``ldreg-mle`` again, with the CPU time
  of all threads split by stage of the search (GEMMs, folds into the candidate lists,
  re-ranking by exact distances, the rest).

Each measurement runs in a fresh subprocess, so its peak resident memory
(``ru_maxrss``, the interpreter, libraries and generated data included) belongs to that
method alone; the data are generated identically in each (same seed), and the per-point
LIDs are written back and compared here (maximum relative difference against ldreg's).
Every subprocess gets the same thread count (``--threads``, default torch's): torch
threads, ``faiss.omp_set_num_threads``, and ``threadpoolctl`` limits for
scikit-dimension's BLAS and OpenMP. One-time costs stay out of the timed region for
every method: imports (faiss; scikit-dimension, whose Numba functions compile on
import) and, for ldreg, a small warm-up search that loads Numba and ldreg's kernels
from Numba's disk cache (compiled into it once by a warm-up in this process); that
first-search cost is reported apart (``init_seconds``). With ``--repeat R`` the ldreg
and faiss measurements alternate R times and the fastest of each is reported (the
machine may be shared; the 1-minute load average at the end of each measurement is
reported too).

    .venv/bin/python benchmarks/bench_lid.py --sizes 50000 --repeat 3   # targets at 50k
    .venv/bin/python benchmarks/bench_lid.py --sizes 50000 --threads 1 --profile
    .venv/bin/python benchmarks/bench_lid.py --sizes 100000 --methods ldreg-mle ldreg-mom
    .venv/bin/python benchmarks/bench_lid.py --quick          # smoke run (seconds)

Targets (issue "GPU-first speed", part 3): at N = 50k, D = 512, k = 64, ldreg's MLE
and MoM >= 1.5x faster than faiss + formula and >= 2x faster than scikit-dimension;
peak memory < 2 GiB at N = 100k; LIDs identical (max relative difference ~1e-5). Not
part of the test run.
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
METHODS = ("ldreg-mle", "ldreg-mom", "faiss", "skdim", "fullsort", "ldreg-profile")
# (column, file written by the method, ldreg's file it is compared with)
LID_OUTPUTS: dict[str, list[tuple[str, str, str | None]]] = {
    "ldreg-mle": [("mle", "ldreg-mle", None)],
    "ldreg-mom": [("mom", "ldreg-mom", None)],
    "faiss": [("mle", "faiss-mle", "ldreg-mle"), ("mom", "faiss-mom", "ldreg-mom")],
    "skdim": [("mle", "skdim", "ldreg-mle")],
    "fullsort": [("mle", "fullsort", "ldreg-mle")],
    "ldreg-profile": [("mle", "ldreg-profile", None)],
}
STAGES = ("gemm", "folds", "re-rank", "other")


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


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stage_timers() -> dict[str, float]:
    """CPU seconds (all the process's threads) spent in each stage of ``ldreg.knn``'s
    search from now on: the GEMMs, the folds into the candidate lists, the re-ranking by
    exact distances; the rest of the run is "other"."""
    import functools

    import ldreg.knn as search

    totals = dict.fromkeys(STAGES, 0.0)

    def timed(stage, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = cpu_seconds()
            try:
                return function(*args, **kwargs)
            finally:
                totals[stage] += cpu_seconds() - start

        return wrapper

    search._matmul_into = timed("gemm", search._matmul_into)
    lists = search._CandidateLists
    lists.fold = timed("folds", lists.fold)  # type: ignore[method-assign]
    lists.exact_distances = timed("re-rank", lists.exact_distances)  # type: ignore[method-assign]
    return totals


def drop_self(dists, indices, k: int):
    """The first k of k + 1 neighbours that are not the query's own row (a duplicate of
    the point may come first, so the row is dropped by index, as ldreg does)."""
    import numpy as np

    keep = indices != np.arange(len(indices))[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dists, order, axis=1)


def measure(method: str, n: int, dim: int, k: int, seed: int, threads: int, out: Path) -> dict:
    """Runs inside the subprocess: one method on one data set."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    if method == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
    if method == "skdim":
        import skdim  # before the timed region: numba compiles on import
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

        threadpool_limits(limits=threads)
    from ldreg.lid import Estimator, lid_from_distances, lid_mle, lid_mom

    init = 0.0
    if method.startswith("ldreg"):
        # One-time cost of a process's first search (loading Numba and ldreg's compiled
        # kernels from Numba's disk cache), measured apart like the other imports.
        t0 = time.perf_counter()
        lid_mle(torch.from_numpy(make_points(1100, 16, seed)), 8)
        init = time.perf_counter() - t0
    stages = stage_timers() if method == "ldreg-profile" else None
    points = make_points(n, dim, seed)
    baseline = peak_rss_mib()
    seconds: dict[str, float] = {}
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    if method in ("ldreg-mle", "ldreg-profile"):
        lids = {method: lid_mle(torch.from_numpy(points), k, variant="levina_bickel")}
    elif method == "ldreg-mom":
        lids = {"ldreg-mom": lid_mom(torch.from_numpy(points), k, variant="amsaleg")}
    elif method == "faiss":
        index = faiss.IndexFlatL2(dim)
        index.add(points)
        squared, indices = index.search(points, k + 1)
        dists = torch.from_numpy(np.sqrt(np.maximum(drop_self(squared, indices, k), 0.0)))
        search = time.perf_counter() - start
        lids = {}
        formulas: list[tuple[Estimator, str]] = [("mle", "levina_bickel"), ("mom", "amsaleg")]
        for estimator, variant in formulas:
            t0 = time.perf_counter()
            lids[f"faiss-{estimator}"] = lid_from_distances(dists, estimator, variant=variant)
            seconds[estimator] = search + time.perf_counter() - t0
    elif method == "skdim":
        lids = {"skdim": skdim.id.MLE().fit(points, n_neighbors=k).dimension_pw_}
    elif method == "fullsort":
        # The official code's approach (lid.py: cdist, full sort, drop position 0).
        x = torch.from_numpy(points)
        a, _ = torch.sort(torch.cdist(x, x, p=2), dim=1)
        lids = {"fullsort": (k - 1) / torch.log(a[:, k : k + 1] / a[:, 1:k]).sum(dim=1)}
    else:
        raise ValueError(method)
    total = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
    if not seconds:
        seconds = {LID_OUTPUTS[method][0][0]: total}
    for name, values in lids.items():
        np.save(out / f"{name}.npy", np.asarray(values, dtype=np.float64))
    if stages is not None:
        stages["other"] = cpu - sum(stages.values())
    return {
        "stages_cpu_seconds": stages,
        "seconds": seconds,
        "init_seconds": init,
        # CPU time of all the process's threads in the timed region (spin-waits included).
        "cpu_seconds": cpu,
        "peak_rss_mib": peak_rss_mib(),
        "data_rss_mib": baseline,
        # The machine may be shared: the 1-minute load average when the run ended.
        "load_avg": os.getloadavg()[0],
    }


def run_one(method: str, args: argparse.Namespace, n: int, workdir: Path, timeout: float) -> dict:
    out = workdir / str(n)
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, __file__, "--measure", method, "--n", str(n), "--dim", str(args.dim)]
    cmd += ["--k", str(args.k), "--seed", str(args.seed), "--threads", str(args.threads)]
    cmd += ["--out", str(out)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"skipped": f"exceeded {timeout:.0f} s"}
    if done.returncode != 0:
        return {"skipped": f"failed: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_relative_difference(a_path: Path, b_path: Path) -> float:
    import numpy as np

    a, b = np.load(a_path), np.load(b_path)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def measure_size(args: argparse.Namespace, n: int, workdir: Path) -> dict:
    row: dict = {"n": n}
    repeated = [m for m in args.methods if m in ("ldreg-mle", "ldreg-mom", "faiss")]
    for _ in range(args.repeat):
        for method in repeated:
            result = run_one(method, args, n, workdir, 3600)
            best = row.get(method)
            if (
                best is None
                or "skipped" in best
                or (
                    "seconds" in result
                    and sum(result["seconds"].values()) < sum(best["seconds"].values())
                )
            ):
                row[method] = result
    if "skdim" in args.methods:
        row["skdim"] = run_one("skdim", args, n, workdir, args.skdim_timeout)
    if "ldreg-profile" in args.methods:
        row["ldreg-profile"] = run_one("ldreg-profile", args, n, workdir, 3600)
    if "fullsort" in args.methods:
        # cdist output + sorted values (float32) + sort indices (int64).
        need_gib = n * n * 16 / 2**30
        if need_gib <= args.fullsort_max_gib:
            row["fullsort"] = run_one("fullsort", args, n, workdir, 3600)
        else:
            row["fullsort"] = {"skipped": f"needs ~{need_gib:.0f} GiB"}
    # Speed-up and LID difference of ldreg against each other method, per estimator.
    for method in args.methods:
        res = row[method]
        if "seconds" not in res or method.startswith("ldreg"):
            continue
        for estimator, name, ours in LID_OUTPUTS[method]:
            theirs = row.get(ours, {})
            if "seconds" not in theirs:
                continue
            res.setdefault("speedup_of_ldreg", {})[estimator] = (
                res["seconds"][estimator] / theirs["seconds"][estimator]
            )
            res.setdefault("max_rel_diff_vs_ldreg", {})[estimator] = max_relative_difference(
                workdir / str(n) / f"{name}.npy", workdir / str(n) / f"{ours}.npy"
            )
    return row


def print_table(rows: list[dict], methods: list[str]) -> None:
    """Two Markdown tables: seconds and ldreg's speed-ups; LID differences and memory."""
    labels = {"ldreg-mle": "ldreg MLE", "ldreg-mom": "ldreg MoM", "faiss": "faiss +"}
    timed = [(m, e, ours) for m in methods for e, _, ours in LID_OUTPUTS[m]]
    compared = [(m, e) for m, e, ours in timed if ours is not None]

    def label(method: str, estimator: str) -> str:
        if method == "faiss":
            return f"faiss + {estimator.upper().replace('MOM', 'MoM')}"
        return labels.get(method, f"{method} {estimator.upper()}")

    def cell(res: dict, key: str, estimator: str, fmt: str, unit: str = "") -> str:
        value = res.get(key, {}).get(estimator)
        return format(value, fmt) + unit if value is not None else res.get("skipped", "")

    def table(header: list[str], body: list[list[str]]) -> None:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for cells in body:
            print("| " + " | ".join(cells) + " |")

    header = ["N", *(f"{label(m, e)} s" for m, e, _ in timed)]
    header += [f"{e.upper().replace('MOM', 'MoM')}: ldreg vs {m}" for m, e in compared]
    header += ["load"]
    body = []
    for row in rows:
        cells = [f"{row['n']:,}"]
        cells += [cell(row[m], "seconds", e, ".1f") for m, e, _ in timed]
        cells += [cell(row[m], "speedup_of_ldreg", e, ".2f", "x") for m, e in compared]
        loads = [row[m]["load_avg"] for m in methods if "load_avg" in row[m]]
        cells += [f"{min(loads):.1f}–{max(loads):.1f}" if loads else ""]
        body.append(cells)
    table(header, body)
    print()
    header = ["N", *(f"max rel diff {e.upper().replace('MOM', 'MoM')} vs {m}" for m, e in compared)]
    header += [f"{m} peak MiB" for m in methods]
    ldreg = [m for m in methods if m.startswith("ldreg")]
    header += ["ldreg first-search init s"] if ldreg else []
    body = []
    for row in rows:
        cells = [f"{row['n']:,}"]
        cells += [cell(row[m], "max_rel_diff_vs_ldreg", e, ".1e") for m, e in compared]
        cells += [
            f"{row[m]['peak_rss_mib']:.0f}" if "peak_rss_mib" in row[m] else "" for m in methods
        ]
        inits = [row[m]["init_seconds"] for m in ldreg if "init_seconds" in row[m]]
        cells += [f"{min(inits):.1f}–{max(inits):.1f}" if inits else ""] if ldreg else []
        body.append(cells)
    table(header, body)


def print_profile(rows: list[dict], threads: int) -> None:
    """CPU seconds per stage of one lid_mle run, all threads summed."""
    print(f"| N | threads | {' | '.join(f'{s} CPU s' for s in STAGES)} | total CPU s | wall s |")
    print("|" + "---|" * (len(STAGES) + 4))
    for row in rows:
        res = row["ldreg-profile"]
        if "seconds" not in res:
            continue
        stages = res["stages_cpu_seconds"]
        cells = [f"{row['n']:,}", str(threads), *(f"{stages[s]:.2f}" for s in STAGES)]
        cells += [f"{res['cpu_seconds']:.2f}", f"{res['seconds']['mle']:.2f}"]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 2k, 5k; D = 128")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="default: torch.get_num_threads()")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=["ldreg-mle", "ldreg-mom", "faiss", "skdim"],
        help="fullsort is off by default",
    )
    parser.add_argument("--fullsort", action="store_true", help="add the full-sort baseline")
    parser.add_argument(
        "--profile", action="store_true", help="add a run of lid_mle timed stage by stage"
    )
    parser.add_argument("--repeat", type=int, default=1, help="ldreg and faiss runs, best kept")
    parser.add_argument("--skdim-timeout", type=float, default=600.0)
    parser.add_argument("--fullsort-max-gib", type=float, default=8.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        result = measure(args.measure, args.n, args.dim, args.k, args.seed, args.threads, args.out)
        print(json.dumps(result))
        return
    if args.quick:
        args.sizes, args.dim = [2_000, 5_000], 128
    if args.fullsort and "fullsort" not in args.methods:
        args.methods.append("fullsort")
    if args.profile and "ldreg-profile" not in args.methods:
        args.methods.append("ldreg-profile")
    args.methods = [m for m in METHODS if m in args.methods]

    import torch

    from ldreg.knn import knn

    args.threads = args.threads or torch.get_num_threads()
    # Compiles ldreg's Numba kernels into their disk cache (once per machine), so that
    # no measurement pays for compiling them.
    knn(torch.from_numpy(make_points(1100, 16, 0)), 8)
    print(
        f"D={args.dim} k={args.k} threads={args.threads} torch {torch.__version__} "
        f"cpus={os.cpu_count()} load at start={os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            row = measure_size(args, n, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print_table(rows, [m for m in args.methods if m != "ldreg-profile"])
    if "ldreg-profile" in args.methods:
        print()
        print_profile(rows, args.threads)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
