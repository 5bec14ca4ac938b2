"""Samplers for the VP reverse process, as plain functions, plus one `sample(...)` entry point.

ALGORITHMS §2 and §4: Euler-Maruyama (score-based baseline), Predict-Project (Ghimire et al.
Alg. 1), the §6.2 reverse family with parameter `a` (a = 0 is the probability-flow ODE), Heun on
the PF-ODE, and Langevin dynamics toward a fixed target. Every sampler shares one signature,
`(score_fn, x, ts, *, ..., steps=<StepBackend>, callback=None, progress=False)`, where ts is the
forward-time grid t_0 = 1 > ... > t_N = eps. The update arithmetic lives in `wgfcore.ops`
(backend "torch") or in the fused Triton kernels (backend "triton"); coefficients for all steps
are computed before the loop, and the loop makes no host sync: non-finite network outputs are
recorded on the device and reported once, at the end.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import ops
from .sde import VPSDE

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- step backends ------------------------------------------------------------------------------

class TorchSteps:
    """Step backend in plain torch: `wgfcore.ops` with noise from `torch.randn(generator=...)`.

    A backend exposes four updates; coefficients are 0-d or (B,) tensors already on the device,
    `step` is the python step index (the Triton backend keys its in-kernel noise on it).
    """

    name = "torch"

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def _z(self, x):
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def predict(self, x, s, c_x, c_s):
        return ops.predict(x, s, c_x, c_s)

    def em(self, x, s, c_x, c_s, c_z, step: int):
        return ops.em_step(x, s, None if c_z is None else self._z(x), c_x, c_s, c_z)

    def project(self, x_pred, T, c_T, c_z, step: int):
        return ops.project(x_pred, T, None if c_z is None else self._z(x_pred), c_T, c_z)

    def heun(self, x, s, x_p, s_p, c_x, c_s, c_xp, c_sp):
        return ops.heun_correct(x, s, x_p, s_p, c_x, c_s, c_xp, c_sp)


_warned_interpreter = False


def make_steps(backend: str, device, generator=None, seed: int | None = None):
    """Resolve a backend name ("auto", "torch", "triton") to a step backend for `device`."""
    global _warned_interpreter
    device = torch.device(device)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        backend = "torch"
        if device.type == "cuda":
            try:
                import kernels.sampler_step  # noqa: F401
                backend = "triton"
            except ImportError:
                pass
    if backend == "torch":
        return TorchSteps(generator)
    try:
        from kernels.sampler_step import TritonSteps
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(f"backend='triton' needs the `kernels` package and triton: {e}") from e
    if device.type != "cuda" and not _warned_interpreter:
        warnings.warn("backend='triton' on CPU runs the Triton interpreter: a correctness mode, not a fast path",
                      stacklevel=4)  # make_steps <- sample <- no_grad wrapper <- caller
        _warned_interpreter = True
    if seed is None:
        # One draw before the loop: the in-kernel Philox stream is keyed by (seed, step, offset).
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device if generator else "cpu"))
    return TritonSteps(seed=seed, device=device)


# --- shared loop machinery ----------------------------------------------------------------------

class _Guard:
    """Checks network outputs: shapes on the host (free), finiteness on the device (no sync)."""

    def __init__(self, x: torch.Tensor):
        self.shape = x.shape
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=x.device)
        self.where = {}

    def __call__(self, out, name: str, i: int):
        if not torch.is_tensor(out):
            raise TypeError(f"{name} must return a tensor, got {type(out).__name__}")
        if out.shape != self.shape:
            raise ValueError(f"{name} returned shape {tuple(out.shape)}, expected {tuple(self.shape)} (same as x)")
        bad = ~torch.isfinite(out).all()
        self.first_bad = torch.where((self.first_bad < 0) & bad, torch.full_like(self.first_bad, i), self.first_bad)
        self.where.setdefault(i, name)
        return out

    def finish(self, ts):
        i = int(self.first_bad)  # the one host sync, after the loop
        if i >= 0:
            raise FloatingPointError(
                f"a network produced NaN or inf at step {i} (t = {float(ts[i]):.4g}); "
                f"check the score/projection network and its inputs at that time"
            )


def _times(ts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Grid on the device as (N+1, B) so that ts_b[i] is the (B,) time tensor of step i, no sync."""
    return ts.to(device=x.device, dtype=torch.float32)[:, None].expand(-1, x.shape[0])


def _table(d: dict, x):
    return {k: v.to(device=x.device, dtype=torch.float32) for k, v in d.items()}


