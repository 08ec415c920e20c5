"""ldreg.diagnose: LID / collapse reports on embeddings with known structure."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import ldreg.lid
from ldreg.diagnose import (
    FISHER_RAO_THRESHOLD,
    ApproximateNeighbours,
    collapse_fraction,
    compare_reports,
    diagnose_embeddings,
    lid_histogram,
    log_lid_wasserstein,
    summarize_lids,
)
from ldreg.lid import knn, lid_mle, lid_mom, lid_tle


def embedded_gaussian(n: int, intrinsic: int, ambient: int, seed: int = 0) -> np.ndarray:
    """Isotropic Gaussian on a random ``intrinsic``-dimensional subspace of R^ambient."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(ambient, intrinsic)))
    return (rng.normal(size=(n, intrinsic)) @ basis.T).astype(np.float32)


def collapsed_mixture(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """70 % of the points: a 12-d Gaussian; 30 %: a 1-d segment far away (locally
    collapsed). Labels say which."""
    rng = np.random.default_rng(seed)
    bulk = rng.normal(size=(1400, 12))
    line = np.zeros((600, 12))
    line[:, 0] = 30.0 + rng.uniform(0, 3.0, size=600)
    x = np.concatenate([bulk, line]).astype(np.float32)
    return x, np.repeat([0, 1], [1400, 600])


def test_gmean_recovers_known_intrinsic_dimension():
    x = embedded_gaussian(3000, intrinsic=5, ambient=32)
    report = diagnose_embeddings(x, k=[20, 50], estimators=["mle", "mom"])
    for est in ("mle", "mom"):
        for k in (20, 50):
            assert report.summaries[(est, k)].gmean == pytest.approx(5.0, rel=0.15), (est, k)


def test_summary_has_design_shape_with_string_k_keys():
    x = embedded_gaussian(500, intrinsic=4, ambient=8)
    summary = diagnose_embeddings(x, k=[10, 32], estimators=["mle", "mom"]).summary()
    assert set(summary["lid_gmean"]) == {"mle", "mom"}
    assert set(summary["lid_gmean"]["mle"]) == {"10", "32"}
    assert all(isinstance(v, float) for v in summary["lid_gmean"]["mom"].values())
    assert set(summary["lid_percentiles"]["mle"]["10"]) == {"p5", "p25", "p75", "p95"}
    # A rank-4 matrix: effective rank and PCA dimensions at most 4.
    assert 1.0 < summary["effective_rank"] <= 4.0 + 1e-6
    assert summary["pca_dim_90"] <= summary["pca_dim_99"] <= 4
    assert math.isfinite(summary["alpha_req"])
    assert summary["reference"] == {"mode": "full", "size": 500}
    json.dumps(summary, allow_nan=False)


def test_collapse_alarm_fires_on_locally_collapsed_points_only():
    x, labels = collapsed_mixture()
    report = diagnose_embeddings(x, k=[20], estimators=["mle"], labels=labels)
    # The 600 segment points (30 %) sit about ln(10) below the geometric mean.
    assert report.summaries[("mle", 20)].collapse_fraction == pytest.approx(0.30, abs=0.03)
    per_class = report.per_class
    assert per_class is not None
    assert per_class["1"][("mle", 20)].collapse_fraction > 0.95
    assert per_class["0"][("mle", 20)].collapse_fraction < 0.02
    assert per_class["1"][("mle", 20)].gmean == pytest.approx(1.0, rel=0.25)
    assert per_class["0"][("mle", 20)].count == 1400
    summary = report.summary()
    assert summary["per_class"]["1"]["count"] == 600
    assert summary["per_class"]["1"]["lid_gmean"]["mle"]["20"] < 1.3


def test_collapse_alarm_is_quiet_on_isotropic_gaussian():
    x = embedded_gaussian(2000, intrinsic=16, ambient=16, seed=1)
    report = diagnose_embeddings(x, k=[20, 64], estimators=["mle", "mom"])
    for key, s in report.summaries.items():
        assert s.collapse_fraction < 0.005, key


def test_one_knn_pass_serves_every_k_and_estimator(monkeypatch):
    x = torch.as_tensor(embedded_gaussian(400, intrinsic=6, ambient=20, seed=2))
    calls = []
    real_knn = ldreg.lid.knn

    def counting_knn(queries, k, *args, **kwargs):
        calls.append((queries.shape[0], k))
        return real_knn(queries, k, *args, **kwargs)

    monkeypatch.setattr(ldreg.lid, "knn", counting_knn)
    report = diagnose_embeddings(x, k=[8, 16, 24], estimators=["mle", "mom", "tle"])
    monkeypatch.undo()
    assert calls == [(400, 24)]  # one pass, at the largest k, over all points
    for k in (8, 16, 24):
        np.testing.assert_allclose(report.lids[("mle", k)], lid_mle(x, k=k).numpy(), rtol=1e-6)
        np.testing.assert_allclose(report.lids[("mom", k)], lid_mom(x, k=k).numpy(), rtol=1e-6)
        np.testing.assert_allclose(report.lids[("tle", k)], lid_tle(x, k=k).numpy(), rtol=1e-5)


def test_sample_reference_is_close_to_full_on_large_n():
    x = embedded_gaussian(5000, intrinsic=4, ambient=16, seed=3)
    full = diagnose_embeddings(x, k=[20], estimators=["mle"])
    sample = diagnose_embeddings(
        x, k=[20], estimators=["mle"], reference="sample", reference_size=2500, seed=1
    )
    assert sample.reference_size == 2500
    assert sample.summaries[("mle", 20)].gmean == pytest.approx(
        full.summaries[("mle", 20)].gmean, rel=0.05
    )
    assert sample.lids[("mle", 20)].shape == (5000,)
    assert np.isfinite(sample.lids[("mle", 20)]).all()


def test_sample_reference_excludes_each_sampled_point_itself():
    # With duplicates nowhere, a sampled point that counted itself would have r_1 = 0
    # and a floored, tiny LID.
    x = embedded_gaussian(300, intrinsic=3, ambient=5, seed=4)
    report = diagnose_embeddings(
        x, k=[10], estimators=["mle"], reference="sample", reference_size=100
    )
    assert report.lids[("mle", 10)].min() > 0.5


def test_k_is_clipped_to_the_available_neighbours():
    x = embedded_gaussian(50, intrinsic=3, ambient=6)
    report = diagnose_embeddings(x, k=[10, 512], estimators=["mle"])
    assert report.k_used == {10: 10, 512: 49}
    assert report.summary()["k_used"] == {"10": 10, "512": 49}


def test_histogram_counts_sum_to_n_in_log_spaced_bins():
    x, _ = collapsed_mixture()
    report = diagnose_embeddings(x, k=[20], estimators=["mle", "mom"])
    for hist in report.histograms.values():
        assert sum(hist.counts) + hist.num_degenerate == 2000
        ratios = np.diff(np.log10(hist.edges))
        np.testing.assert_allclose(ratios, ratios[0])
    data = report.histogram_data()
    json.dumps(data, allow_nan=False)
    assert sum(data["histograms"]["mle"]["20"]["counts"]) == 2000


def test_histogram_puts_out_of_range_values_in_end_bins():
    hist = lid_histogram(np.array([1e-9, 0.5, 2.0, 1e9, 0.0]))
    assert hist.counts[0] == 1 and hist.counts[-1] == 1
    assert sum(hist.counts) == 4 and hist.num_degenerate == 1


def test_nan_embeddings_raise_value_error_naming_the_row():
    x = embedded_gaussian(100, intrinsic=3, ambient=5)
    x[37, 2] = np.nan
    with pytest.raises(ValueError, match="row 37"):
        diagnose_embeddings(x, k=[10], estimators=["mle"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": [1]}, "at least 2"),
        ({"k": [10], "estimators": ["pca"]}, "unknown estimators"),
        ({"k": [10], "reference": "sample"}, "reference_size"),
        ({"k": [10], "reference": "nearby"}, "unknown reference mode"),
        ({"k": [10], "labels": [0, 1]}, "one entry per point"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    x = embedded_gaussian(100, intrinsic=3, ambient=5)
    with pytest.raises(ValueError, match=message):
        diagnose_embeddings(x, **kwargs)


def test_progress_is_monotone_and_ends_at_one():
    x = embedded_gaussian(5000, intrinsic=3, ambient=4, seed=5)
    seen: list[float] = []
    diagnose_embeddings(x, k=[5], estimators=["mle"], progress=seen.append)
    assert len(seen) >= 4  # 0, then one report per chunk of points, then 1.0
    assert seen[0] == 0.0 and seen[-1] == 1.0
    assert all(b >= a for a, b in itertools.pairwise(seen))
    assert any(0.0 < v < 1.0 for v in seen)


def test_progress_callback_can_stop_the_diagnosis():
    x = embedded_gaussian(5000, intrinsic=3, ambient=4, seed=5)

    def stop(fraction: float) -> None:
        if fraction > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        diagnose_embeddings(x, k=[5], estimators=["mle"], progress=stop)


def test_float16_memmap_input_is_accepted(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, embedded_gaussian(400, intrinsic=3, ambient=6).astype(np.float16))
    x = np.load(path, mmap_mode="r", allow_pickle=False)
    report = diagnose_embeddings(x, k=[10], estimators=["mle"])
    assert report.summaries[("mle", 10)].gmean == pytest.approx(3.0, rel=0.25)


def test_summaries_and_collapse_threshold_edge_cases():
    lids = np.array([1.0, 2.0, 4.0, 8.0])
    s = summarize_lids(lids)
    assert s.gmean == pytest.approx(math.sqrt(8.0))
    assert s.median == pytest.approx(3.0, rel=0.1)  # exp of the median of ln LID
    # ln 1 = 0 is 1.04 below mean(ln) = 1.04: flagged; nothing else is.
    assert collapse_fraction(lids) == 0.25
    assert collapse_fraction(lids, threshold=2.0) == 0.0
    degenerate = summarize_lids(np.array([0.0, np.nan, 5.0, 5.0]))
    assert degenerate.num_degenerate == 2 and degenerate.gmean == pytest.approx(5.0)
    assert degenerate.collapse_fraction == 0.5  # degenerate points count as collapsed
    assert FISHER_RAO_THRESHOLD == 1.0


def test_log_lid_wasserstein_is_the_shift_for_shifted_distributions():
    rng = np.random.default_rng(0)
    a = np.exp(rng.normal(2.0, 0.3, size=1000))
    # Every LID scaled by 1.5: ln-LID shifted by ln 1.5, so W1 = FR of the gmeans.
    assert log_lid_wasserstein(a, 1.5 * a) == pytest.approx(math.log(1.5), rel=1e-9)
    # Different sizes and shapes: W1 never below the Fisher-Rao distance of gmeans.
    b = np.exp(rng.normal(2.1, 0.8, size=777))
    fr = abs(np.log(a).mean() - np.log(b).mean())
    assert log_lid_wasserstein(a, b) > fr
    assert log_lid_wasserstein(b, a) == pytest.approx(log_lid_wasserstein(a, b))


def test_compare_reports_gives_fisher_rao_of_gmeans_and_wasserstein():
    x = embedded_gaussian(600, intrinsic=4, ambient=8, seed=6)
    a = diagnose_embeddings(x, k=[10], estimators=["mle"])
    y, _ = collapsed_mixture()
    b = diagnose_embeddings(y, k=[10, 20], estimators=["mle"])
    result = compare_reports(a, b)
    assert list(result) == [("mle", 10)]
    ga, gb = a.summaries[("mle", 10)].gmean, b.summaries[("mle", 10)].gmean
    assert result[("mle", 10)]["fisher_rao"] == pytest.approx(abs(math.log(ga / gb)))
    assert result[("mle", 10)]["log_ratio"] == pytest.approx(math.log(gb / ga))
    assert result[("mle", 10)]["wasserstein_log_lid"] >= result[("mle", 10)]["fisher_rao"]


def test_importing_diagnose_does_not_import_torch():
    # The API computes comparisons with these functions and must never load torch.
    code = "import sys, ldreg.diagnose; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_global_metrics_on_a_row_sample_match_all_rows():
    x = embedded_gaussian(4000, intrinsic=6, ambient=12, seed=7)
    full = diagnose_embeddings(x, k=[5], estimators=["mle"], global_max_points=None)
    part = diagnose_embeddings(x, k=[5], estimators=["mle"], global_max_points=1000)
    assert full.summary()["global_metrics_points"] == 4000
    assert part.summary()["global_metrics_points"] == 1000
    assert part.effective_rank == pytest.approx(full.effective_rank, rel=0.03)
    assert part.pca_dims == full.pca_dims
    np.testing.assert_array_equal(part.lids[("mle", 5)], full.lids[("mle", 5)])


def test_approximate_reference_scanning_every_cell_is_exact():
    x = embedded_gaussian(2000, intrinsic=6, ambient=24, seed=8)
    exact = diagnose_embeddings(x, k=[10, 30], estimators=["mle", "mom"])
    # nprobe >= nlist scans every cell: the inverted file is then an exhaustive search.
    approx = diagnose_embeddings(
        x, k=[10, 30], estimators=["mle", "mom"], reference="approximate", nprobe=4096
    )
    assert approx.summary()["reference"] == {"mode": "approximate", "size": 2000}
    for key in exact.lids:
        np.testing.assert_allclose(approx.lids[key], exact.lids[key], rtol=1e-4)


def test_approximate_reference_is_close_with_few_cells_scanned():
    x = embedded_gaussian(3000, intrinsic=5, ambient=16, seed=9)
    exact = diagnose_embeddings(x, k=[20], estimators=["mle"])
    approx = diagnose_embeddings(x, k=[20], estimators=["mle"], reference="approximate")
    # A missed neighbour is replaced by a farther one: LIDs can only be biased a little.
    gap = math.log(exact.summaries[("mle", 20)].gmean / approx.summaries[("mle", 20)].gmean)
    assert 0.0 <= gap < 0.1


def test_approximate_search_answers_short_cells_exactly_and_excludes_self():
    x = torch.as_tensor(embedded_gaussian(1000, intrinsic=4, ambient=8, seed=10))
    # 25 cells of ~40 points, one scanned: many queries see fewer than k + 1 = 51 points.
    searcher = ApproximateNeighbours(x, 50, nlist=25, nprobe=1)
    dists, indices = searcher.search(0, 1000)
    exact_d, _ = knn(x, 50)
    assert bool((indices >= 0).all())
    assert not bool((indices == torch.arange(1000).unsqueeze(1)).any())
    assert bool((dists[:, 1:] >= dists[:, :-1]).all())
    # Never closer than the truth; rows answered by the exact fallback equal it.
    assert bool((dists >= exact_d - 1e-5).all())
    assert (dists - exact_d).abs().max(dim=1).values.lt(1e-5).float().mean() > 0.3
