"""Numerical checks that diffusion's forward and reverse processes are Wasserstein gradient flows.

ALGORITHMS §1 (Theorem 1): the particle ODE dx/dt = -beta(t) (grad log mu_t(x) - grad log pi(x))
of the accelerated WGF of KL(.||pi) has the forward SDE's marginals mu_t. ALGORITHMS §2
(Theorem 2 and the §6.2 family): the reverse dynamics with any a >= 0 carry mu_1 back to the data
law. For Gaussian data mu_t is known in closed form, so both statements become measurable.

Beyond Gaussians (`dissipation_check`): for Gaussian-mixture data every mu_t is a mixture with an
exact density and score (`wgfcore.scores`), so the energy-dissipation identity of the gradient flow,

    d/dt KL(mu_t || pi) = -beta(t) int |grad log(mu_t / pi)|^2 dmu_t        (beta = b/2, ALGORITHMS §1)

can be checked by quadrature: the left side by a central difference in t of the quadrature KL, the
right side directly, and both against int <grad log(mu_t/pi), v_t> dmu_t, where v_t is the
Fokker-Planck velocity of the library's own dynamics (`VPSDE.forward_drift` / `diffusion`, and
`reverse_drift` / `reverse_diffusion` of the §6.2 family in reverse time, where the same identity
holds with the opposite sign: the reverse flow ascends KL). In 1-D the deterministic flows are
monotone maps, so a particle started at the u-quantile of mu_s must land on the u-quantile of mu_t
(`GaussianMixture.icdf`): a check with no sampling noise at all.

`moment_matched_normal` draws samples whose sample mean and covariance equal the target's
exactly; pushed through a deterministic affine flow (the Gaussian case), the samples' moments
then carry only discretisation error, which lets the ODE checks be tight without huge n.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .metrics import gaussian_fit, w2_gaussian
from .ops import time_grid
from .ops import TorchSteps
from .sample import reverse_sde
from .scores import GaussianMixture
from .sde import VPSDE, bcast


def wgf_velocity(x: torch.Tensor, t, score: torch.Tensor, sde: VPSDE) -> torch.Tensor:
    """Velocity of the accelerated WGF of KL(.||pi), pi = N(0, I): -beta (grad log mu_t + x)."""
    return -bcast(sde.beta(t), x) * (score + x)


def forward_wgf_particles(x0: torch.Tensor, t_end: float, score_fn, sde: VPSDE | None = None,
                          steps: int = 200, t_start: float = 0.0) -> torch.Tensor:
    """Integrate the Theorem 1 particle ODE from t_start to t_end with Heun's method (float64)."""
    sde = sde or VPSDE()
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start < t_end <= 1, got {t_start}, {t_end}")
    ts = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    x = x0.to(torch.float64)
    B = x.shape[0]
    for i in range(steps):
        t0, t1 = ts[i].expand(B), ts[i + 1].expand(B)
        h = float(ts[i + 1] - ts[i])
        v0 = wgf_velocity(x, t0, score_fn(x, t0), sde)
        xp = x + h * v0
        v1 = wgf_velocity(xp, t1, score_fn(xp, t1), sde)
        x = x + 0.5 * h * (v0 + v1)
    return x


