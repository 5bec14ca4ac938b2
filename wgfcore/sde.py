"""Forward processes: the VP-SDE in the convention of Ghimire et al. and the VE/EDM process.

ALGORITHMS §1 (VP: beta = b/2, alpha, sigma, marginals, reverse family of §2) and §5 (VE/EDM,
Karras schedule, VP<->VE mapping), and the one home of each conversion between score, eps and
denoiser (Tweedie, eps <-> score, VE denoiser -> VP score). Time arguments are python floats or tensors of shape () or
(B,); schedule quantities are computed in float64 and returned as float64 tensors, because
alpha_t and sigma_t lose digits quickly in float32 near t = 0 and t = 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch



def as_time(t) -> torch.Tensor:
    """A time (or noise level) as a float64 tensor of shape () or (B,): a python number or a tensor."""
    if torch.is_tensor(t):
        if t.ndim > 1:
            raise ValueError(f"time must be a scalar or a tensor of shape (B,), got shape {tuple(t.shape)}")
        return t.to(torch.float64)
    return torch.tensor(float(t), dtype=torch.float64)


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample (B,) or scalar schedule value -> broadcastable against x (B, ...), in x's dtype."""
    v = v.to(device=x.device, dtype=x.dtype)
    return v.view(-1, *([1] * (x.ndim - 1))) if v.ndim == 1 else v


