"""Training objectives: denoising score matching (ALGORITHMS §1) and the projection loss that
estimates a Wasserstein gradient (ALGORITHMS §3, our reading of Ghimire et al. eq. 33-35).

Both losses are per-sample squared norms (summed over features) averaged over the batch, so that
their relative weight in `joint_loss` does not depend on the image size.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .sde import VPSDE, bcast, eps_to_score

Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sqnorm(v: torch.Tensor) -> torch.Tensor:
    return v.float().pow(2).flatten(1).sum(1)


def _uniform(n, lo, hi, like, generator):
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=like.device, dtype=torch.float32)


def dsm_loss(eps_model: Net, x0: torch.Tensor, sde: VPSDE | None = None, *, t=None, z=None,
             eps_t: float = 1e-5, generator=None, reduce: bool = True):
    """L_dsm = E || eps_theta(alpha_t x0 + sigma_t z, t) - z ||^2, t ~ U(eps_t, 1) (lambda(t) = sigma_t^2).

    With the score parameterised as s = -eps / sigma_t, this is sigma_t^2-weighted score matching.
    """
    sde = sde or VPSDE()
    B = x0.shape[0]
    if t is None:
        t = _uniform(B, eps_t, 1.0, x0, generator)
    x_t, z = sde.perturb(x0, t, z=z, generator=generator)
    out = eps_model(x_t, t)
    if out.shape != x0.shape:
        raise ValueError(f"eps_model returned shape {tuple(out.shape)}, expected {tuple(x0.shape)}")
    per = _sqnorm(out - z)
    return per.mean() if reduce else per


def _delta_tau(delta_tau, B, like, generator, eps_s):
    """A float, or a sequence of step counts N to draw per sample (dtau = (1 - eps_s)/N)."""
    if isinstance(delta_tau, (int, float)):
        if not 0 < delta_tau < 1 - eps_s:
            raise ValueError(f"delta_tau must lie in (0, 1 - eps_s), got {delta_tau}")
        return torch.full((B,), float(delta_tau), device=like.device)
    Ns = torch.as_tensor(list(delta_tau), dtype=torch.float32)
    if Ns.numel() == 0 or (Ns < 2).any():
        raise ValueError(f"a sequence delta_tau lists step counts N >= 2, got {list(delta_tau)}")
    idx = torch.randint(0, Ns.numel(), (B,), generator=generator, device="cpu" if generator is None
                        else generator.device)
    return ((1.0 - eps_s) / Ns[idx.cpu()]).to(like.device)


def projection_loss(proj_model: Net, score_fn: Net, x0: torch.Tensor, sde: VPSDE | None = None, *,
                    delta_tau: float | Sequence[int] = 1.0 / 20, eps_s: float = 1e-3, t=None, z=None,
                    generator=None, reduce: bool = True):
    """The projection (Wasserstein-gradient) loss of ALGORITHMS §3, with h = 1/sqrt(beta):

        t ~ U(eps_s + dtau, 1),  t' = t - dtau,  x_t = alpha_t x0 + sigma_t z
        x_pred = x_t + beta(t) dtau (x_t + 2 s(x_t, t))     (score detached: no gradient into it)
        x_mean = alpha_{t'} x0
        L = || x_pred + T(x_pred, t') - x_mean ||^2 + (sqrt(beta(t)) / 2) || T(x_pred, t') ||^2

    `delta_tau` is one step size, or a sequence of step counts N drawn per sample.
    """
    sde = sde or VPSDE()
    B = x0.shape[0]
    dtau = _delta_tau(delta_tau, B, x0, generator, eps_s)
    if t is None:
        t = eps_s + dtau + (1.0 - eps_s - dtau) * torch.rand(B, generator=generator, device=x0.device)
    t_prev = t - dtau
    x_t, z = sde.perturb(x0, t, z=z, generator=generator)
    beta = sde.beta(t)
    with torch.no_grad():
        s = score_fn(x_t, t)
        x_pred = x_t + bcast(beta * dtau, x_t) * (x_t + 2.0 * s)
    x_mean = bcast(sde.alpha(t_prev), x0) * x0
    T = proj_model(x_pred, t_prev)
    if T.shape != x0.shape:
        raise ValueError(f"proj_model returned shape {tuple(T.shape)}, expected {tuple(x0.shape)}")
    per = _sqnorm(x_pred + T - x_mean) + (beta.sqrt() / 2).to(T.device, torch.float32) * _sqnorm(T)
    return per.mean() if reduce else per


def joint_loss(eps_model: Net, proj_model: Net, x0: torch.Tensor, sde: VPSDE | None = None, *,
               delta_tau: float | Sequence[int] = 1.0 / 20, eps_t: float = 1e-5, eps_s: float = 1e-3,
               proj_weight: float = 1.0, generator=None):
    """Score and projection networks trained together: L = L_dsm + proj_weight * L_proj.

    The projection term sees the score network only through a detached evaluation, so its
    gradient flows into T alone. Returns (loss, {"dsm": ..., "proj": ...}) with detached parts.
    """
    sde = sde or VPSDE()

    score_fn = eps_to_score(eps_model, sde)
    l_dsm = dsm_loss(eps_model, x0, sde, eps_t=eps_t, generator=generator)
    l_proj = projection_loss(proj_model, score_fn, x0, sde, delta_tau=delta_tau, eps_s=eps_s, generator=generator)
    return l_dsm + proj_weight * l_proj, {"dsm": l_dsm.detach(), "proj": l_proj.detach()}


__all__ = ["dsm_loss", "projection_loss", "joint_loss"]