def forward_sde_particles(x0: torch.Tensor, t_end: float, sde: VPSDE | None = None, steps: int = 1000,
                          generator=None) -> torch.Tensor:
    """Euler-Maruyama on the forward SDE dx = forward_drift dt + diffusion dw (float64), from t = 0.

    Uses `sde.forward_drift` and `sde.diffusion`, so the check that its particles have the marginals
    mu_t (the same as Theorem 1's deterministic flow) tests those two functions.
    """
    sde = sde or VPSDE()
    if not 0.0 < t_end <= 1.0:
        raise ValueError(f"need 0 < t_end <= 1, got {t_end}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    ts = torch.linspace(0.0, t_end, int(steps) + 1, dtype=torch.float64)
    x = x0.to(torch.float64)
    for i in range(int(steps)):
        h = float(ts[i + 1] - ts[i])
        z = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        x = x + h * sde.forward_drift(x, ts[i]) + (h ** 0.5) * float(sde.diffusion(ts[i])) * z
    return x


def grid_quadrature(d: int, lim: float, n: int) -> tuple[torch.Tensor, float]:
    """Nodes of the n^d tensor grid on [-lim, lim]^d and the trapezoid weight h^d (float64).

    For integrands that are smooth and negligible at the box's edge (Gaussian mixtures whose widths
    are many grid steps) the trapezoid rule is spectrally accurate, so halving n measures the error.
    """
    if d not in (1, 2):
        raise ValueError(f"grid quadrature is for d = 1 or 2, got d = {d}")
    u = torch.linspace(-lim, lim, n, dtype=torch.float64)
    x = u[:, None] if d == 1 else torch.cartesian_prod(u, u)
    return x, float(u[1] - u[0]) ** d


def kl_to_prior(mix: GaussianMixture, t: float, sde: VPSDE | None = None, lim: float = 8.0, n: int = 321) -> float:
    """KL(mu_t || N(0, I)) by grid quadrature (d = 1 or 2)."""
    sde = sde or VPSDE()
    x, w = grid_quadrature(mix.d, lim, n)
    logp = mix.log_prob(x, t, sde)
    logpi = -0.5 * (x * x).sum(1) - 0.5 * mix.d * np.log(2 * np.pi)
    return float(w * (logp.exp() * (logp - logpi)).sum())


def dissipation_check(mix: GaussianMixture, t: float, sde: VPSDE | None = None, *, dynamics: VPSDE | None = None,
                      a_values=(0.0, 0.5, 1.0), lim: float = 8.0, n: int = 321, h: float = 1e-3,
                      derivative: bool = True) -> dict:
    """The energy-dissipation identity at time t, three ways, by quadrature (see the module doc).

    mu_t is the closed-form marginal of `mix` under `sde` (its alpha_t, sigma_t). `dynamics` (default
    `sde`) supplies the claimed dissipation rate beta(t) and the drift and noise whose Fokker-Planck
    velocity is integrated; a perturbed `dynamics` must break the identity. Returns
      dkl_dt        central difference of KL(mu_t || pi), Richardson-extrapolated from steps h and 2h
                    (error O(h^4)); skipped with derivative=False,
      dkl_dt_err    |that - the same extrapolation from steps 2h and 4h|, an upper estimate of its error,
      quad_err      change of -beta Fisher when the grid is coarsened to (n + 1)/2 points per axis,
      minus_beta_fisher = -beta(t) int |grad log(mu_t / pi)|^2 dmu_t,
      forward_velocity  = int <grad log(mu_t/pi), forward_drift - g^2/2 grad log mu_t> dmu_t,
      reverse_velocity  = {a: int <grad log(mu_t/pi), reverse_drift(a) - g_a^2/2 grad log mu_t> dmu_t},
                          the rate d/dtau KL in reverse time tau = 1 - t (should equal -dkl_dt).
    """
    sde = sde or VPSDE()
    dyn = dynamics or sde
    if not 4 * h < t < 1 - 4 * h:
        raise ValueError(f"need 4h < t < 1 - 4h, got t={t}, h={h}")

    def terms(n_pts):
        x, w = grid_quadrature(mix.d, lim, n_pts)
        tt = torch.full((len(x),), float(t), dtype=torch.float64)
        p = mix.log_prob(x, tt, sde).exp()
        s = mix.score(x, tt, sde)
        rel = s + x  # grad log(mu_t / pi), pi = N(0, I)
        g2 = dyn.diffusion(tt)[:, None] ** 2
        out = {"minus_beta_fisher": -float(dyn.beta(t)) * float(w * (p * (rel * rel).sum(1)).sum()),
               "forward_velocity": float(w * (p * (rel * (dyn.forward_drift(x, tt) - 0.5 * g2 * s)).sum(1)).sum())}
        out["reverse_velocity"] = {}
        for a in a_values:
            ga2 = dyn.reverse_diffusion(tt, a)[:, None] ** 2
            v = dyn.reverse_drift(x, tt, s, a) - 0.5 * ga2 * s
            out["reverse_velocity"][a] = float(w * (p * (rel * v).sum(1)).sum())
        return out

    res = terms(n)
    res["quad_err"] = abs(res["minus_beta_fisher"] - terms((n + 1) // 2)["minus_beta_fisher"])
    if not derivative:
        return res
    kl = {k: kl_to_prior(mix, t + k * h, sde, lim, n) for k in (-4, -2, -1, 1, 2, 4)}
    c = {k: (kl[k] - kl[-k]) / (2 * k * h) for k in (1, 2, 4)}
    r1, r2 = (4 * c[1] - c[2]) / 3, (4 * c[2] - c[4]) / 3  # Richardson: the O(h^2) terms cancel
    res["dkl_dt"], res["dkl_dt_err"] = r1, abs(r1 - r2)
    return res


def monotone_map_check(mix: GaussianMixture, u: torch.Tensor, x_end: torch.Tensor, t_end: float,
                       sde: VPSDE | None = None) -> float:
    """max |x_end - F_{t_end}^{-1}(u)| for 1-D particles started at the u-quantiles of some mu_s and
    carried by a deterministic flow with marginals mu_t (the flow map of 1-D marginals is monotone)."""
    return float((x_end.reshape(-1).to(torch.float64) - mix.icdf(u, t_end, sde).reshape(-1)).abs().max())


def ks_distance(mix: GaussianMixture, x: torch.Tensor, t: float, sde: VPSDE | None = None) -> float:
    """Kolmogorov-Smirnov distance between 1-D samples and mu_t."""
    xs = torch.sort(x.reshape(-1).to(torch.float64)).values
    F = mix.cdf(xs, t, sde)
    n = len(xs)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - F, F - (i - 1) / n).max())


def ks_critical(n: int, alpha: float) -> float:
    """Asymptotic Kolmogorov critical value: P(sqrt(n) D > c) <= 2 exp(-2 c^2) = alpha."""
    return float(np.sqrt(-0.5 * np.log(alpha / 2) / n))


def moment_matched_normal(n: int, mean, cov, generator=None) -> torch.Tensor:
    """n samples (float64) whose sample mean and (unbiased) sample covariance equal mean and cov exactly."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    d = mean.numel()
    if n <= d:
        raise ValueError(f"need n > d to match a covariance, got n={n}, d={d}")
    z = torch.randn(n, d, generator=generator, dtype=torch.float64)
    z = z - z.mean(0)
    L = torch.linalg.cholesky(torch.cov(z.T).reshape(d, d))
    z = torch.linalg.solve_triangular(L, z.T, upper=False).T  # sample covariance now exactly I
    w, V = torch.linalg.eigh(cov)
    root = (V * w.clamp_min(0).sqrt()) @ V.T
    return mean + z @ root


@dataclass
class FlowCheck:
    """Moments of the simulated particles next to the closed form, and their Bures W2."""

    mean: np.ndarray
    cov: np.ndarray
    mean_true: np.ndarray
    cov_true: np.ndarray
    w2: float
    n: int

    @property
    def mean_err(self) -> float:
        return float(np.max(np.abs(self.mean - self.mean_true)))

    @property
    def cov_err(self) -> float:
        return float(np.max(np.abs(self.cov - self.cov_true)))


def _check(x: torch.Tensor, m_true, S_true) -> FlowCheck:
    m, S = gaussian_fit(x)
    m_true, S_true = np.asarray(m_true, np.float64), np.asarray(S_true, np.float64)
    return FlowCheck(m, S, m_true, S_true, w2_gaussian(m, S, m_true, S_true), len(x))


def check_theorem1(mean, cov, t_end: float = 0.5, n: int = 2000, steps: int = 200, sde: VPSDE | None = None,
                   seed: int = 0, moment_matched: bool = True) -> FlowCheck:
    """Push N(mean, cov) samples through the Theorem 1 particle ODE (analytic score of mu_t) to t_end
    and compare their moments with mu_t = N(alpha m, alpha^2 S + sigma^2 I)."""
    sde = sde or VPSDE()
    g = torch.Generator().manual_seed(seed)
    data = GaussianMixture(torch.as_tensor(mean, dtype=torch.float64)[None],
                           torch.as_tensor(cov, dtype=torch.float64)[None])
    x0 = moment_matched_normal(n, mean, cov, g) if moment_matched else data.sample(n, g)
    x = forward_wgf_particles(x0, t_end, data.score_fn(sde), sde, steps)
    return _check(x, *sde.gaussian_marginal(data.means[0], data.covs[0], t_end))


def check_theorem2(mean, cov, a: float, n: int = 4000, steps: int = 1000, eps: float = 1e-3,
                   sde: VPSDE | None = None, seed: int = 0, moment_matched: bool = True) -> FlowCheck:
    """Start from mu_1 exactly, run the §6.2 reverse family with parameter a (analytic score) down to
    t = eps, and compare the particles' moments with the closed-form mu_eps (the data law, blurred
    by sigma_eps ~ 0.01)."""
    sde = sde or VPSDE()
    g = torch.Generator().manual_seed(seed)
    data = GaussianMixture(torch.as_tensor(mean, dtype=torch.float64)[None],
                           torch.as_tensor(cov, dtype=torch.float64)[None])
    m1, S1 = sde.gaussian_marginal(data.means[0], data.covs[0], 1.0)
    x1 = moment_matched_normal(n, m1, S1, g) if moment_matched else \
        GaussianMixture(m1[None], S1[None]).sample(n, g)
    ts = time_grid(steps, eps)
    x = reverse_sde(data.score_fn(sde), x1, ts, a=a, sde=sde, denoise_last=False, step_backend=TorchSteps(g))
    return _check(x, *sde.gaussian_marginal(data.means[0], data.covs[0], eps))


def moment_tolerance(cov_true: np.ndarray, n: int, z: float = 5.0) -> tuple[float, float]:
    """z-sigma sampling bounds for the max-abs error of a sample mean and sample covariance of n
    Gaussian draws: sd(mean_i) = sqrt(S_ii / n), sd(S_ij) = sqrt((S_ii S_jj + S_ij^2) / n)."""
    S = np.asarray(cov_true, np.float64)
    d = np.diag(S)
    return z * float(np.sqrt(d.max() / n)), z * float(np.sqrt(((np.outer(d, d) + S ** 2) / n).max()))


__all__ = ["wgf_velocity", "forward_wgf_particles", "forward_sde_particles", "moment_matched_normal",
           "grid_quadrature", "kl_to_prior", "dissipation_check", "monotone_map_check", "ks_distance", "ks_critical",
           "FlowCheck", "check_theorem1", "check_theorem2", "moment_tolerance"]
