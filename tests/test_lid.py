"""LID estimators: exact k-NN, formulas vs references, ground truth, edge cases."""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import torch

from ldreg.errors import UserError
from ldreg.lid import (
    RATIO_FLOOR,
    LIDInputError,
    fisher_rao_distance,
    geometric_mean,
    harmonic_mean,
    knn,
    knn_distances,
    lid_from_distances,
    lid_mle,
    lid_mom,
    lid_tle,
    lid_tle_from_knn,
    mean,
    median,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def brute_force_knn(x: torch.Tensor, k: int, reference: torch.Tensor | None = None):
    """float64 full distance matrix + full sort: the slow obvious answer."""
    x64 = x.to(torch.float64)
    ref = x64 if reference is None else reference.to(torch.float64)
    d = torch.cdist(x64, ref, compute_mode="donot_use_mm_for_euclid_dist")
    if reference is None:
        d.fill_diagonal_(math.inf)
    return d.sort(dim=1).values[:, :k]


def embed_linearly(points: torch.Tensor, ambient: int, generator: torch.Generator):
    basis, _ = torch.linalg.qr(torch.randn(ambient, points.shape[1], generator=generator))
    return points @ basis.T


# ----------------------------------------------------------------------------- k-NN


def test_knn_matches_brute_force_with_duplicates_and_far_offset():
    g = torch.Generator().manual_seed(0)
    # Far from the origin: the naive |x|^2 + |y|^2 - 2xy expansion loses ~all digits.
    x = torch.randn(300, 16, generator=g) + 1000.0
    x[50:53] = x[50]
    got = knn_distances(x, 12)
    want = brute_force_knn(x, 12)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert got[50, :2].tolist() == [0.0, 0.0]


def test_knn_is_identical_for_any_chunking_and_reference_blocking():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(257, 8, generator=g)
    ref = torch.randn(301, 8, generator=g)
    d_default, i_default = knn(x, 10, ref)
    # 64 queries x 40 reference columns x 4 bytes per block: forces the running merge.
    d_blocked, i_blocked = knn(x, 10, ref, chunk_size=7, block_bytes=64 * 40 * 4)
    torch.testing.assert_close(d_blocked, d_default)
    assert torch.equal(i_blocked, i_default)
    torch.testing.assert_close(
        d_default.double(), brute_force_knn(x, 10, ref), rtol=1e-5, atol=1e-6
    )


def test_symmetric_search_over_blocks_equals_the_general_search():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(500, 6, generator=g)
    x[100:104] = x[100]
    # chunk_size=64: 8 x 8 blocks, only the upper triangle multiplied, merged both ways.
    symmetric, _ = knn(x, 15, chunk_size=64)
    general, _ = knn(x, 15, x, self_offset=0, chunk_size=64)
    torch.testing.assert_close(symmetric, general)
    torch.testing.assert_close(symmetric.double(), brute_force_knn(x, 15), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "numba"])
def test_candidate_lists_fold_both_orientations_into_the_smallest_scores(kernels):
    from ldreg.knn import _CandidateLists

    g = torch.Generator().manual_seed(12)
    n, width, side = 600, 7, 200  # 200-column blocks: the kernels' screens and bound at work
    points = torch.randn(n, 5, generator=g)
    dots = points @ points.T
    dots = (dots + dots.T) / 2  # exactly symmetric: a block and its transpose agree
    dots.fill_diagonal_(-math.inf)  # scores +inf: a point is not its own candidate
    norms = points.square().sum(dim=1)
    want_v, want_i = torch.add(norms, dots, alpha=-2.0).topk(width, dim=1, largest=False)

    device = torch.device("cpu")
    lists = _CandidateLists(n, width, torch.float32, device, n_scores=2**40 if kernels else 0)
    with lists:
        starts = range(0, n, side)
        for i0 in starts:  # diagonal blocks first, then each block above it in both ways
            block = dots[i0 : i0 + side, i0 : i0 + side].contiguous()
            lists.fold(i0, block, i0, norms[i0 : i0 + side])
        for i0 in starts:
            for j0 in range(i0 + side, n, side):
                block = dots[i0 : i0 + side, j0 : j0 + side].contiguous()
                lists.fold(i0, block, j0, norms[j0 : j0 + side], norms[i0 : i0 + side])
    order = lists.values.argsort(dim=1)
    assert torch.equal(lists.values.gather(1, order), want_v)
    assert torch.equal(lists.indices.gather(1, order), want_i)