def _check_grid(ts):
    if not torch.is_tensor(ts) or ts.ndim != 1 or ts.numel() < 2:
        raise ValueError("ts must be a 1-D tensor of at least 2 decreasing forward times (see ops.time_grid)")
    if not bool((ts[1:] < ts[:-1]).all()) or float(ts[-1]) <= 0 or float(ts[0]) > 1:
        raise ValueError("ts must decrease strictly within (0, 1]")


def _tweedie(sde, x, s, t):
    """E[x_0 | x_t] from the score (Tweedie): (x + sigma^2 s) / alpha."""
    from .sde import _bcast
    return (x + _bcast(sde.sigma(t) ** 2, x) * s) / _bcast(sde.alpha(t), x)



def _emit(callback, sde, i, ts, x_prev, x, s, **extra):
    if callback is None:
        return
    t = float(ts[i])
    info = {"i": i, "t": t, "t_next": float(ts[i + 1]), "x": x, "x_prev": x_prev, "score": s,
            "denoised": _tweedie(sde, x_prev, s, t)}
    info.update(extra)
    callback(info)


# --- samplers -----------------------------------------------------------------------------------

def reverse_sde(score_fn: ScoreFn, x: torch.Tensor, ts: torch.Tensor, *, a: float = 1.0, sde: VPSDE | None = None,
                denoise_last: bool = True, steps=None, callback=None, progress: bool = False) -> torch.Tensor:
    """The §6.2 family dx = (beta x + (1 + a) beta s) dtau + sqrt(2 a beta) dw, Euler-Maruyama on ts.

    a = 1 is the usual reverse SDE, a = 0 the probability-flow ODE (Euler). With denoise_last the
    final step returns its mean (no noise), as score_sde does. NFE = N.
    """
    sde = sde or VPSDE()
    steps = steps or TorchSteps()
    _check_grid(ts)
    n = ts.numel() - 1
    C = _table(ops.reverse_coefficients(sde, ts, a), x)
    tb, guard = _times(ts, x), _Guard(x)
    for i in tqdm(range(n), disable=not progress, desc=f"reverse_sde(a={a:g})", leave=False):
        s = guard(score_fn(x, tb[i]), "score_fn", i)
        noisy = a > 0 and not (denoise_last and i == n - 1)
        x_new = steps.em(x, s, C["c_x"][i], C["c_s"][i], C["c_z"][i] if noisy else None, i)
        _emit(callback, sde, i, ts, x, x_new, s)
        x = x_new
    guard.finish(ts)
    return x


def euler_maruyama(score_fn: ScoreFn, x: torch.Tensor, ts: torch.Tensor, **kw) -> torch.Tensor:
    """The score-based baseline (ALGORITHMS §2, eq. 9/29): x <- x + beta dtau (x + 2 s) + sqrt(2 beta dtau) z.

    This is `reverse_sde` with a = 1. NFE = N.
    """
    return reverse_sde(score_fn, x, ts, a=1.0, **kw)


def predict_project(score_fn: ScoreFn, x: torch.Tensor, ts: torch.Tensor, *, proj_fn: ScoreFn, delta_p: float,
                    sde: VPSDE | None = None, denoise_last: bool = True, steps=None, callback=None,
                    progress: bool = False) -> torch.Tensor:
    """Predict-Project sampling (Ghimire et al. Alg. 1; ALGORITHMS §2). NFE = 2N.

        x_pred = x + beta dtau (x + 2 s(x, t_i))                        # predict
        x      = x_pred + sqrt(beta) delta_p dtau T(x_pred, t_{i+1})     # project
                 + sqrt(2 beta dtau) z                                   # inject noise
    """
    if proj_fn is None:
        raise ValueError("predict_project needs proj_fn (the projection network T); use euler_maruyama without one")
    if delta_p is None or not delta_p >= 0:
        raise ValueError(f"delta_p must be a number >= 0, got {delta_p!r}")
    sde = sde or VPSDE()
    steps = steps or TorchSteps()
    _check_grid(ts)
    n = ts.numel() - 1
    C = _table(ops.reverse_coefficients(sde, ts, 1.0), x)
    c_T = ops.project_coefficients(sde, ts, delta_p).to(device=x.device, dtype=torch.float32)
    tb, guard = _times(ts, x), _Guard(x)
    for i in tqdm(range(n), disable=not progress, desc="predict_project", leave=False):
        s = guard(score_fn(x, tb[i]), "score_fn", i)
        x_pred = steps.predict(x, s, C["c_x"][i], C["c_s"][i])
        T = guard(proj_fn(x_pred, tb[i + 1]), "proj_fn", i)
        noisy = not (denoise_last and i == n - 1)
        x_new = steps.project(x_pred, T, c_T[i], C["c_z"][i] if noisy else None, i)
        _emit(callback, sde, i, ts, x, x_new, s, x_pred=x_pred, proj=T)
        x = x_new
    guard.finish(ts)
    return x


