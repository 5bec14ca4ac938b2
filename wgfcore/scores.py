"""Exact scores of every VP marginal of Gaussian and Gaussian-mixture data (ALGORITHMS §1, §6).

For data sum_k w_k N(m_k, S_k), the VP marginal at time t is sum_k w_k N(alpha_t m_k,
alpha_t^2 S_k + sigma_t^2 I). Each S_k is eigendecomposed once (S_k = U diag(lam) U^T), so the
marginal covariance at any per-sample time costs O(d^2) to apply, in float64. These scores let
samplers be studied with no training error at all.
"""
from __future__ import annotations

import math

import torch

from .sde import VPSDE, as_time, tweedie


class GaussianMixture:
    """A mixture of K Gaussians in R^d (K = 1 is a plain Gaussian), held in float64."""

    def __init__(self, means, covs=None, weights=None, stds=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        K, d = means.shape
        if (covs is None) == (stds is None):
            raise ValueError("give exactly one of covs (K, d, d) or stds (K,) / scalar")
        if covs is None:
            stds = torch.as_tensor(stds, dtype=torch.float64).expand(K)
            covs = stds[:, None, None] ** 2 * torch.eye(d, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape (K, d, d) = ({K}, {d}, {d}), got {tuple(covs.shape)}")
        weights = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-9:
            raise ValueError("weights must be K non-negative numbers summing to 1")
        self.means, self.covs, self.weights = means, 0.5 * (covs + covs.transpose(1, 2)), weights
        self.lam, self.U = torch.linalg.eigh(self.covs)
        if (self.lam < -1e-12).any():
            raise ValueError("covariances must be positive semi-definite")
        self.lam = self.lam.clamp_min(0.0)
        self.K, self.d = K, d

    # --- data law -------------------------------------------------------------------------
    def sample(self, n: int, generator=None) -> torch.Tensor:
        """n draws (float64, shape (n, d))."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        root = self.U * self.lam.sqrt()[:, None, :]  # U diag(sqrt lam): a square root of S_k
        return self.means[k] + torch.einsum("nij,nj->ni", root[k], z)

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self) -> torch.Tensor:
        m = self.mean()
        dm = self.means - m
        return (self.weights[:, None, None] * (self.covs + dm[:, :, None] * dm[:, None, :])).sum(0)

    def marginal(self, t, sde: VPSDE | None = None) -> "GaussianMixture":
        """The VP marginal mu_t as a mixture (scalar t)."""
        sde = sde or VPSDE()
        a, s = float(sde.alpha(t)), float(sde.sigma(t))
        return GaussianMixture(a * self.means, a * a * self.covs + s * s * torch.eye(self.d, dtype=torch.float64),
                               self.weights)

    # --- score and density at every VP time -----------------------------------------------
    def _terms(self, x: torch.Tensor, t, sde: VPSDE):
        B = x.shape[0]
        xf = x.reshape(B, -1).to(torch.float64)
        if xf.shape[1] != self.d:
            raise ValueError(f"x has {xf.shape[1]} features per sample, the mixture has d = {self.d}")
        t = as_time(t).to(x.device)
        a = sde.alpha(t).to(x.device).expand(B)[:, None, None]
        s2 = (sde.sigma(t) ** 2).to(x.device).expand(B)[:, None, None]
        U, lam = self.U.to(x.device), self.lam.to(x.device)
        r = xf[:, None, :] - a * self.means.to(x.device)[None]  # (B, K, d)
        y = torch.einsum("bkd,kde->bke", r, U)
        v = a * a * lam[None] + s2  # (B, K, d) eigenvalues of the marginal covariances
        logp_k = torch.log(self.weights.to(x.device))[None] - 0.5 * (y * y / v).sum(-1) \
            - 0.5 * torch.log(v).sum(-1) - 0.5 * self.d * math.log(2 * math.pi)
        return xf, U, y, v, logp_k

    def log_prob(self, x: torch.Tensor, t=0.0, sde: VPSDE | None = None) -> torch.Tensor:
        """log mu_t(x) (float64, shape (B,)); t = 0 is the data law itself."""
        return torch.logsumexp(self._terms(x, t, sde or VPSDE())[-1], dim=1)

    def score(self, x: torch.Tensor, t, sde: VPSDE | None = None) -> torch.Tensor:
        """grad log mu_t(x), same shape and dtype as x; t scalar or (B,)."""
        xf, U, y, v, logp_k = self._terms(x, t, sde or VPSDE())
        gamma = torch.softmax(logp_k, dim=1)  # posterior component weights
        sk = -torch.einsum("bke,kde->bkd", y / v, U)
        return (gamma[..., None] * sk).sum(1).reshape(x.shape).to(x.dtype)

    def cdf(self, x: torch.Tensor, t=0.0, sde: VPSDE | None = None) -> torch.Tensor:
        """CDF of the 1-D marginal mu_t at x (float64; d = 1 only); t a scalar."""
        if self.d != 1:
            raise ValueError(f"cdf needs a 1-D mixture, this one has d = {self.d}")
        m = self.marginal(t, sde)
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, 1)
        z = (x - m.means[:, 0][None]) / m.covs[:, 0, 0].sqrt()[None]
        return (m.weights[None] * torch.special.ndtr(z)).sum(1)

    def icdf(self, u: torch.Tensor, t=0.0, sde: VPSDE | None = None, iters: int = 200) -> torch.Tensor:
        """Quantiles of the 1-D marginal mu_t (bisection to float64 resolution; d = 1 only)."""
        u = torch.as_tensor(u, dtype=torch.float64).flatten()
        if not bool(((u > 0) & (u < 1)).all()):
            raise ValueError("quantile levels must lie in (0, 1)")
        m = self.marginal(t, sde)
        sd = m.covs[:, 0, 0].sqrt()
        lo = torch.full_like(u, float((m.means[:, 0] - 40 * sd).min()))
        hi = torch.full_like(u, float((m.means[:, 0] + 40 * sd).max()))
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            below = m.cdf(mid) < u
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (0.5 * (lo + hi))[:, None]

    def score_fn(self, sde: VPSDE | None = None):
        """A `score_fn(x, t)` for `wgfcore.sample`."""
        sde = sde or VPSDE()
        return lambda x, t: self.score(x, t, sde)

    def denoiser(self, x: torch.Tensor, t, sde: VPSDE | None = None) -> torch.Tensor:
        """E[x_0 | x_t = x] by Tweedie: (x + sigma_t^2 score) / alpha_t."""
        sde = sde or VPSDE()
        return tweedie(x, self.score(x, t, sde), t, sde)


def gaussian(mean, cov) -> GaussianMixture:
    """A single Gaussian N(mean, cov) as a one-component mixture."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    return GaussianMixture(mean[None], torch.as_tensor(cov, dtype=torch.float64)[None])


def kwon_mixture() -> GaussianMixture:
    """Kwon et al.'s 2-D toy (ALGORITHMS §6): 4 Gaussians at (+-4, +-4), std 0.1, all scaled by 1/8."""
    c = torch.tensor([[4.0, 4.0], [4.0, -4.0], [-4.0, 4.0], [-4.0, -4.0]], dtype=torch.float64) / 8.0
    return GaussianMixture(c, stds=0.1 / 8.0)


__all__ = ["GaussianMixture", "gaussian", "kwon_mixture"]