def test_upper_triangle_blocks_cover_every_pair_once_diagonal_blocks_first():
    from ldreg.knn import _upper_triangle

    n = 1000
    blocks = _upper_triangle(n, 300, 80)  # diagonal blocks: 300 -> 150 -> 75
    covered = torch.zeros(n, n, dtype=torch.int32)
    for i0, i1, j0, j1 in blocks:
        covered[i0:i1, j0:j1] += 1
        if j0 != i0:  # folded transposed as well
            covered[j0:j1, i0:i1] += 1
    assert bool((covered == 1).all())
    diagonal = [b for b in blocks if b[0] == b[2]]
    assert blocks[: len(diagonal)] == diagonal
    assert sum(i1 - i0 for i0, i1, _, _ in diagonal) == n
    assert max(i1 - i0 for i0, i1, _, _ in diagonal) == 75
    assert max(j1 - j0 for _, _, j0, j1 in blocks) == 300


def brute_force_knn_with_indices(x: torch.Tensor, k: int):
    """float64 direct distances, own row excluded, ties ordered by index."""
    d = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(math.inf)
    values, indices = d.sort(dim=1, stable=True)
    return values[:, :k], indices[:, :k]


def test_kernel_search_is_exact_on_a_grid_full_of_ties_and_duplicates():
    from ldreg.knn import _KERNEL_MIN_SCORES

    # Integer coordinates: every squared distance is an exact integer, so ties are exact
    # and ~175 pairs of points coincide. 1200^2 scores: the CPU search uses its kernels.
    g = torch.Generator().manual_seed(13)
    x = torch.randint(0, 4, (1200, 6), generator=g).float()
    assert x.shape[0] ** 2 >= _KERNEL_MIN_SCORES
    want, _ = brute_force_knn_with_indices(x, 20)
    for dists, indices in (
        knn(x, 20),
        knn(x, 20, chunk_size=256),
        knn(x[:900], 20, x, self_offset=0),  # the general search, 900 x 1200 scores
    ):
        n = dists.shape[0]
        assert torch.equal(dists, want[:n].float())  # float32 rounding of the exact distance
        assert not (indices == torch.arange(n).unsqueeze(1)).any()
        assert all(len(set(row)) == 20 for row in indices.tolist())
        direct = (x[:n].unsqueeze(1) - x[indices]).double().norm(dim=2).float()
        assert torch.equal(direct, dists)  # each index is a neighbour at its distance
    assert int((want[:, 0] == 0).sum()) > 100  # the duplicates were there


def test_kernel_search_ranks_by_exact_distance_and_breaks_ties_by_index(monkeypatch):
    import ldreg.knn

    g = torch.Generator().manual_seed(14)
    x = torch.randn(1100, 24, generator=g) + 50.0  # off-centre: cancellation in the GEMM
    x[5:8] = x[5]
    x[700] = x[3]
    want_d, want_i = brute_force_knn_with_indices(x, 30)
    dists, indices = knn(x, 30)
    assert torch.equal(indices, want_i)
    blocked_d, blocked_i = knn(x, 30, chunk_size=300)  # folded both ways, block by block
    assert torch.equal(blocked_i, indices) and torch.equal(blocked_d, dists)
    torch.testing.assert_close(dists.double(), want_d, rtol=1e-7, atol=0)
    assert dists[5, :2].tolist() == [0.0, 0.0] and indices[5, :2].tolist() == [6, 7]
    assert dists[700, 0].item() == 0.0 and indices[700, 0].item() == 3
    # The torch path (CUDA, small searches) finds the same neighbours.
    monkeypatch.setattr(ldreg.knn, "_KERNEL_MIN_SCORES", 2**62)
    torch_d, torch_i = knn(x, 30)
    torch.testing.assert_close(torch_d, dists, rtol=1e-6, atol=0)
    assert (torch_i == indices).float().mean() > 0.99  # float32 near-ties may swap


