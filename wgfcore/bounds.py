"""The score-matching objective J and Kwon et al.'s W2 bound (Kwon, Fan, Lee 2022; ALGORITHMS §6).

J = 1/2 int_eps^T lambda(t) E_{x ~ p_t} |grad log p_t(x) - s_theta(x, t)|^2 dt, estimated by Monte Carlo
against the *analytic* score of a Gaussian mixture (`GaussianMixture.score`), so it measures a
model's true score error, not a denoising-score-matching loss with its irreducible constant. The
paper's weight is lambda = g^2 (= 2 beta here); lambda = sigma_t^2 is the DSM weight used in training.

The bound (synchronous coupling of the reverse SDEs driven by the true score and by s_theta, then
Gronwall and Cauchy-Schwarz):

    W2(p_eps, q_eps) <= sqrt(2 int_eps^T I(t)^2 g(t)^2 dt) sqrt(J_g2) + I(T) W2(p_T, q_T),
    I(t) = exp(int_eps^t (L_f(r) + L_s(r) g(r)^2) dr),

with L_f = beta (the drift -beta x, ALGORITHMS §1) and L_s(r) the one-sided Lipschitz constant of
s_theta(., r): sup over x != y of <x - y, s(x) - s(y)> / |x - y|^2 = sup_x lambda_max(sym grad s).
`one_sided_lipschitz` can only take that sup over finitely many points, so it under-estimates L_s,
and `kwon_bound_constant` built from it under-estimates the true constant.
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


def score_error_profile(score_fn: Callable, mixture: GaussianMixture, sde: VPSDE, ts, *, n_x: int = 512,
                        generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """E_{x ~ p_t} |grad log p_t(x) - s_theta(x, t)|^2 at each given time, with its standard error.

    For a discrete schedule (a 10-step DDPM) J is a finite sum over its timesteps of weight(t_i) times
    this profile; no Monte Carlo over t is needed there. Returns two float64 tensors of shape (len(ts),).
    """
    ts = torch.as_tensor(ts, dtype=torch.float64).flatten()
    if isinstance(n_x, bool) or int(n_x) != n_x or n_x < 2:
        raise ValueError(f"n_x must be an integer >= 2, got {n_x!r}")
    means, ses = [], []
    for t in ts:
        x0 = mixture.sample(n_x, generator=generator)
        tt = t.to(dtype).to(torch.float64).expand(n_x)
        x_t = sde.perturb(x0, tt, generator=generator)[0].to(dtype)
        with torch.no_grad():
            model = score_fn(x_t, tt.to(dtype))
        if not torch.is_tensor(model) or model.shape != x_t.shape:
            raise ValueError(f"score_fn returned {getattr(model, 'shape', type(model).__name__)}, "
                             f"expected shape {tuple(x_t.shape)}")
        true = mixture.score(x_t.to(torch.float64), tt, sde)
        sq = (true - model.detach().to(torch.float64)).pow(2).sum(1)
        means.append(sq.mean())
        ses.append(sq.std(unbiased=True) / math.sqrt(n_x))
    return torch.stack(means), torch.stack(ses)


def one_sided_lipschitz(score_fn: Callable, x: torch.Tensor, t) -> float:
    """max over the rows of x of lambda_max of the symmetric part of the Jacobian of x -> score_fn(x, t).

    A lower estimate of the one-sided Lipschitz constant L_s(t) (the sup runs over all of R^d).
    x has shape (B, d) with small d (one backward pass per output coordinate).
    """
    if x.ndim != 2:
        raise ValueError(f"x must have shape (B, d), got {tuple(x.shape)}")
    B, d = x.shape
    x = x.detach().clone().requires_grad_(True)
    tt = torch.as_tensor(t, dtype=x.dtype).expand(B)
    with torch.enable_grad():
        s = score_fn(x, tt)
        rows = [torch.autograd.grad(s[:, j].sum(), x, retain_graph=j < d - 1)[0] for j in range(d)]
    Jac = torch.stack(rows, dim=1).to(torch.float64)  # (B, d_out, d_in); rows are independent samples
    sym = 0.5 * (Jac + Jac.transpose(1, 2))
    return float(torch.linalg.eigvalsh(sym)[:, -1].max())


def kwon_bound_constant(ts, L_s, sde: VPSDE) -> dict:
    """log I(T) and log of the constant C = sqrt(2 int I(t)^2 g(t)^2 dt) of Kwon et al.'s bound.

    ts: increasing times eps = t_0 < ... < t_M = T; L_s: the one-sided Lipschitz constant of the model
    on each interval [t_k, t_{k+1}) (length M), held constant there; beta and g^2 = 2 beta are integrated
    exactly with `sde.int_beta`, so a piecewise-constant schedule (`DiscreteVP`) is handled exactly when
    its knots are among ts. Natural logs, computed in log space: the constant overflows float64 easily.
    Returns {"log_I": log I at every t_k (M + 1,), "log_IT": log I(T), "log_C": log C}.
    """
    ts = torch.as_tensor(ts, dtype=torch.float64).flatten()
    L = torch.as_tensor(L_s, dtype=torch.float64).flatten()
    if ts.numel() < 2 or L.numel() != ts.numel() - 1:
        raise ValueError(f"need M + 1 >= 2 times and M values of L_s, got {ts.numel()} and {L.numel()}")
    if not bool((ts[1:] > ts[:-1]).all()):
        raise ValueError("ts must be strictly increasing")
    B = sde.int_beta(ts)
    dB = B[1:] - B[:-1]  # int beta over each interval; int g^2 = 2 dB
    rate = dB * (1.0 + 2.0 * L)  # int (L_f + L_s g^2) over the interval (L_f = beta)
    log_I = torch.cat([ts.new_zeros(1), torch.cumsum(rate, 0)])
    # int_k I^2 g^2 dt with log I linear in B on the interval: 2 dB * (e^{2 a} - e^{2 b}) / (2 (a - b)) form
    a, b = log_I[:-1], log_I[1:]
    c = 2.0 * (b - a)  # exponent growth of I^2 over the interval
    # integral of exp(2 a + c u) 2 dB du over u in [0, 1] = 2 dB exp(2a) (e^c - 1)/c  (-> 2 dB exp(2a) as c -> 0)
    # log((e^c - 1)/c) without overflow: c + log(1 - e^-c) - log c for c > 0, log(1 - e^c) - log(-c) for c < 0
    small = c.abs() < 1e-8
    cs = torch.where(small, torch.ones_like(c), c)
    log_frac = torch.where(cs > 0, cs + torch.log(-torch.expm1(-cs.abs())) - torch.log(cs.abs()),
                           torch.log(-torch.expm1(-cs.abs())) - torch.log(cs.abs()))
    log_frac = torch.where(small, 0.5 * c, log_frac)  # (e^c - 1)/c = 1 + c/2 + O(c^2)
    log_terms = math.log(2.0) + torch.log(dB) + 2.0 * a + log_frac
    log_int = torch.logsumexp(log_terms, 0)
    return {"log_I": log_I, "log_IT": float(log_I[-1]), "log_C": 0.5 * (math.log(2.0) + float(log_int))}


__all__ = ["score_matching_objective", "score_error_profile", "one_sided_lipschitz", "kwon_bound_constant"]
