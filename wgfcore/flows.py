"""Numerical checks that diffusion's forward and reverse processes are Wasserstein gradient flows.

ALGORITHMS §1 (Theorem 1): the particle ODE dx/dt = -beta(t) (grad log mu_t(x) - grad log pi(x))
of the accelerated WGF of KL(.||pi) has the forward SDE's marginals mu_t. ALGORITHMS §2
(Theorem 2 and the §6.2 family): the reverse dynamics with any a >= 0 carry mu_1 back to the data
law. For Gaussian data mu_t is known in closed form, so both statements become measurable.

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
from .sample import TorchSteps, reverse_sde
from .scores import GaussianMixture
from .sde import VPSDE, _bcast


def wgf_velocity(x: torch.Tensor, t, score: torch.Tensor, sde: VPSDE) -> torch.Tensor:
    """Velocity of the accelerated WGF of KL(.||pi), pi = N(0, I): -beta (grad log mu_t + x)."""
    return -_bcast(sde.beta(t), x) * (score + x)


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
    """Euler-Maruyama on the forward SDE dx = -beta x dt + sqrt(2 beta) dw (float64)."""
    sde = sde or VPSDE()
    ts = torch.linspace(0.0, t_end, steps + 1, dtype=torch.float64)
    x = x0.to(torch.float64)
    for i in range(steps):
        h = float(ts[i + 1] - ts[i])
        b = float(sde.beta(ts[i]))
        z = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        x = x - b * x * h + (2.0 * b * h) ** 0.5 * z
    return x


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
    x = reverse_sde(data.score_fn(sde), x1, ts, a=a, sde=sde, denoise_last=False, steps=TorchSteps(g))
    return _check(x, *sde.gaussian_marginal(data.means[0], data.covs[0], eps))


def moment_tolerance(cov_true: np.ndarray, n: int, z: float = 5.0) -> tuple[float, float]:
    """z-sigma sampling bounds for the max-abs error of a sample mean and sample covariance of n
    Gaussian draws: sd(mean_i) = sqrt(S_ii / n), sd(S_ij) = sqrt((S_ii S_jj + S_ij^2) / n)."""
    S = np.asarray(cov_true, np.float64)
    d = np.diag(S)
    return z * float(np.sqrt(d.max() / n)), z * float(np.sqrt(((np.outer(d, d) + S ** 2) / n).max()))


__all__ = ["wgf_velocity", "forward_wgf_particles", "forward_sde_particles", "moment_matched_normal",
           "FlowCheck", "check_theorem1", "check_theorem2", "moment_tolerance"]
