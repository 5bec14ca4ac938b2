"""Discrete DDPM schedules seen as VP processes, and diffusers models as a wgfcore `score_fn`.

ALGORITHMS §1 (s = -eps / sigma_t) and §6 (Kwon et al.'s 10-step DDPM). A DDPM schedule is a table
alpha_bar_0 > ... > alpha_bar_{N-1}; a wgfcore sampler asks for the score at a continuous VP time t,
with alpha_t^2 from its own `VPSDE`. The two meet where the noise levels agree: the model is called
at the *fractional* timestep tau whose alpha_bar equals alpha_t^2, found the way diffusers itself
converts a noise level to a timestep (`EulerDiscreteScheduler._sigma_to_t`: linear interpolation
of log sigma_VE = 1/2 log((1 - alpha_bar)/alpha_bar) between integer timesteps). The score then
divides by the model's own sqrt(1 - alpha_bar(tau)); inside the table's range that is sigma_t to
rounding, and the old "tau = 1000 t - 1, divide by sigma_t" mapping (off by 4.6 % in sigma at
t = 0.001) is gone.

`DiscreteVP` is the continuous VP process through such a table (b piecewise constant, so
alpha_t^2 = alpha_bar_i exactly at t = (i + 1)/N); it lets the analytic mixture scores, Kwon's J
and the bound's constant be evaluated on a DDPM schedule with the machinery of `wgfcore.sde`.
"""
from __future__ import annotations

import math
import numbers

import torch

from .sde import VPSDE, as_time, score_from_eps

BETA_SCHEDULES = ("linear", "scaled_linear", "sigmoid", "squaredcos_cap_v2")

#: Kwon, Fan & Lee's 2-D experiment as their notebook sets it up (UW-Madison-Lee-Lab/score-wasserstein,
#: Score_Wasserstein.ipynb, "Hyperparameters" cell): a 10-step DDPM, sigmoid betas from 1e-5 to 1e-2
#: (alpha_bar_T = 0.951). The 2-D DDPM tutorial the notebook builds on ends at 5e-3 instead.
KWON_SCHEDULE = {"num_train_timesteps": 10, "beta_schedule": "sigmoid", "beta_start": 1e-5, "beta_end": 1e-2}


def ddpm_betas(num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
               beta_end: float = 0.02) -> torch.Tensor:
    """The beta_i of a DDPM schedule (float64), with diffusers' definitions of each name.

    "sigmoid" is sigmoid(linspace(-6, 6, N)) (beta_end - beta_start) + beta_start, the schedule of
    Kwon et al.'s notebook (`ddpm_betas(**KWON_SCHEDULE)`).
    """
    if isinstance(num_train_timesteps, bool) or int(num_train_timesteps) != num_train_timesteps \
            or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
    n = int(num_train_timesteps)
    for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 < v < 1.0:
            raise ValueError(f"{name} must be a number in (0, 1) (a DDPM beta), got {v!r}")
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    elif beta_schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6.0, 6.0, n, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    elif beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine alpha_bar, betas capped at 0.999
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if not bool(((betas > 0) & (betas < 1)).all()):  # NaN fails both comparisons
        raise ValueError(f"the {beta_schedule!r} schedule from {beta_start} to {beta_end} gives betas outside (0, 1) "
                         f"(min {float(betas.min()):.4g}, max {float(betas.max()):.4g})")
    return betas


def _log_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
    if ab.numel() < 2 or not bool(((ab > 0) & (ab < 1)).all()) or not bool((ab[1:] < ab[:-1]).all()):
        raise ValueError("alphas_cumprod must be a strictly decreasing sequence in (0, 1) of length >= 2")
    return 0.5 * (torch.log1p(-ab) - torch.log(ab))  # log sigma_VE, increasing in the timestep