def test_pair_distance_kernel_is_exact_for_duplicates_and_marks_the_own_row():
    from ldreg._knn_cpu import pair_distances

    g = torch.Generator().manual_seed(15)
    x = torch.randn(50, 37, generator=g)  # 37 columns: a remainder after the SIMD lanes
    x[10] = x[20]
    indices = torch.randint(0, 50, (30, 9), generator=g)
    indices[0, 4], indices[7, 2] = 3, 20  # query rows are points 3..32
    out = torch.empty(30, 9, dtype=torch.float64)
    pair_distances(x[3:33].numpy(), x.numpy(), indices.numpy(), out.numpy(), 0, 30, 3)
    want = (x[3:33].double().unsqueeze(1) - x.double()[indices]).norm(dim=2)
    want[indices == torch.arange(3, 33).unsqueeze(1)] = math.inf
    torch.testing.assert_close(out, want, rtol=1e-14, atol=0)
    assert out[0, 4].item() == math.inf  # row 0 is point 3: its own row
    assert out[7, 2].item() == 0.0  # point 10 against its duplicate, point 20


def test_knn_excludes_self_by_index_so_a_duplicate_is_a_neighbour():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    dists, indices = knn(x, 2)
    assert dists.tolist() == [[0.0, 5.0], [0.0, 5.0], [5.0, 5.0]]
    assert indices[0, 0].item() == 1 and indices[1, 0].item() == 0


def test_knn_self_offset_excludes_rows_of_a_gathered_reference():
    g = torch.Generator().manual_seed(2)
    full = torch.randn(40, 5, generator=g)
    local = full[10:25]
    dists, indices = knn(local, 6, full, self_offset=10)
    torch.testing.assert_close(dists, knn_distances(full, 6)[10:25])
    assert not (indices == torch.arange(10, 25).unsqueeze(1)).any()
    with pytest.raises(ValueError, match="self_offset=30"):
        knn(local, 6, full, self_offset=30)


def test_knn_distances_are_differentiable_for_queries_and_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(20, 3, generator=g, dtype=torch.float64, requires_grad=True)
    check = functools.partial(torch.autograd.gradcheck, fast_mode=True)
    assert check(lambda a: knn_distances(a, 5), (x,))
    assert check(lambda a, b: knn_distances(a, 5, b), (x, ref))
    assert check(lambda a: lid_mle(a, 5), (x,))
    assert check(lambda a: lid_mom(a, 5, ref.detach()), (x,))


# ----------------------------------------------------------------------------- formulas