def heun_ode(score_fn: ScoreFn, x: torch.Tensor, ts: torch.Tensor, *, sde: VPSDE | None = None,
             steps=None, callback=None, progress: bool = False, **_unused) -> torch.Tensor:
    """Heun (2nd order) on the probability-flow ODE dx/dtau = beta (x + s). NFE = 2N.

    The grid ends at t_N = eps > 0, so every step, the last included, takes its correction.
    """
    sde = sde or VPSDE()
    steps = steps or TorchSteps()
    _check_grid(ts)
    n = ts.numel() - 1
    C = _table(ops.heun_coefficients(sde, ts), x)
    tb, guard = _times(ts, x), _Guard(x)
    for i in tqdm(range(n), disable=not progress, desc="heun_ode", leave=False):
        s = guard(score_fn(x, tb[i]), "score_fn", i)
        x_p = steps.predict(x, s, C["p_x"][i], C["p_s"][i])
        s_p = guard(score_fn(x_p, tb[i + 1]), "score_fn", i)
        x_new = steps.heun(x, s, x_p, s_p, C["c_x"][i], C["c_s"][i], C["c_xp"][i], C["c_sp"][i])
        _emit(callback, sde, i, ts, x, x_new, s, x_pred=x_p)
        x = x_new
    guard.finish(ts)
    return x


def langevin(score_fn: ScoreFn, x: torch.Tensor, ts: torch.Tensor, *, t_target: float | None = None,
             sde: VPSDE | None = None, denoise_last: bool = True, steps=None, callback=None,
             progress: bool = False) -> torch.Tensor:
    """Langevin dynamics toward a fixed target p = exp(-V) (ALGORITHMS §4, Ghimire et al. §6.3).

    x <- x + beta_i dtau s(x, t_target) + sqrt(2 beta_i dtau) z, i.e. -grad V = s(., t_target)
    with t_target = ts[-1] by default (the data end). Step sizes follow the same beta schedule as
    the reverse SDE, so the two can be compared step for step: Langevin follows a *fixed*
    energy, the reverse SDE the time-varying gradient flow of -KL. NFE = N.
    """
    sde = sde or VPSDE()
    steps = steps or TorchSteps()
    _check_grid(ts)
    n = ts.numel() - 1
    dtau = ts[:-1] - ts[1:]
    beta = sde.beta(ts[:-1])
    C = _table({"c_s": beta * dtau, "c_z": torch.sqrt(2 * beta * dtau)}, x)
    t_fix = float(ts[-1]) if t_target is None else float(t_target)
    tb = torch.full((x.shape[0],), t_fix, device=x.device, dtype=torch.float32)
    guard = _Guard(x)
    for i in tqdm(range(n), disable=not progress, desc="langevin", leave=False):
        s = guard(score_fn(x, tb), "score_fn", i)
        noisy = not (denoise_last and i == n - 1)
        x_new = steps.em(x, s, 1.0, C["c_s"][i], C["c_z"][i] if noisy else None, i)
        _emit(callback, sde, i, ts, x, x_new, s)
        x = x_new
    guard.finish(ts)
    return x


SAMPLERS = {
    "euler_maruyama": euler_maruyama,
    "predict_project": predict_project,
    "reverse_sde": reverse_sde,
    "heun_ode": heun_ode,
    "langevin": langevin,
}

