"""Kwon et al.'s score-matching objective J against the analytic mixture score (ALGORITHMS §6)."""
import math

import pytest
import torch

from wgfcore.bounds import score_matching_objective
from wgfcore.scores import kwon_mixture
from wgfcore.sde import VPSDE



SDE, MIX = VPSDE(), kwon_mixture()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_analytic_score_gives_zero():
    J, se = score_matching_objective(MIX.score_fn(SDE), MIX, SDE, n_t=64, n_x=64, generator=gen(),
                                     dtype=torch.float64)
    assert J == 0.0 and se == 0.0
    # in float32 the model's output is the float32 rounding of the truth: |err| ~ 1e-7 |s|, and
    # lambda |s|^2 = sigma_t^2 |s|^2 ~ d, so J ~ 1e-14
    J32, _ = score_matching_objective(MIX.score_fn(SDE), MIX, SDE, n_t=64, n_x=64, generator=gen())
    assert 0.0 <= J32 < 1e-11


@pytest.mark.parametrize("lam", ["sigma2", "g2"])
def test_constant_offset_matches_closed_form(lam):
    # s_theta = s + b makes the integrand lambda(t) |b|^2 for every x, so J = |b|^2 / 2 int_eps^T lambda dt:
    # for g2 the integral is 2 (B(T) - B(eps)), B = int beta; for sigma2, int (1 - exp(-2 B)) by
    # Simpson's rule on 2001 points (error ~1e-12). Monte Carlo over t only: within 4 standard errors.
    b = torch.tensor([0.3, -0.4], dtype=torch.float64)
    eps, T = 1e-3, 1.0
    if lam == "g2":
        integral = float(2 * (SDE.int_beta(T) - SDE.int_beta(eps)))
    else:
        t = torch.linspace(eps, T, 2001, dtype=torch.float64)
        f = SDE.sigma(t) ** 2
        h = (T - eps) / 2000
        integral = float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))
    exact = 0.5 * float(b @ b) * integral
    J, se = score_matching_objective(lambda x, t: MIX.score(x, t, SDE) + b, MIX, SDE, n_t=400, n_x=8, lam=lam,
                                     eps=eps, T=T, generator=gen(1), dtype=torch.float64)
    assert 0 < se < 0.1 * exact
    assert abs(J - exact) < 4 * se, (J, exact, se)


def test_grows_quadratically_with_the_perturbation():
    # With the same random draws, s_theta = s + c v gives J(c) = c^2 J(1) up to rounding: monotone in c.
    def v(x, t):
        return torch.stack([torch.sin(3 * x[:, 1]), x[:, 0] * t], dim=1)

    Js = []
    for c in (0.03, 0.1, 0.3, 1.0, 3.0):
        J, _ = score_matching_objective(lambda x, t, c=c: MIX.score(x, t, SDE) + c * v(x, t), MIX, SDE,
                                        n_t=32, n_x=32, generator=gen(2), dtype=torch.float64)
        Js.append((c, J))
    assert all(a[1] < b[1] for a, b in zip(Js[:-1], Js[1:]))
    J1 = dict(Js)[1.0]
    assert J1 > 0
    for c, J in Js:
        assert math.isclose(J, c * c * J1, rel_tol=1e-10)


def test_input_checks():
    good = MIX.score_fn(SDE)
    with pytest.raises(ValueError, match="lam"):
        score_matching_objective(good, MIX, SDE, lam="unit")
    with pytest.raises(ValueError, match="n_t"):
        score_matching_objective(good, MIX, SDE, n_t=1)
    with pytest.raises(ValueError, match="eps"):
        score_matching_objective(good, MIX, SDE, eps=1.0)
    with pytest.raises(ValueError, match="score_fn returned"):
        score_matching_objective(lambda x, t: x[:, :1], MIX, SDE, n_t=4, n_x=4)
    # a callable weight is used as given: lambda = 1 with s + b gives |b|^2 (T - eps) / 2 exactly
    J, se = score_matching_objective(lambda x, t: MIX.score(x, t, SDE) + 1.0, MIX, SDE, n_t=4, n_x=4,
                                     lam=lambda t: torch.ones_like(t), generator=gen(), dtype=torch.float64)
    assert math.isclose(J, 0.5 * 2 * (1 - 1e-3), rel_tol=1e-12) and se < 1e-12