def official_ldreg_mle(data: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """Transcription of lid_mle in the authors' lid.py (full cdist + sort, drop self)."""
    r = torch.cdist(data, reference, p=2)
    a, _ = torch.sort(r, dim=1)
    return -k / torch.sum(torch.log(a[:, 1:k] / a[:, k].view(-1, 1) + 1.0e-4), dim=1)


def official_ldreg_mom(data: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """Transcription of lid_mom_est in the authors' lid.py."""
    r = torch.cdist(data, reference, p=2)
    a, _ = torch.sort(r, dim=1)
    m = torch.mean(a[:, 1:k], dim=1)
    return m / (a[:, k] - m)


def test_default_variants_follow_the_official_ldreg_formulas():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 12, generator=g)
    torch.testing.assert_close(lid_mom(x, 20), official_ldreg_mom(x, x, 20), rtol=1e-4, atol=0)
    # The official MLE adds 1e-4 inside the log, which moves each term by 1e-4 / ratio.
    torch.testing.assert_close(lid_mle(x, 20), official_ldreg_mle(x, x, 20), rtol=5e-3, atol=0)
    a = torch.cdist(x.double(), x.double()).sort(dim=1).values
    exact = -20 / torch.log(a[:, 1:20] / a[:, 20:21]).sum(dim=1)
    torch.testing.assert_close(lid_mle(x, 20).double(), exact, rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def skdim_points() -> np.ndarray:
    rng = np.random.default_rng(5)
    return (rng.standard_normal((500, 3)) @ rng.standard_normal((3, 10))).astype(np.float32)


def test_levina_bickel_mle_equals_scikit_dimension(skdim_points):
    import skdim

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = skdim.id.MLE().fit(skdim_points.astype(np.float64), n_neighbors=20).dimension_pw_
    got = lid_mle(torch.from_numpy(skdim_points), 20, variant="levina_bickel").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert harmonic_mean(torch.from_numpy(got)) == pytest.approx(1 / np.mean(1 / want), rel=1e-4)


def test_amsaleg_mom_equals_scikit_dimension(skdim_points):
    import skdim

    want = skdim.id.MOM().fit(skdim_points.astype(np.float64), n_neighbors=20).dimension_pw_
    got = lid_mom(torch.from_numpy(skdim_points), 20, variant="amsaleg").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_tle_equals_scikit_dimension(skdim_points):
    import skdim

    points = skdim_points[:200]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skdim computes 0/0 on the diagonal, then masks it
        want = skdim.id.TLE().fit(points.astype(np.float64), n_neighbors=15).dimension_pw_
    got = lid_tle(torch.from_numpy(points), 15).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_one_knn_pass_at_max_k_serves_every_smaller_k_and_estimator():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 6, generator=g)
    dists, indices = knn(x, 40)
    torch.testing.assert_close(lid_from_distances(dists[:, :10], "mle"), lid_mle(x, 10))
    torch.testing.assert_close(
        lid_from_distances(dists[:, :25], "mom", variant="amsaleg"),
        lid_mom(x, 25, variant="amsaleg"),
    )
    torch.testing.assert_close(
        lid_tle_from_knn(dists[:, :12], indices[:, :12], x), lid_tle(x, 12), rtol=1e-5, atol=0
    )


# ----------------------------------------------------------------------------- ground truth


def _gaussian(d):
    return lambda n, g: torch.randn(n, d, generator=g)


def _cube(d):
    return lambda n, g: torch.rand(n, d, generator=g)


def _sphere(d):
    def sample(n, g):
        p = torch.randn(n, d + 1, generator=g)
        return p / p.norm(dim=1, keepdim=True)

    return sample


def _swiss_roll(n, g):
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    height = 21 * torch.rand(n, generator=g)
    return torch.stack([t * torch.cos(t), height, t * torch.sin(t)], dim=1)


def _nonlinear(d):
    def sample(n, g):
        u = torch.rand(n, d, generator=g)
        w = torch.randn(d, 16, generator=g)
        return torch.cat([torch.sin(2 * u @ w), torch.cos(u @ w)], dim=1)

    return sample


MANIFOLDS = [
    ("gaussian", 2, _gaussian(2)),
    ("gaussian", 5, _gaussian(5)),
    ("gaussian", 10, _gaussian(10)),
    ("cube", 3, _cube(3)),
    ("cube", 8, _cube(8)),
    ("sphere", 2, _sphere(2)),
    ("sphere", 6, _sphere(6)),
    ("swiss_roll", 2, _swiss_roll),
    ("sin_cos_embedding", 4, _nonlinear(4)),
]


@pytest.mark.parametrize(
    ("name", "dim", "sample"), MANIFOLDS, ids=[f"{m[0]}-{m[1]}" for m in MANIFOLDS]
)
def test_geometric_mean_mle_recovers_the_dimension_of_known_manifolds(name, dim, sample):
    g = torch.Generator().manual_seed(dim)
    points = sample(2000, g)
    if points.shape[1] < 32:
        points = embed_linearly(points, 32, g)
    estimate = geometric_mean(lid_mle(points, 20))
    assert abs(estimate - dim) <= 0.15 * dim, f"{name}: LID {estimate:.2f} vs d={dim}"


# ----------------------------------------------------------------------------- edge cases


def test_points_whose_neighbours_all_coincide_get_the_documented_floor_lid():
    x = torch.zeros(10, 3)
    k = 5
    floor_mle = k / ((k - 1) * math.log(1 / RATIO_FLOOR))
    torch.testing.assert_close(lid_mle(x, k), torch.full((10,), floor_mle))
    torch.testing.assert_close(lid_mom(x, k), torch.full((10,), RATIO_FLOOR / (1 - RATIO_FLOOR)))
    torch.testing.assert_close(lid_tle(x, k), torch.full((10,), floor_mle))


def test_partial_duplicates_give_finite_positive_lids_for_every_estimator():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(60, 4, generator=g)
    x[10:20] = x[10]
    for lids in (lid_mle(x, 8), lid_mom(x, 8), lid_tle(x, 8)):
        assert torch.isfinite(lids).all() and (lids > 0).all()
    # Nine duplicates among the eight nearest: the ratio floor decides the value.
    assert lid_mle(x, 8)[12].item() == pytest.approx(8 / (7 * math.log(1e6)), rel=1e-5)


def test_equidistant_neighbours_are_capped_instead_of_infinite():
    k = 6
    x = torch.cat([torch.zeros(1, k), torch.eye(k)])  # the origin sees k points at distance 1
    lid = lid_mle(x, k)[0].item()
    assert lid == pytest.approx(k / ((k - 1) * RATIO_FLOOR), rel=1e-6)
    assert lid_mom(x, k)[0].item() == pytest.approx(1 / RATIO_FLOOR, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 10}, r"k=10 must be at most 9 \(10 points, each point's own row excluded\)"),
        ({"k": 1}, "k must be at least 2, found k=1"),
        ({"k": 2.5}, "k must be an integer"),
        ({"k": True}, "k must be an integer"),
        ({"k": 4, "reference": torch.randn(3, 3)}, r"k=4 must be at most 3 \(3 reference points\)"),
        ({"k": 2, "reference": torch.randn(5, 2)}, "same dimension"),
    ],
)
def test_bad_k_or_reference_is_a_value_error_naming_the_limit(kwargs, message):
    x = torch.randn(10, 3)
    for estimator in (lid_mle, lid_mom, lid_tle):
        with pytest.raises(ValueError, match=message) as info:
            estimator(x, **kwargs)
        assert isinstance(info.value, UserError) and info.value.code == "invalid_input"


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (torch.tensor([[0.0, 1.0], [float("nan"), 2.0], [1.0, 1.0]]), "NaN or inf in 1 of 6"),
        (torch.tensor([[0.0, 1.0], [float("inf"), 2.0], [1.0, 1.0]]), "NaN or inf"),
        (torch.randn(5), r"2-D \(N, D\) tensor of points, found shape \(5,\)"),
        (torch.randn(2, 3, 4), r"found shape \(2, 3, 4\)"),
        (torch.empty(0, 3), r"x is empty: shape \(0, 3\)"),
        (torch.empty(4, 0), r"x is empty: shape \(4, 0\)"),
    ],
)
def test_malformed_points_are_a_value_error(points, message):
    for estimator in (lid_mle, lid_mom, lid_tle, knn_distances):
        with pytest.raises(LIDInputError, match=message):
            estimator(points, 2)


