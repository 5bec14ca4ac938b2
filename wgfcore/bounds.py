"""The score-matching objective J that bounds W2 (Kwon, Fan, Lee 2022; ALGORITHMS §6).

J = 1/2 int_eps^T lambda(t) E_{x ~ p_t} |grad log p_t(x) - s_theta(x, t)|^2 dt, estimated by Monte Carlo
against the *analytic* score of a Gaussian mixture (`GaussianMixture.score`), so it measures a
model's true score error, not a denoising-score-matching loss with its irreducible constant.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .scores import GaussianMixture
from .sde import VPSDE


def _weight(lam, sde: VPSDE) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(lam):
        return lam
    if lam == "sigma2":  # the DSM weighting used for training (ALGORITHMS §1)
        return lambda t: sde.sigma(t) ** 2
    if lam == "g2":  # likelihood weighting g(t)^2 = 2 beta(t) (Song et al. 2021, Kwon et al. §3)
        return lambda t: 2.0 * sde.beta(t)
    raise ValueError(f"lam must be 'sigma2', 'g2' or a callable lambda(t), got {lam!r}")


def score_matching_objective(score_fn: Callable, mixture: GaussianMixture, sde: VPSDE | None = None, *,
                             n_t: int = 256, n_x: int = 256, lam="sigma2", T: float = 1.0, eps: float = 1e-3,
                             generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                             batch: int = 65536) -> tuple[float, float]:
    """Monte Carlo estimate of Kwon et al.'s J and its standard error (ALGORITHMS §6).

    t_j ~ U(eps, T) iid (j < n_t); for each, n_x draws x_0 ~ mixture and x_t = alpha_t x_0 + sigma_t z.
    G_j = 1/2 (T - eps) lambda(t_j) mean_x |grad log p_t(x_t) - score_fn(x_t, t_j)|^2 is then an
    unbiased estimate of J, and the G_j are iid, so J ~ mean_j G_j with standard error std_j(G) / sqrt(n_t)
    (this accounts for the spread over x as well as over t).

    score_fn(x, t) gets x in `dtype` with shape (B, d) and t of shape (B,); the true score is computed
    in float64 at the very same (x, t), so the analytic score gives J = 0 exactly in float64 and J at the
    level of float32 rounding in float32. lam: "sigma2"
    (lambda = sigma_t^2, the DSM weight), "g2" (2 beta(t)) or a callable of a float64 tensor t.
    Returns (J, standard error) as floats.
    """
    sde = sde or VPSDE()
    for name, v in (("n_t", n_t), ("n_x", n_x), ("batch", batch)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if n_t < 2:
        raise ValueError("n_t must be >= 2 to estimate a standard error")
    if not 0 <= eps < T:
        raise ValueError(f"need 0 <= eps < T, got eps={eps}, T={T}")
    weight = _weight(lam, sde)
    dev = generator.device if generator is not None else torch.device("cpu")
    t = eps + (T - eps) * torch.rand(n_t, generator=generator, dtype=torch.float64, device=dev)
    t = t.to(dtype).to(torch.float64)  # the model sees t in `dtype`: evaluate the truth at that very t
    t_all = t.repeat_interleave(n_x)
    x0 = mixture.sample(n_t * n_x, generator=generator)
    x_t, _ = sde.perturb(x0, t_all, generator=generator)
    x_t = x_t.to(dtype)
    sq = torch.empty(n_t * n_x, dtype=torch.float64)
    for s in range(0, n_t * n_x, batch):
        xb, tb = x_t[s:s + batch], t_all[s:s + batch]
        with torch.no_grad():
            model = score_fn(xb, tb.to(dtype))
        if not torch.is_tensor(model) or model.shape != xb.shape:
            got = tuple(model.shape) if torch.is_tensor(model) else type(model).__name__
            raise ValueError(f"score_fn returned {got}, expected shape {tuple(xb.shape)}")
        true = mixture.score(xb.to(torch.float64), tb, sde)  # the truth in float64, at the model's x
        sq[s:s + batch] = (true.to(torch.float64) - model.detach().to(torch.float64)).pow(2).sum(1).cpu()
    lam_t = torch.as_tensor(weight(t), dtype=torch.float64).cpu().expand(n_t)
    G = 0.5 * (T - eps) * lam_t * sq.view(n_t, n_x).mean(1)
    if not bool(torch.isfinite(G).all()):
        raise FloatingPointError("score_matching_objective: non-finite score error (check score_fn near t = eps)")
    return float(G.mean()), float(G.std(unbiased=True) / math.sqrt(n_t))


__all__ = ["score_matching_objective"]
