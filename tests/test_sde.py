"""VP/VE processes (ALGORITHMS §1, §5): schedule formulas, marginals, VP<->VE mapping, errors."""
import math

import pytest
import torch
from hypothesis import given, strategies as st
from scipy.integrate import quad

from wgfcore.sde import VESDE, VPSDE, karras_sigmas, ve_to_vp, vp_to_ve


@given(st.floats(0.0, 1.0))
def test_alpha_is_exp_of_integrated_beta(t):
    sde = VPSDE()
    integral, _ = quad(lambda u: float(sde.beta(u)), 0.0, t, epsabs=1e-13)
    assert float(sde.alpha(t)) == pytest.approx(math.exp(-integral), rel=1e-12, abs=1e-15)
    assert float(sde.alpha(t) ** 2 + sde.sigma(t) ** 2) == pytest.approx(1.0, abs=1e-14)


def test_beta_is_half_song_b():
    sde = VPSDE()
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(sde.beta(t), 0.5 * (0.1 + t * 19.9))
    assert torch.allclose(sde.diffusion(t) ** 2, 2 * sde.beta(t))


def test_sigma_accurate_near_zero():
    # 1 - alpha^2 cancels catastrophically at t = 1e-8; expm1 keeps the leading order b_min t.
    sde = VPSDE()
    assert float(sde.sigma(1e-8)) == pytest.approx(math.sqrt(0.1 * 1e-8), rel=1e-6)


def test_time_shapes_and_marginal():
    sde = VPSDE()
    x0 = torch.randn(5, 3, 4)
    t = torch.rand(5)
    mean, std = sde.marginal(x0, t)
    assert mean.shape == x0.shape and std.shape == (5, 1, 1)
    assert torch.allclose(mean, sde.alpha(t).float().view(5, 1, 1) * x0)
    with pytest.raises(ValueError, match="shape"):
        sde.alpha(torch.zeros(2, 2))


def test_reverse_family_drift():
    sde = VPSDE()
    x, s, t = torch.randn(4, 2), torch.randn(4, 2), torch.rand(4)
    b = sde.beta(t).float()[:, None]
    assert torch.allclose(sde.reverse_drift(x, t, s, a=1.0), b * x + 2 * b * s)
    assert torch.allclose(sde.reverse_drift(x, t, s, a=0.0), b * x + b * s)
    assert float(sde.reverse_diffusion(0.3, a=0.0)) == 0.0
    with pytest.raises(ValueError, match="a >= 0"):
        sde.reverse_drift(x, t, s, a=-0.5)


@given(st.floats(1e-3, 1.0))
def test_vp_ve_roundtrip(t):
    sde = VPSDE()
    x = torch.randn(3, 2, dtype=torch.float64)
    x_ve, sig = vp_to_ve(x, t, sde)
    x_back, t_back = ve_to_vp(x_ve, sig, sde)
    assert float(t_back) == pytest.approx(t, rel=1e-9, abs=1e-12)
    assert torch.allclose(x_back, x, rtol=1e-9)


def test_karras_schedule():
    s = karras_sigmas(18)
    assert s.shape == (19,) and s[-1] == 0
    assert float(s[0]) == pytest.approx(80.0) and float(s[-2]) == pytest.approx(0.002)
    assert bool((s[1:] < s[:-1]).all())
    assert torch.equal(VESDE().schedule(18), s)
    with pytest.raises(ValueError):
        karras_sigmas(0)
    with pytest.raises(ValueError):
        VESDE(sigma_min=1.0, sigma_max=0.5)