def test_lid_from_distances_rejects_unsorted_negative_or_short_rows():
    with pytest.raises(ValueError, match="sorted ascending"):
        lid_from_distances(torch.tensor([[2.0, 1.0, 3.0]]))
    with pytest.raises(ValueError, match="negative"):
        lid_from_distances(torch.tensor([[-1.0, 1.0, 3.0]]))
    with pytest.raises(ValueError, match="k must be at least 2"):
        lid_from_distances(torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="pairwise"):
        lid_from_distances(torch.tensor([[1.0, 2.0]]), "tle")
    with pytest.raises(ValueError, match="unknown MLE variant 'skdim'"):
        lid_from_distances(torch.tensor([[1.0, 2.0]]), "mle", variant="skdim")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_computed_and_returned_in_float32(dtype):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(200, 8, generator=g).to(dtype)
    for estimator in (lid_mle, lid_mom, lid_tle):
        lids = estimator(x, 10)
        assert lids.dtype == torch.float32
        torch.testing.assert_close(lids, estimator(x.float(), 10), rtol=1e-5, atol=0)


def test_integer_and_numpy_input_is_accepted():
    points = np.random.default_rng(9).integers(0, 1000, size=(100, 5))
    torch.testing.assert_close(lid_mle(points, 10), lid_mle(torch.from_numpy(points).float(), 10))


