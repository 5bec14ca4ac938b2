"""The empirical optimal denoiser D* (mean shift, ALGORITHMS §5) and the scores it defines."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wgfcore.denoisers import auto_chunk, optimal_denoiser, optimal_score, optimal_vp_denoiser, optimal_vp_score
from wgfcore.sde import VPSDE



def naive(x, sigma, data):
    """Reference: the full (B, M) softmax of -|x - y|^2 / 2 sigma^2 in float64, no streaming."""
    X, Y = x.reshape(len(x), -1).double(), data.reshape(len(data), -1).double()
    s = torch.as_tensor(sigma, dtype=torch.float64)
    s = s[:, None] if s.ndim == 1 else s
    w = torch.softmax(-torch.cdist(X, Y, compute_mode="donot_use_mm_for_euclid_dist") ** 2 / (2 * s * s), dim=1)
    return (w @ Y).reshape(x.shape)


def test_small_sigma_returns_the_training_point():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(200, 3, 4, generator=g, dtype=torch.float64)
    spacing = torch.pdist(data.flatten(1)).min()
    # sigma = spacing / 20: every other weight is below exp(-200), far under float64 resolution.
    D = optimal_denoiser(data[:17], float(spacing) / 20, data, chunk=33)
    assert torch.equal(D, data[:17]) or (D - data[:17]).abs().max() < 1e-13


def test_large_sigma_gives_mean_to_first_order():
    # Expanding the softmax in 1/sigma^2 with c_i = y_i - mean and logits (x - mean).c_i - |c_i|^2 / 2:
    # D* = mean + (Cov (x - mean) - E[c |c|^2] / 2) / sigma^2 + O(sigma^-4), moments over the data (1/M).
    # The test checks the limit, the first-order term, and that what is left really is O(sigma^-4).
    g = torch.Generator().manual_seed(1)
    data = torch.randn(500, 6, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, 6, dtype=torch.float64)
    x = 3 * torch.randn(8, 6, generator=g, dtype=torch.float64)
    mean = data.mean(0)
    c = data - mean
    cov = c.T @ c / len(data)
    third = (c * (c * c).sum(1, keepdim=True)).mean(0)
    rem = {}
    for sigma in (1e2, 1e3):
        D = optimal_denoiser(x, sigma, data, chunk=64)
        first = ((x - mean) @ cov - 0.5 * third) / sigma ** 2
        rem[sigma] = float((D - mean - first).abs().max())
        assert rem[sigma] < 1e-3 * float(first.abs().max())
    assert 0.9e4 < rem[1e2] / rem[1e3] < 1.1e4  # sigma x 10 -> remainder / 1e4
    assert (optimal_denoiser(x, 1e6, data) - mean).abs().max() < 1e-10


@settings(max_examples=15)
@given(B=st.integers(1, 6), M=st.integers(1, 90), feat=st.sampled_from([(2,), (5,), (2, 3), (1, 2, 2)]),
       chunk=st.one_of(st.none(), st.integers(1, 100)), log_sigma=st.floats(-1.5, 1.5),
       per_sample=st.booleans(), seed=st.integers(0, 2**16))
def test_chunked_matches_unchunked(B, M, feat, chunk, log_sigma, per_sample, seed):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(M, *feat, generator=g, dtype=torch.float64)
    x = 2 * torch.randn(B, *feat, generator=g, dtype=torch.float64)
    sigma = 10 ** log_sigma * (torch.rand(B, generator=g, dtype=torch.float64) + 0.5 if per_sample else 1.0)
    ref = naive(x, sigma, data)
    D = optimal_denoiser(x, sigma, data, chunk=chunk)
    full = optimal_denoiser(x, sigma, data, chunk=M)
    assert D.shape == x.shape and D.dtype == x.dtype
    # float64 throughout: differences are rounding, |D| <~ 5, so 1e-12 is ~1e4 ulp of headroom
    assert (D - ref).abs().max() < 1e-12
    assert (D - full).abs().max() < 1e-12


def test_float32_compute_is_as_accurate_as_torch_softmax():
    # Flash-attention-style tolerance (ARCHITECTURE): the streamed float32 path may be at most ~2x as
    # wrong as PyTorch's own float32 softmax(cdist), both measured against the float64 result.
    # Image-like data (|y|^2 ~ 64) at small sigma is where the logits are large.
    g = torch.Generator().manual_seed(2)
    data = torch.rand(400, 64, generator=g) * 2 - 1
    x = data[:16] + 0.05 * torch.randn(16, 64, generator=g)
    for sigma in (0.05, 0.3, 2.0):
        ref = naive(x.double(), sigma, data.double())
        X = x.float()
        w = torch.softmax(-torch.cdist(X, data) ** 2 / (2 * sigma ** 2), dim=1)
        err_torch = ((w @ data).double() - ref).abs().max()
        ours = optimal_denoiser(x, sigma, data, chunk=37, compute_dtype=torch.float32)
        err_ours = (ours.double() - ref).abs().max()
        # + 1e-6 (~16 float32 ulps of |D| <= 1): at small sigma the weights are one-hot and torch's error is
        # exactly 0, ours the float32 rounding of the output (measured 6e-8; 3.1e-7 vs 4.6e-7 at sigma = 2)
        assert err_ours <= 2 * err_torch + 1e-6, (sigma, float(err_ours), float(err_torch))


def test_memory_budget_sets_chunk_and_keeps_result():
    g = torch.Generator().manual_seed(3)
    data = torch.randn(1000, 16, generator=g, dtype=torch.float64)
    x = torch.randn(4, 16, generator=g, dtype=torch.float64)
    c = auto_chunk(4, 16, 1000, 8, memory_budget=8 * 1024)
    assert c == 8 * 1024 // (8 * (2 * 16 + 2 * 4)) and c < 1000
    small = optimal_denoiser(x, 0.7, data, memory_budget=8 * 1024)
    assert (small - naive(x, 0.7, data)).abs().max() < 1e-12


def test_score_is_the_gradient_of_the_log_density():
    # VE: p_sigma = mean_i N(x; y_i, sigma^2 I); VP: mean_i N(x; alpha_t y_i, sigma_t^2 I). Autograd of
    # the log-density is an independent route to the score.
    g = torch.Generator().manual_seed(4)
    data = torch.randn(50, 3, generator=g, dtype=torch.float64)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    sigma = 0.6
    logp = torch.logsumexp(-torch.cdist(x, data) ** 2 / (2 * sigma ** 2), dim=1).sum()
    (grad,) = torch.autograd.grad(logp, x)
    assert (optimal_score(data, chunk=7)(x.detach(), sigma) - grad).abs().max() < 1e-12

    sde = VPSDE()
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype=torch.float64)
    a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    xv = (a * x.detach()).requires_grad_(True)
    d2 = ((xv[:, None, :] - a[:, :, None] * data[None]) ** 2).sum(-1)
    logp = torch.logsumexp(-d2 / (2 * s * s), dim=1).sum()
    (grad,) = torch.autograd.grad(logp, xv)
    got = optimal_vp_score(data, sde, chunk=9)(xv.detach(), t)
    assert (got - grad).abs().max() < 1e-9 * grad.abs().max()
    # and the VP posterior mean is D* at the mapped noise level (Tweedie, ALGORITHMS §5)
    Dvp = optimal_vp_denoiser(data, sde)(xv.detach(), t)
    assert (Dvp - (xv.detach() + s * s * got) / a).abs().max() < 1e-10


def test_data_may_live_elsewhere_and_dtype_is_kept():
    g = torch.Generator().manual_seed(5)
    data = torch.randn(30, 2, generator=g)  # float32 data, float16 queries
    x = torch.randn(3, 2, generator=g).half()
    D = optimal_denoiser(x, 0.5, data)
    assert D.dtype == torch.float16
    assert (D.double() - naive(x.double(), 0.5, data.double())).abs().max() < 2e-3  # float16 output rounding


def test_errors_are_clear():
    data = torch.randn(10, 4)
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="feature shape"):
        optimal_denoiser(torch.randn(3, 5), 1.0, data)
    with pytest.raises(ValueError, match="feature shape"):
        optimal_denoiser(torch.randn(3, 2, 2), 1.0, data)
    for bad in (0.0, -1.0, torch.tensor([1.0, 0.0, 1.0]), float("nan")):
        with pytest.raises(ValueError, match="sigma must be > 0"):
            optimal_denoiser(x, bad, data)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        optimal_denoiser(x, torch.ones(4), data)
    with pytest.raises(ValueError, match="chunk"):
        optimal_denoiser(x, 1.0, data, chunk=0)
    with pytest.raises(ValueError, match="data must be"):
        optimal_denoiser(x, 1.0, torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        optimal_denoiser(x, 1.0, torch.ones(10, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be"):
        optimal_denoiser(torch.randn(4), 1.0, data)
    assert math.isfinite(float(optimal_denoiser(x, 1e-4, data).abs().max()))  # tiny sigma: no overflow