#: network evaluations per step of each sampler
NFE_PER_STEP = {"euler_maruyama": 1, "predict_project": 2, "reverse_sde": 1, "heun_ode": 2, "langevin": 1}


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations that `sampler` spends for N = steps (Predict-Project: 2 per step)."""
    if sampler not in NFE_PER_STEP:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    return NFE_PER_STEP[sampler] * steps


class _Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


@torch.no_grad()  # sampling never needs gradients; without this, networks with parameters build a graph over all N steps
def sample(score_fn: ScoreFn, shape, steps: int, sampler: str = "predict_project", proj_fn: ScoreFn | None = None,
           delta_p: float | None = None, a: float = 1.0, sde: VPSDE | None = None, seed: int | None = None,
           generator: torch.Generator | None = None, device=None, dtype: torch.dtype = torch.float32,
           eps: float = 1e-3, denoise_last: bool = True, backend: str = "auto", progress: bool = False,
           callback=None, return_nfe: bool = False):
    """Draw samples of shape `shape` by running `sampler` for `steps` steps from the prior N(0, I).

    score_fn(x, t) -> grad log p_t(x) and proj_fn(x, t) -> T(x, t) take t of shape (B,) in forward
    time. `delta_p=None` takes the paper's value for N (`ops.default_delta_p`). `seed` (or an
    explicit `generator`) fixes the prior draw and the noise. `backend`: "torch", "triton" (fused
    kernels; the interpreter on CPU) or "auto" (triton on CUDA when available, else torch).
    `callback(info)` gets a dict per step (i, t, x, x_prev, score, denoised, ...).
    Returns x, or (x, nfe) with return_nfe=True, nfe being the network evaluations actually made.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    shape = tuple(int(d) for d in (shape if not isinstance(shape, int) else (shape,)))
    if len(shape) < 1 or min(shape) < 1:
        raise ValueError(f"shape must be (B, ...) with positive sizes, got {shape}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if a < 0:
        raise ValueError(f"a must be >= 0, got {a}")
    if sampler == "predict_project":
        if proj_fn is None:
            raise ValueError("sampler='predict_project' needs proj_fn (the projection network T)")
        if delta_p is None:
            delta_p = ops.default_delta_p(steps)
        if delta_p < 0:
            raise ValueError(f"delta_p must be >= 0, got {delta_p}")
    sde = sde or VPSDE()
    device = torch.device(device) if device is not None else torch.get_default_device()
    if generator is None:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(int(seed))
        else:
            generator.seed()
    elif seed is not None:
        raise ValueError("pass either seed or generator, not both")
    step_backend = make_steps(backend, device, generator=generator, seed=seed)
    ts = ops.time_grid(steps, eps)
    x = sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
    score_c = _Counted(score_fn)
    kw = dict(sde=sde, steps=step_backend, callback=callback, progress=progress)
    if sampler != "heun_ode":
        kw["denoise_last"] = denoise_last
    if sampler == "predict_project":
        proj_c = _Counted(proj_fn)
        x = predict_project(score_c, x, ts, proj_fn=proj_c, delta_p=delta_p, **kw)
        calls = score_c.calls + proj_c.calls
    else:
        if sampler == "reverse_sde":
            kw["a"] = a
        x = SAMPLERS[sampler](score_c, x, ts, **kw)
        calls = score_c.calls
    return (x, calls) if return_nfe else x


def eps_to_score(eps_model: ScoreFn, sde: VPSDE | None = None) -> ScoreFn:
    """Turn an epsilon-prediction network eps(x, t) into a score: s = -eps / sigma_t (ALGORITHMS §1)."""
    sde = sde or VPSDE()

    def score_fn(x, t):
        from .sde import _bcast
        return -eps_model(x, t) / _bcast(sde.sigma(t), x)

    return score_fn


def tweedie_proj_fn(score_fn: ScoreFn, steps: int, sde: VPSDE | None = None, eps: float = 1e-3) -> ScoreFn:
    """A training-free projection T built from the score by Tweedie's formula (our ablation, not the paper's).

    The optimum of the projection loss (ALGORITHMS §3) is T* = (alpha_{t'} E[x_0 | x_pred] - x_pred) / (1 + kappa),
    kappa = sqrt(beta(t)) / 2, t = t' + dtau. Treating x_pred as a draw of mu_{t'}, E[x_0 | x_pred] is
    approximated by Tweedie at t'. It costs one extra score evaluation per step, like a learned T.
    """
    sde = sde or VPSDE()
    dtau = (1.0 - eps) / steps

    def proj_fn(x, t_prev):
        from .sde import _bcast
        x0_hat = _tweedie(sde, x, score_fn(x, t_prev), t_prev)
        kappa = torch.sqrt(sde.beta(t_prev.to(torch.float64) + dtau)) / 2
        return (_bcast(sde.alpha(t_prev), x) * x0_hat - x) / _bcast(1.0 + kappa, x)

    return proj_fn


__all__ = ["sample", "tweedie_proj_fn", "euler_maruyama", "predict_project", "reverse_sde", "heun_ode", "langevin", "SAMPLERS",
           "NFE_PER_STEP", "nfe", "eps_to_score", "TorchSteps", "make_steps"]
