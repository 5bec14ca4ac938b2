"""EDM / VE probability-flow ODE samplers over sigma, and the VP <-> VE denoiser mapping.

ALGORITHMS §5 (Chen et al., *A Geometric Perspective on Diffusion Models*; Karras et al. 2022):
dx/dsigma = (x - D(x; sigma)) / sigma, solved by Euler or Heun on a decreasing sigma grid (e.g.
`wgfcore.sde.karras_sigmas`). The sampling trajectory x_i and the denoising trajectory D(x_i; sigma_i)
both come out through `callback`; `trajectories` and `ode_jump` are built on that callback.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .sde import VPSDE, as_time, bcast, net_time_dtype, tweedie, vp_score_from_ve_denoiser

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_sigmas(sigmas) -> list[float]:
    """sigmas as python floats (computed once, before the loop): strictly decreasing, >= 0, only the last may be 0."""
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor of at least 2 decreasing noise levels "
                         "(e.g. wgfcore.sde.karras_sigmas(N), which ends in 0)")
    s = sigmas.detach().to("cpu", torch.float64).tolist()
    if any(not (b < a) for a, b in zip(s[:-1], s[1:])):
        raise ValueError(f"sigmas must decrease strictly, got {s[:4]}...")
    if s[-1] < 0 or any(v <= 0 for v in s[:-1]):
        raise ValueError("sigmas must be > 0 except possibly the last entry, which may be 0")
    return s


def _call(denoiser: Denoiser, x, sigma_b, i: int):
    D = denoiser(x, sigma_b)
    if not torch.is_tensor(D) or D.shape != x.shape:
        got = tuple(D.shape) if torch.is_tensor(D) else type(D).__name__
        raise ValueError(f"denoiser returned {got} at step {i}, expected a tensor of shape {tuple(x.shape)}")
    return D


def _finish(x: torch.Tensor, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(x).all()):  # the one host sync, after the loop
        raise FloatingPointError(f"{name} produced NaN or inf; check the denoiser at small and large sigma")
    return x


def _edm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, heun: bool, callback, progress: bool):
    s = _check_sigmas(sigmas)
    n = len(s) - 1
    # (N+1, B) per-step sigma tensors built up front: no host work or sync inside the loop.
    sig_b = torch.tensor(s, dtype=torch.float64).to(device=x.device, dtype=net_time_dtype(x))[:, None]
    sig_b = sig_b.expand(-1, x.shape[0])
    name = "edm_heun" if heun else "edm_euler"
    for i in tqdm(range(n), disable=not progress, desc=name, leave=False):
        sigma, sigma_next = s[i], s[i + 1]
        h = sigma_next - sigma
        D = _call(denoiser, x, sig_b[i], i)
        d = (x - D) / sigma
        x_new = x + h * d  # Euler; to sigma_next = 0 this is exactly D
        info = {"i": i, "sigma": sigma, "sigma_next": sigma_next, "x_prev": x, "denoised": D, "nfe": 1}
        if heun and sigma_next > 0:  # Heun's correction; none on a final step to sigma = 0 (ALGORITHMS §5)
            D_next = _call(denoiser, x_new, sig_b[i + 1], i)
            d_next = (x_new - D_next) / sigma_next
            info.update(x_pred=x_new, denoised_next=D_next, nfe=2)
            x_new = x + h * 0.5 * (d + d_next)
        x = x_new
        if callback is not None:
            info["x"] = x
            callback(info)
    return _finish(x, name)


def edm_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback=None,
              progress: bool = False) -> torch.Tensor:
    """Euler on the PF-ODE dx/dsigma = (x - D(x; sigma)) / sigma (ALGORITHMS §5). NFE = N.

    x starts at sigmas[0] (e.g. sigma_max * N(0, I)); denoiser(x, sigma) takes sigma of shape (B,).
    callback(info) per step gets i, sigma, sigma_next, x (new state), x_prev, denoised = D(x_prev; sigma), nfe.
    """
    return _edm(denoiser, x, sigmas, False, callback, progress)


def edm_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback=None,
             progress: bool = False) -> torch.Tensor:
    """Heun (2nd order) on dx/dsigma = (x - D)/sigma, Karras et al. Alg. 1 with no churn (ALGORITHMS §5).

    A step to sigma_next = 0 takes no correction (the ODE is singular there), so with the Karras grid
    NFE = 2N - 1. callback(info) as in `edm_euler`, plus x_pred (Euler predictor) and denoised_next
    on corrected steps.
    """
    return _edm(denoiser, x, sigmas, True, callback, progress)


EDM_SAMPLERS = {"euler": edm_euler, "heun": edm_heun}


def _sampler(name: str):
    if name not in EDM_SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(EDM_SAMPLERS)}, got {name!r}")
    return EDM_SAMPLERS[name]


def ode_jump(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, k: int, *, sampler: str = "heun",
             progress: bool = False) -> torch.Tensor:
    """Chen et al.'s "ODE-jump": follow the sampling trajectory to step k, then output D(x_k; sigma_k).

    k = 0 denoises the initial noise at once; k = N returns x_N (D(x; 0) = x). Costs the NFE of k
    steps plus one.
    """
    s = _check_sigmas(sigmas)
    n = len(s) - 1
    if isinstance(k, bool) or int(k) != k or not 0 <= k <= n:
        raise ValueError(f"k must be an integer step in [0, {n}], got {k!r}")
    k = int(k)
    if k > 0:
        x = _sampler(sampler)(denoiser, x, sigmas[:k + 1], progress=progress)
    if s[k] == 0:
        return x
    sig = torch.full((x.shape[0],), s[k], device=x.device, dtype=net_time_dtype(x))
    return _call(denoiser, x, sig, k)


def trajectories(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, sampler: str = "heun",
                 progress: bool = False) -> dict[str, torch.Tensor]:
    """Run an EDM sampler and collect, through its callback, both trajectories of Chen et al.:

    "x": the sampling trajectory x_0..x_N, shape (N+1, B, ...); "denoised": the denoising trajectory
    D(x_i; sigma_i), i = 0..N-1, shape (N, B, ...); "sigmas": the grid (N+1,), float64.
    """
    xs, ds = [x], []

    def collect(info):
        xs.append(info["x"])
        ds.append(info["denoised"])

    _sampler(sampler)(denoiser, x, sigmas, callback=collect, progress=progress)
    return {"x": torch.stack(xs), "denoised": torch.stack(ds), "sigmas": sigmas.detach().to("cpu", torch.float64)}


# --- VP <-> VE (ALGORITHMS §5) ------------------------------------------------------------------

def vp_denoiser_from_score(score_fn: Callable, sde: VPSDE | None = None) -> Denoiser:
    """An EDM denoiser D(x_VE; sigma) driven by a VP score network s(x_VP, t) (ALGORITHMS §5).

    With sigma = sigma_t / alpha_t (t = sde.t_from_ve_sigma(sigma)) and x_VP = alpha_t x_VE, the
    posterior mean of x_0 is the same in both coordinates, so Tweedie in VP coordinates gives

        D(x_VE; sigma) = (x_VP + sigma_t^2 s(x_VP, t)) / alpha_t = x_VE + sigma^2 (alpha_t s(x_VP, t)),

    where alpha_t s(alpha_t x, t) is the VE score (the density of x_VE is alpha^d p_VP(alpha x)).
    sigma above sigma_t/alpha_t at t = 1 (~152 for the default VP) maps to t > 1, where the linear
    beta schedule is extrapolated. The score network receives t in x's dtype, shape (B,).
    """
    sde = sde or VPSDE()

    def denoiser(x, sigma):
        t = sde.t_from_ve_sigma(as_time(sigma)).to(x.device)
        x_vp = bcast(sde.alpha(t), x) * x
        return tweedie(x_vp, score_fn(x_vp, t.to(net_time_dtype(x)).expand(x.shape[0])), t, sde)

    return denoiser


def ve_denoiser_from_vp(vp_denoiser: Callable, sde: VPSDE | None = None) -> Denoiser:
    """An EDM denoiser from a VP posterior-mean function D_VP(x_VP, t) = E[x_0 | x_t = x_VP]
    (e.g. `GaussianMixture.denoiser`): D(x_VE; sigma) = D_VP(alpha_t x_VE, t) at sigma_t/alpha_t = sigma."""
    sde = sde or VPSDE()

    def denoiser(x, sigma):
        t = sde.t_from_ve_sigma(as_time(sigma)).to(x.device)
        return vp_denoiser(bcast(sde.alpha(t), x) * x, t.to(net_time_dtype(x)).expand(x.shape[0]))

    return denoiser


# `vp_score_from_ve_denoiser` (the other direction) lives in wgfcore.sde, its one home; re-exported here.


__all__ = ["edm_euler", "edm_heun", "EDM_SAMPLERS", "ode_jump", "trajectories", "vp_denoiser_from_score",
           "ve_denoiser_from_vp", "vp_score_from_ve_denoiser"]