@dataclass(frozen=True)
class VPSDE:
    """dx = -beta(t) x dt + sqrt(2 beta(t)) dw, beta = b/2, b linear in t (ALGORITHMS §1).

    Identical to Song et al.'s VP-SDE with b_min=0.1, b_max=20; reference measure pi = N(0, I),
    so the drift is beta * grad log pi and g^2 = 2 beta.
    """

    b_min: float = 0.1
    b_max: float = 20.0

    def __post_init__(self):
        if not (0 <= self.b_min <= self.b_max):
            raise ValueError(f"need 0 <= b_min <= b_max, got b_min={self.b_min}, b_max={self.b_max}")

    # --- schedule -------------------------------------------------------------------------
    def b(self, t) -> torch.Tensor:
        t = as_time(t)
        return self.b_min + t * (self.b_max - self.b_min)

    def beta(self, t) -> torch.Tensor:
        """beta(t) = b(t) / 2 (the paper's convention)."""
        return 0.5 * self.b(t)

    def int_beta(self, t) -> torch.Tensor:
        """integral_0^t beta = 1/2 (b_min t + 1/2 t^2 (b_max - b_min))."""
        t = as_time(t)
        return 0.5 * (self.b_min * t + 0.5 * t * t * (self.b_max - self.b_min))

    def alpha(self, t) -> torch.Tensor:
        return torch.exp(-self.int_beta(t))

    def sigma(self, t) -> torch.Tensor:
        """sigma_t = sqrt(1 - alpha_t^2), via expm1 so that it stays accurate near t = 0."""
        return torch.sqrt(-torch.expm1(-2.0 * self.int_beta(t)))

    # --- marginals and prior --------------------------------------------------------------
    def marginal(self, x0: torch.Tensor, t):
        """Mean and std of x_t | x_0 ~ N(alpha_t x_0, sigma_t^2 I)."""
        return bcast(self.alpha(t), x0) * x0, bcast(self.sigma(t), x0)

    def perturb(self, x0: torch.Tensor, t, z: torch.Tensor | None = None, generator=None):
        """Draw x_t = alpha_t x_0 + sigma_t z; returns (x_t, z)."""
        if z is None:
            z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        mean, std = self.marginal(x0, t)
        return mean + std * z, z

    def prior_sampling(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """Sample pi = N(0, I), the law of x_1 up to alpha_1 ~ 4e-3."""
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def gaussian_marginal(self, m: torch.Tensor, S: torch.Tensor, t):
        """mu_t for data N(m, S): N(alpha_t m, alpha_t^2 S + sigma_t^2 I) (closed form, float64)."""
        a, s = float(self.alpha(t)), float(self.sigma(t))
        m = m.to(torch.float64)
        S = S.to(torch.float64)
        return a * m, a * a * S + s * s * torch.eye(S.shape[0], dtype=torch.float64)

    # --- forward and reverse dynamics -----------------------------------------------------
    def forward_drift(self, x: torch.Tensor, t) -> torch.Tensor:
        return -bcast(self.beta(t), x) * x

    def diffusion(self, t) -> torch.Tensor:
        return torch.sqrt(2.0 * self.beta(t))

    def reverse_drift(self, x: torch.Tensor, t, score: torch.Tensor, a: float = 1.0) -> torch.Tensor:
        """Drift in reverse time tau = 1 - t of the §6.2 family: beta x + (1 + a) beta s.

        a = 1 is the usual reverse SDE, a = 0 the probability-flow ODE; the matching
        diffusion is sqrt(2 a beta) (see `reverse_diffusion`). All share the marginals mu_t.
        """
        if a < 0:
            raise ValueError(f"the reverse family needs a >= 0, got a={a}")
        b = bcast(self.beta(t), x)
        return b * x + (1.0 + a) * b * score

    def reverse_diffusion(self, t, a: float = 1.0) -> torch.Tensor:
        if a < 0:
            raise ValueError(f"the reverse family needs a >= 0, got a={a}")
        return torch.sqrt(2.0 * a * self.beta(t))

    # --- VP <-> VE (ALGORITHMS §5) --------------------------------------------------------
    def ve_sigma(self, t) -> torch.Tensor:
        """The VE noise level of VP time t: sigma_VE = sigma_t / alpha_t."""
        return self.sigma(t) / self.alpha(t)

    def t_from_ve_sigma(self, sigma_ve) -> torch.Tensor:
        """Inverse of `ve_sigma`: solve int_beta(t) = 1/2 log(1 + sigma^2) for t (a quadratic)."""
        s = as_time(sigma_ve)
        rhs = 0.5 * torch.log1p(s * s)
        q = 0.25 * (self.b_max - self.b_min)
        p = 0.5 * self.b_min
        if q == 0:
            return rhs / p
        return (-p + torch.sqrt(p * p + 4.0 * q * rhs)) / (2.0 * q)


@dataclass(frozen=True)
class VESDE:
    """The VE / EDM process x_sigma = x_0 + sigma z (ALGORITHMS §5), parameterised by sigma itself."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self):
        if not (0 < self.sigma_min < self.sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.rho <= 0:
            raise ValueError(f"rho must be positive, got {self.rho}")

    def marginal(self, x0: torch.Tensor, sigma):
        return x0, bcast(as_time(sigma), x0)

    def perturb(self, x0: torch.Tensor, sigma, z: torch.Tensor | None = None, generator=None):
        if z is None:
            z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return x0 + bcast(as_time(sigma), x0) * z, z

    def prior_sampling(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        return self.sigma_max * torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def schedule(self, steps: int) -> torch.Tensor:
        """Karras et al. sigmas: (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
        i = 0..N-1, followed by a final 0 (so the tensor has N + 1 entries, float64)."""
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """ALGORITHMS §5 schedule, with sigma_N = 0 appended (float64, length steps + 1)."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    i = torch.arange(steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    frac = i / max(steps - 1, 1)
    sig = (hi + frac * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


def vp_to_ve(x_vp: torch.Tensor, t, sde: VPSDE | None = None):
    """Map a VP state at time t to the VE state: (x_VP / alpha_t, sigma_t / alpha_t)."""
    sde = sde or VPSDE()
    return x_vp / bcast(sde.alpha(t), x_vp), sde.ve_sigma(t)


def ve_to_vp(x_ve: torch.Tensor, sigma_ve, sde: VPSDE | None = None):
    """Inverse of `vp_to_ve`: returns (x_VP, t)."""
    sde = sde or VPSDE()
    t = sde.t_from_ve_sigma(sigma_ve)
    return x_ve * bcast(sde.alpha(t), x_ve), t


# --- score, eps and denoiser: each conversion written once (ALGORITHMS §1, §3, §5) --------------
# Samplers, losses, adapters, the EDM code and the analytic scores call these; none repeats them.

def tweedie(x: torch.Tensor, score: torch.Tensor, t, sde: VPSDE | None = None) -> torch.Tensor:
    """E[x_0 | x_t = x] by Tweedie's formula: (x + sigma_t^2 s) / alpha_t (ALGORITHMS §3 note), in x's dtype."""
    sde = sde or VPSDE()
    return (x + bcast(sde.sigma(t) ** 2, x) * score) / bcast(sde.alpha(t), x)


def score_from_denoised(x: torch.Tensor, x0: torch.Tensor, t, sde: VPSDE | None = None) -> torch.Tensor:
    """The inverse of `tweedie`: the VP score whose posterior mean at (x, t) is x0, (alpha_t x0 - x) / sigma_t^2."""
    sde = sde or VPSDE()
    return (bcast(sde.alpha(t), x) * x0 - x) / bcast(sde.sigma(t) ** 2, x)


def score_from_eps(eps: torch.Tensor, sigma, like: torch.Tensor | None = None) -> torch.Tensor:
    """s = -eps / sigma (ALGORITHMS §1), sigma a scalar or (B,) noise level taken in `like`'s dtype (default eps)."""
    like = eps if like is None else like
    return -eps / bcast(as_time(sigma), like)


def eps_from_score(score: torch.Tensor, sigma, like: torch.Tensor | None = None) -> torch.Tensor:
    """eps = -sigma s, the inverse of `score_from_eps`."""
    like = score if like is None else like
    return -score * bcast(as_time(sigma), like)


def eps_to_score(eps_model: Callable, sde: VPSDE | None = None) -> Callable:
    """Turn an epsilon-prediction network eps(x, t) into a `score_fn(x, t)`: s = -eps / sigma_t (ALGORITHMS §1)."""
    sde = sde or VPSDE()

    def score_fn(x, t):
        return score_from_eps(eps_model(x, t), sde.sigma(t), x)

    return score_fn


def net_time_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype in which a network is handed its time or noise level: x's for fp32/fp64, else fp32."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def vp_score_from_ve_denoiser(denoiser: Callable, sde: VPSDE | None = None) -> Callable:
    """A VP `score_fn(x_VP, t)` from a VE/EDM denoiser D(x_VE; sigma) (ALGORITHMS §5):
    s(x_VP, t) = (alpha_t D(x_VP / alpha_t; sigma_t / alpha_t) - x_VP) / sigma_t^2.

    The denoiser receives sigma with shape (B,) in `net_time_dtype(x)`.
    """
    sde = sde or VPSDE()

    def score_fn(x, t):
        t = as_time(t).to(x.device)
        a = sde.alpha(t)
        D = denoiser(x / bcast(a, x), (sde.sigma(t) / a).to(net_time_dtype(x)).expand(x.shape[0]))
        return score_from_denoised(x, D, t, sde)

    return score_fn


__all__ = ["VPSDE", "VESDE", "karras_sigmas", "vp_to_ve", "ve_to_vp", "as_time", "bcast", "tweedie",
           "score_from_denoised", "score_from_eps", "eps_from_score", "eps_to_score", "net_time_dtype",
           "vp_score_from_ve_denoiser"]
