"""Global dimensionality: effective rank, alpha-ReQ, PCA dimensions on known spectra."""

from __future__ import annotations

import math

import pytest
import torch

from ldreg.rank import alpha_req, effective_rank, pca_dims, singular_values


def matrix_with_spectrum(n: int, d: int, sigma: torch.Tensor, *, centred: bool, seed: int = 0):
    """(n, d) matrix whose singular values (of the centred matrix if ``centred``) are sigma."""
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(n, sigma.numel(), generator=g, dtype=torch.float64)
    if centred:
        left = left - left.mean(dim=0)
    u, _ = torch.linalg.qr(left)
    v, _ = torch.linalg.qr(torch.randn(d, sigma.numel(), generator=g, dtype=torch.float64))
    return (u * sigma.to(torch.float64)) @ v.T


@pytest.mark.parametrize("rank", [1, 3, 17])
def test_effective_rank_of_r_equal_singular_values_is_r(rank):
    x = matrix_with_spectrum(200, 40, torch.full((rank,), 2.5), centred=False)
    assert effective_rank(x) == pytest.approx(rank, rel=1e-9)


def test_effective_rank_is_exp_entropy_of_normalised_singular_values():
    x = matrix_with_spectrum(100, 20, torch.tensor([3.0, 1.0]), centred=False)
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert effective_rank(x) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)
    assert 1.0 < effective_rank(x) < 2.0


def test_rank_zero_and_constant_inputs_follow_the_documented_policy():
    zeros = torch.zeros(50, 8)
    assert effective_rank(zeros) == 0.0
    assert pca_dims(zeros) == 0
    assert alpha_req(zeros) == math.inf
    constant = torch.ones(50, 8) * torch.arange(8.0)
    assert effective_rank(constant) == pytest.approx(1.0)
    assert effective_rank(constant, center=True) == 0.0
    assert pca_dims(constant) == 0
    rank_one = torch.randn(50, 1) * torch.randn(1, 8)
    assert alpha_req(rank_one) == math.inf


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.3])
def test_alpha_req_recovers_the_exponent_of_a_power_law_spectrum(alpha):
    index = torch.arange(1, 31, dtype=torch.float64)
    # Covariance eigenvalues are sigma^2 / (n - 1): lambda_i ~ i^-alpha needs sigma ~ i^-alpha/2.
    x = matrix_with_spectrum(500, 60, index ** (-alpha / 2), centred=True)
    assert alpha_req(x) == pytest.approx(alpha, rel=1e-6)
    assert alpha_req(x.float()) == pytest.approx(alpha, rel=1e-3)


def test_alpha_req_of_a_flat_spectrum_is_zero():
    x = matrix_with_spectrum(300, 30, torch.ones(12), centred=True)
    assert alpha_req(x) == pytest.approx(0.0, abs=1e-6)


def test_pca_dims_counts_components_for_the_variance_fraction():
    x = matrix_with_spectrum(300, 40, torch.ones(10), centred=True)
    assert pca_dims(x, 0.9) == 9
    assert pca_dims(x, 0.99) == 10
    # Variances 16, 4, 1: 16/21 = 0.76, 20/21 = 0.95.
    y = matrix_with_spectrum(300, 40, torch.tensor([4.0, 2.0, 1.0]), centred=True)
    assert [pca_dims(y, v) for v in (0.5, 0.9, 0.96, 1.0)] == [1, 2, 3, 3]


def test_large_float32_input_is_accumulated_in_chunks_to_float64_accuracy():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10000, 16, generator=g) * torch.linspace(0.1, 3.0, 16)
    want = torch.linalg.svdvals(x.double())
    torch.testing.assert_close(singular_values(x), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.randn(5), r"2-D \(N, D\) matrix"),
        (torch.empty(0, 4), "empty"),
        (torch.tensor([[1.0, float("nan")]]), "NaN or inf"),
    ],
)
def test_malformed_input_is_a_value_error(x, message):
    for metric in (effective_rank, alpha_req, pca_dims):
        with pytest.raises(ValueError, match=message):
            metric(x)


def test_pca_dims_refuses_a_fraction_outside_zero_one():
    with pytest.raises(ValueError, match=r"variance must be in \(0, 1\]"):
        pca_dims(torch.randn(10, 3), 1.5)
