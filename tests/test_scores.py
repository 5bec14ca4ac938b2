"""Analytic scores (ALGORITHMS §1, §6): the score is the gradient of the marginal's log-density."""
import pytest
import torch
from hypothesis import given, strategies as st

from wgfcore.scores import GaussianMixture, gaussian, kwon_mixture
from wgfcore.sde import VPSDE


@given(K=st.integers(1, 4), d=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_score_is_grad_log_prob(K, d, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, d, d, generator=g, dtype=torch.float64)
    covs = A @ A.transpose(1, 2) / d + 0.05 * torch.eye(d, dtype=torch.float64)
    w = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    mix = GaussianMixture(torch.randn(K, d, generator=g, dtype=torch.float64), covs, w / w.sum())
    x = torch.randn(6, d, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(6, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(mix.log_prob(x, t).sum(), x)
    assert torch.allclose(mix.score(x, t), grad, rtol=1e-9, atol=1e-9)


def test_gaussian_score_closed_form():
    sde = VPSDE()
    m = torch.tensor([1.0, -2.0], dtype=torch.float64)
    S = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    x = torch.randn(7, 2, dtype=torch.float64)
    mt, St = sde.gaussian_marginal(m, S, 0.4)
    expected = -torch.linalg.solve(St, (x - mt).T).T
    assert torch.allclose(gaussian(m, S).score(x, 0.4, sde), expected, rtol=1e-12)


def test_images_shape_and_dtype():
    mix = GaussianMixture(torch.zeros(2, 12), stds=[0.5, 1.0])
    x = torch.randn(3, 3, 2, 2)
    s = mix.score(x, torch.full((3,), 0.5))
    assert s.shape == x.shape and s.dtype == x.dtype
    with pytest.raises(ValueError, match="features"):
        mix.score(torch.randn(3, 5), 0.5)


def test_kwon_mixture_and_sampling():
    mix = kwon_mixture()
    x = mix.sample(40_000, torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), torch.zeros(2, dtype=torch.float64), atol=5 * 0.5 / 200)
    # four modes at (+-0.5, +-0.5) with std 0.0125
    assert torch.allclose(x.abs().mean(0), torch.full((2,), 0.5, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(mix.cov(), torch.cov(x.T), atol=5e-3)


def test_bad_mixtures():
    with pytest.raises(ValueError):
        GaussianMixture(torch.zeros(2, 2))  # neither covs nor stds
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 2), stds=1.0, weights=[0.7, 0.7])


def test_cdf_and_icdf_of_a_1d_mixture():
    mix = GaussianMixture(torch.tensor([[-1.0], [0.5]], dtype=torch.float64), stds=[0.3, 0.6],
                          weights=[0.4, 0.6])
    sde = VPSDE()
    for t in (0.0, 0.3):
        # the CDF is the integral of the density (trapezoid on a fine grid: error ~1e-8)
        x = torch.linspace(-6, 6, 24001, dtype=torch.float64)[:, None]
        p = mix.log_prob(x, t, sde).exp()
        F_num = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(0.5 * (p[1:] + p[:-1]), 0) * 12 / 24000])
        assert torch.allclose(mix.cdf(x, t, sde), F_num, atol=1e-7)
        u = torch.tensor([1e-4, 0.1, 0.5, 0.77, 1 - 1e-4], dtype=torch.float64)
        assert torch.allclose(mix.cdf(mix.icdf(u, t, sde), t, sde), u, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="1-D"):
        kwon_mixture().cdf(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="quantile"):
        mix.icdf(torch.tensor([0.0]))