def timestep_from_alpha2(alphas_cumprod: torch.Tensor, alpha2) -> torch.Tensor:
    """The fractional timestep tau (float64) whose alpha_bar(tau) equals alpha2, clamped to [0, N-1].

    Linear interpolation of log sigma_VE between integer timesteps, as diffusers' sigma -> timestep
    conversion does (`EulerDiscreteScheduler._sigma_to_t`).
    """
    ls = _log_sigmas(alphas_cumprod)
    a2 = as_time(alpha2)
    target = 0.5 * (torch.log1p(-a2) - torch.log(a2))
    idx = torch.searchsorted(ls.to(target.device), target.contiguous()).clamp(1, ls.numel() - 1)
    lo, hi = ls.to(target.device)[idx - 1], ls.to(target.device)[idx]
    w = ((target - lo) / (hi - lo)).clamp(0.0, 1.0)
    return (idx - 1).to(torch.float64) + w


def alpha_bar_at(alphas_cumprod: torch.Tensor, tau) -> torch.Tensor:
    """alpha_bar at a fractional timestep, by the same log-sigma interpolation (float64)."""
    ls = _log_sigmas(alphas_cumprod)
    tau = as_time(tau)
    n = ls.numel()
    tau = tau.clamp(0.0, n - 1)
    i0 = tau.floor().long().clamp(max=n - 2)
    w = tau - i0.to(torch.float64)
    lsig = (1 - w) * ls.to(tau.device)[i0] + w * ls.to(tau.device)[i0 + 1]
    return torch.sigmoid(-2.0 * lsig)  # 1 / (1 + sigma_VE^2)


class DiscreteVP(VPSDE):
    """The VP process through a DDPM table: alpha_t^2 = alpha_bar_i exactly at t = (i + 1)/N.

    b(t) is piecewise constant, b = N log(alpha_bar_{i-1} / alpha_bar_i) on (i/N, (i+1)/N] (alpha_bar_{-1} = 1),
    so log alpha_t^2 is piecewise linear in t, g^2 = b integrates to -log(1 - beta_i) over step i, and
    every formula of `VPSDE` (perturb, marginals, reverse drift) holds with beta = b/2.
    """

    def __init__(self, alphas_cumprod):
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        _log_sigmas(ab)  # validates
        log_ab = torch.cat([ab.new_zeros(1), torch.log(ab)])
        b = -(log_ab[1:] - log_ab[:-1]) * ab.numel()
        object.__setattr__(self, "b_min", float(b.min()))
        object.__setattr__(self, "b_max", float(b.max()))
        object.__setattr__(self, "alphas_cumprod", ab)
        object.__setattr__(self, "_log_ab", log_ab)
        object.__setattr__(self, "_b", b)

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self):
        return f"DiscreteVP(N={self.N}, alpha_bar_N={float(self.alphas_cumprod[-1]):.4g})"

    @classmethod
    def from_betas(cls, betas) -> "DiscreteVP":
        return cls(torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), 0))

    @property
    def N(self) -> int:
        return int(self.alphas_cumprod.numel())

    @property
    def betas(self) -> torch.Tensor:
        return -torch.expm1(self._log_ab[1:] - self._log_ab[:-1])

    def step_time(self, i) -> torch.Tensor:
        """Continuous time t = (i + 1)/N of DDPM timestep i."""
        return (torch.as_tensor(i, dtype=torch.float64) + 1.0) / self.N

    def b(self, t) -> torch.Tensor:
        t = as_time(t)
        i = torch.ceil(t * self.N - 1.0).long().clamp(0, self.N - 1)  # step i covers (i/N, (i+1)/N]
        return self._b.to(t.device)[i]

    def int_beta(self, t) -> torch.Tensor:
        t = as_time(t)
        u = (t * self.N).clamp(0.0, float(self.N))
        i = u.floor().long().clamp(max=self.N - 1)
        la = self._log_ab.to(t.device)
        log_ab = la[i] + (u - i.to(torch.float64)) * (la[i + 1] - la[i])
        return -0.5 * log_ab

    def t_from_ve_sigma(self, sigma_ve) -> torch.Tensor:
        s = as_time(sigma_ve)
        target = -torch.log1p(s * s)  # log alpha^2
        la = self._log_ab.to(s.device)
        # log alpha_bar decreases along the knots t = 0, 1/N, ..., 1: interpolate t against it
        idx = torch.searchsorted(-la, -target.contiguous()).clamp(1, self.N)
        w = (target - la[idx - 1]) / (la[idx] - la[idx - 1])
        return ((idx - 1).to(torch.float64) + w.clamp(0.0, 1.0)) / self.N