@pytest.mark.parametrize("device", DEVICES)
def test_estimators_run_on_the_tensor_device_and_agree_with_float64(device):
    g = torch.Generator().manual_seed(10)
    x64 = torch.randn(600, 32, generator=g, dtype=torch.float64)
    x = x64.float().to(device).requires_grad_(True)
    lids = lid_mle(x, 32)
    assert lids.device.type == device and lids.dtype == torch.float32
    torch.testing.assert_close(lids.double().cpu(), lid_mle(x64, 32), rtol=1e-4, atol=0)
    torch.testing.assert_close(lid_mom(x, 32).double().cpu(), lid_mom(x64, 32), rtol=1e-4, atol=0)
    torch.testing.assert_close(
        lid_tle(x.detach(), 16).double().cpu(), lid_tle(x64, 16), rtol=1e-4, atol=0
    )
    torch.log(lids).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- aggregates


def test_aggregates_of_known_values():
    lids = torch.tensor([1.0, 4.0, 16.0])
    assert geometric_mean(lids) == pytest.approx(4.0)
    assert mean(lids) == pytest.approx(7.0)
    assert median(lids) == pytest.approx(4.0)
    assert median([1.0, 4.0, 16.0, 2.0]) == pytest.approx(3.0)
    assert harmonic_mean(lids) == pytest.approx(3 / (1 + 0.25 + 0.0625))
    assert fisher_rao_distance(2.0, 8.0) == pytest.approx(math.log(4))
    assert fisher_rao_distance(8.0, 2.0) == pytest.approx(math.log(4))
    torch.testing.assert_close(
        fisher_rao_distance(torch.tensor([1.0, 3.0]), torch.tensor([math.e, 3.0])),
        torch.tensor([1.0, 0.0]),
    )


def test_geometric_mean_minimises_the_fisher_rao_spread():
    lids = torch.tensor([2.0, 3.0, 11.0, 40.0])
    centre = geometric_mean(lids)
    spread = lambda c: float((fisher_rao_distance(lids, torch.tensor(c)) ** 2).sum())  # noqa: E731
    assert spread(centre) < spread(centre * 1.01) and spread(centre) < spread(centre / 1.01)


@pytest.mark.parametrize("values", [[], [1.0, 0.0], [1.0, -2.0], [1.0, float("nan")]])
def test_aggregates_refuse_empty_or_non_positive_lids(values):
    for aggregate in (geometric_mean, mean, median, harmonic_mean):
        with pytest.raises(ValueError, match="LIDs"):
            aggregate(torch.tensor(values))