def _config_value(scheduler, name, default=None):
    cfg = getattr(scheduler, "config", scheduler)
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def from_diffusers(unet, scheduler=None, num_train_timesteps: int = 1000, sde: VPSDE | None = None,
                   alphas_cumprod=None):
    """A `score_fn(x, t)` from a diffusers-style epsilon model `unet(x, timestep)`.

    The model's schedule is taken from `alphas_cumprod`, else from `scheduler.alphas_cumprod` (any
    diffusers scheduler), else from the scheduler's config (beta_schedule, beta_start, beta_end,
    num_train_timesteps), else it is the linear DDPM schedule (1e-4 .. 0.02) over num_train_timesteps.
    `sde` is the sampler's VP process (default `VPSDE()`); at time t the model is called at the
    fractional timestep tau with alpha_bar(tau) = alpha_t^2 (`timestep_from_alpha2`) and the score is
    -eps / sqrt(1 - alpha_bar(tau)). Where alpha_t^2 lies outside the table (t below the first
    timestep's noise level or above the last) tau is clamped, as diffusers clamps, and the score is
    the model's score at that end of its schedule; `score_fn.t_range` gives the covered interval.

    The model's output may be a tensor, a tuple whose first entry is the tensor, or an object with
    `.sample` (diffusers' `UNet2DOutput`). Only prediction_type='epsilon' is accepted.
    """
    sde = sde or VPSDE()
    if scheduler is not None:
        pred = _config_value(scheduler, "prediction_type", "epsilon")
        if pred != "epsilon":
            raise ValueError(f"from_diffusers supports prediction_type='epsilon', got {pred!r}")
    if alphas_cumprod is None and scheduler is not None:
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            alphas_cumprod = torch.cumprod(1.0 - ddpm_betas(
                int(_config_value(scheduler, "num_train_timesteps", num_train_timesteps)),
                _config_value(scheduler, "beta_schedule", "linear"),
                float(_config_value(scheduler, "beta_start", 1e-4)),
                float(_config_value(scheduler, "beta_end", 0.02))), 0)
    if alphas_cumprod is None:
        if isinstance(num_train_timesteps, bool) or int(num_train_timesteps) != num_train_timesteps \
                or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        alphas_cumprod = torch.cumprod(1.0 - ddpm_betas(int(num_train_timesteps)), 0)
    table = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
    _log_sigmas(table)

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a2 = sde.alpha(t).to(x.device) ** 2
        tau = timestep_from_alpha2(table.to(x.device), a2)
        sigma_model = torch.sqrt(1.0 - alpha_bar_at(table.to(x.device), tau))
        raw = out = unet(x, tau.to(x.dtype))
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not torch.is_tensor(out):
            raise TypeError(f"the diffusers model returned {type(raw).__name__}, expected a tensor, a tuple whose first "
                            "entry is one, or an object with .sample (diffusers' UNet2DOutput)")
        if out.shape != x.shape:
            raise ValueError(f"the diffusers model returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        return score_from_eps(out, sigma_model, x)

    ls = _log_sigmas(table)
    score_fn.t_range = (float(sde.t_from_ve_sigma(torch.exp(ls[0]))), float(sde.t_from_ve_sigma(torch.exp(ls[-1]))))
    score_fn.alphas_cumprod = table
    return score_fn


__all__ = ["BETA_SCHEDULES", "KWON_SCHEDULE", "ddpm_betas", "timestep_from_alpha2", "alpha_bar_at", "DiscreteVP", "from_diffusers"]
