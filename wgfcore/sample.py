"""Samplers for the VP reverse process, one spec each, and the one entry point `sample(...)`.

ALGORITHMS §2 and §4: Euler-Maruyama (the score-based baseline), Predict-Project (Ghimire et al.
Alg. 1), the §6.2 reverse family with parameter `a` (a = 0 is the probability-flow ODE), Heun on
the PF-ODE, Langevin toward a fixed target, and Predict-Project with a Tweedie T at no extra
cost (ours). Each sampler is one `register_sampler` call: its loop body (k-diffusion style, the
symbols of ALGORITHMS.md), its coefficient tables, its NFE per step and the options it takes. Every
sampler function has one signature, `(score_fn, x, ts, *, proj_fn, delta_p, a, t_target, sde,
denoise_last, step_backend, callback, progress)`; an option a sampler has no use for is an error.
The run machinery is `wgfcore.loop`, the step backends `wgfcore.backends`, the graphs `wgfcore.graphs`.
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch

from . import graphs, ops
from .backends import FLAG_CLEAR, draw_key, make_steps, resolve_backend
from .graphs import cached_graphs, graph_stats, release_graphs
from .loop import NFE_PER_STEP, REQUIRED, SAMPLERS, Run, check_options, get_spec, register_sampler, run_sampler
from .ops import TorchSteps
from .sde import VPSDE, bcast, eps_to_score, tweedie

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _table(C: dict, *cols: str) -> torch.Tensor:
    return torch.stack([C[c] for c in cols], 1)


# --- the samplers -------------------------------------------------------------------------------

def _em_body(r: Run, x: torch.Tensor) -> torch.Tensor:
    """One network call and one Euler-Maruyama-shaped update x <- c_x x + c_s s + c_z z per step."""
    score, em, t, noisy, emit, spare = r.score, r.B.em, r.t, r.noisy, r.emit, r.spare
    for i in r.steps():
        s = score(x, t[i])
        x_next = em(x, s, "em", i, noisy[i], out=spare(s))
        if emit:
            emit(i, x, x_next, s)
        x = x_next
    return x


euler_maruyama = register_sampler(
    "euler_maruyama", nfe_per_step=1,
    tables=lambda sde, ts: {"em": _table(ops.reverse_coefficients(sde, ts, 1.0), "c_x", "c_s", "c_z")},
    doc="""The score-based baseline (ALGORITHMS §2, eq. 9/29): x <- x + beta dtau (x + 2 s) + sqrt(2 beta dtau) z.

    This is `reverse_sde` with a = 1. With denoise_last the final step returns its mean. NFE = N.
    """)(_em_body)

reverse_sde = register_sampler(
    "reverse_sde", nfe_per_step=1, options={"a": 1.0},
    tables=lambda sde, ts, a: {"em": _table(ops.reverse_coefficients(sde, ts, a), "c_x", "c_s", "c_z")},
    doc="""The §6.2 family dx = (beta x + (1 + a) beta s) dtau + sqrt(2 a beta) dw, Euler-Maruyama on ts.

    a = 1 (the default) is the usual reverse SDE, a = 0 the probability-flow ODE (Euler, no noise drawn).
    With denoise_last the final step returns its mean (no noise), as score_sde does. NFE = N.
    """)(_em_body)

langevin = register_sampler(
    "langevin", nfe_per_step=1, options={"t_target": None},
    tables=lambda sde, ts, t_target: {"em": _table(ops.langevin_coefficients(sde, ts), "c_x", "c_s", "c_z"),
                                      "t": torch.full_like(ts, float(ts[-1]) if t_target is None else t_target)},
    doc="""Langevin dynamics toward a fixed target p = exp(-V) (ALGORITHMS §4, Ghimire et al. §6.3).

    x <- x + beta_i dtau s(x, t_target) + sqrt(2 beta_i dtau) z, i.e. -grad V = s(., t_target)
    with t_target = ts[-1] by default (the data end). Step sizes follow the same beta schedule as
    the reverse SDE, so the two can be compared step for step: Langevin follows a *fixed*
    energy, the reverse SDE the time-varying gradient flow of -KL. NFE = N.
    """)(_em_body)

predict_project_tweedie = register_sampler(
    "predict_project_tweedie", nfe_per_step=1, options={"delta_p": REQUIRED},
    tables=lambda sde, ts, delta_p: {
        "em": _table(ops.tweedie_project_coefficients(sde, ts, delta_p), "c_x", "c_s", "c_z")},
    doc="""Predict-Project with a training-free T from the step's own score (ours, not the paper's). NFE = N.

    T = (alpha_{t_{i+1}} E[x_0 | x_i] - x_pred) / (1 + sqrt(beta_i) / 2), the optimum of the projection
    loss (ALGORITHMS §3) with E[x_0 | x_i] = (x_i + sigma_i^2 s(x_i, t_i)) / alpha_i by Tweedie: the
    score the predict step already took, so no second evaluation (unlike `tweedie_proj_fn`). The
    whole step is then one update x <- c_x x + c_s s + c_z z (`ops.tweedie_project_coefficients`).
    """)(_em_body)


@register_sampler("predict_project", nfe_per_step=2, options={"proj_fn": REQUIRED, "delta_p": REQUIRED},
                  tables=lambda sde, ts, delta_p: {
                      "predict": _table(ops.reverse_coefficients(sde, ts, 1.0), "c_x", "c_s"),
                      "project": torch.stack([ops.project_coefficients(sde, ts, delta_p),
                                              ops.reverse_coefficients(sde, ts, 1.0)["c_z"]], 1)})
def predict_project(r: Run, x: torch.Tensor) -> torch.Tensor:
    """Predict-Project sampling (Ghimire et al. Alg. 1; ALGORITHMS §2). NFE = 2N. Needs proj_fn and delta_p.

        x_pred = x + beta dtau (x + 2 s(x, t_i))                        # predict
        x      = x_pred + sqrt(beta) delta_p dtau T(x_pred, t_{i+1})     # project
                 + sqrt(2 beta dtau) z                                   # inject noise
    """
    score, T_net, B, t, noisy, emit, spare = r.score, r.proj, r.B, r.t, r.noisy, r.emit, r.spare
    for i in r.steps():
        s = score(x, t[i])
        x_pred = B.predict(x, s, "predict", i, out=spare(s))
        T = T_net(x_pred, t[i + 1])
        x_next = B.project(x_pred, T, "project", i, noisy[i], out=spare(T))
        if emit:
            emit(i, x, x_next, s, x_pred=x_pred, proj=T)
        x = x_next
    return x


@register_sampler("heun_ode", nfe_per_step=2, tables=lambda sde, ts: {
    "predict": _table(ops.heun_coefficients(sde, ts), "p_x", "p_s"),
    "heun": _table(ops.heun_coefficients(sde, ts), "c_x", "c_s", "c_xp", "c_sp")})
def heun_ode(r: Run, x: torch.Tensor) -> torch.Tensor:
    """Heun (2nd order) on the probability-flow ODE dx/dtau = beta (x + s). NFE = 2N.

        x' = x + h beta_i (x + s(x, t_i))                                   # Euler predictor
        x  = x + h/2 [beta_i (x + s(x, t_i)) + beta_{i+1} (x' + s(x', t_{i+1}))]   # trapezoidal corrector

    The grid ends at t_N = eps > 0, so every step, the last included, takes its correction. The
    ODE has no noise, so every step is already noise-free and `denoise_last` changes nothing.
    """
    score, B, t, emit, spare = r.score, r.B, r.t, r.emit, r.spare
    for i in r.steps():
        s = score(x, t[i])
        x_p = B.predict(x, s, "predict", i)  # s is read again below: not spared
        s_p = score(x_p, t[i + 1])
        x_next = B.heun(x, s, x_p, s_p, "heun", i, out=spare(s_p))
        if emit:
            emit(i, x, x_next, s, x_pred=x_p)
        x = x_next
    return x


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations that `sampler` spends for N = steps (Predict-Project: 2 per step)."""
    return get_spec(sampler).nfe_per_step * steps


# --- the entry point ----------------------------------------------------------------------------

def _check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    seed = int(seed)
    if not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must lie in [-2**63, 2**64) (torch.Generator.manual_seed), got {seed}")
    return seed


def _check_shape(shape) -> tuple:
    dims = (shape,) if isinstance(shape, numbers.Integral) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise ValueError(f"shape must be (B, ...) of positive integers, got {shape!r}") from None
    if not dims or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in dims):
        raise ValueError(f"shape must be (B, ...) of positive integers, got {shape!r}")
    return tuple(int(d) for d in dims)


def _generator(generator, seed, device):
    if generator is not None:
        return generator
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


@torch.no_grad()  # sampling never needs gradients; without this, networks with parameters build a graph over all N steps
def sample(score_fn: ScoreFn, shape, steps: int, sampler: str = "predict_project", proj_fn: ScoreFn | None = None,
           delta_p: float | None = None, a: float | None = None, t_target: float | None = None,
           sde: VPSDE | None = None, seed: int | None = None, generator: torch.Generator | None = None, device=None,
           dtype: torch.dtype = torch.float32, eps: float = 1e-3, denoise_last: bool = True, backend: str = "auto",
           progress: bool = False, callback=None, return_nfe: bool = False, cuda_graph: bool = False):
    """Draw samples of shape `shape` by running `sampler` for `steps` steps from the prior N(0, I).

    score_fn(x, t) -> grad log p_t(x) and proj_fn(x, t) -> T(x, t) take t of shape (B,) in forward
    time and return a floating tensor of x's shape on x's device (any floating dtype: it is read
    as is and the update computed in fp32; the Triton backend copies a non-contiguous output to a
    contiguous one, values unchanged).
    Options go only to the samplers that take them (`proj_fn` and `delta_p`: predict_project;
    `delta_p`: predict_project_tweedie; `a`: reverse_sde; `t_target`: langevin); giving one to
    another sampler is an error. `delta_p=None` takes the paper's value for N (`ops.default_delta_p`).
    `seed` (any integer torch.Generator.manual_seed takes) or an explicit `generator` fixes the
    prior draw and the noise. `backend`: "auto" (the best available for the device, see
    `wgfcore.backends`: triton on CUDA, cpp on a CPU where it builds, else torch), "torch",
    "triton" (fused kernels; the interpreter on CPU), "cpp" (fused C++ steps on a CPU, the Triton
    kernels' noise; `kernels.cpu_steps`) or another registered name. `callback(info)` gets a dict per step (i, t, x, x_prev, score, denoised, ...).
    A NaN or inf from a network raises FloatingPointError naming the first bad step and its t.

    `cuda_graph=True` (CUDA only; no callback, no progress): the N-step loop, networks included, is
    captured into a CUDA graph the second time the same work is asked for and replayed from then on
    (see `wgfcore.graphs` for what the cache key covers, when a call runs eagerly, and when to leave
    graphs off). Returns x, or (x, nfe) with return_nfe=True, nfe being the network evaluations made.
    """
    spec = get_spec(sampler)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    steps, seed, shape = int(steps), _check_seed(seed), _check_shape(shape)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
    options = dict(proj_fn=proj_fn, delta_p=delta_p, a=a, t_target=t_target)
    if "delta_p" in spec.options and delta_p is None:
        options["delta_p"] = ops.default_delta_p(steps)
    options = check_options(spec, options)
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    if cuda_graph and (callback is not None or progress):
        raise ValueError("cuda_graph=True replays a captured loop: callback= and progress=True cannot run inside it; "
                         "drop them or use cuda_graph=False")
    sde = sde or VPSDE()
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got device={device}")
    name = resolve_backend(backend, device)
    ts = ops.time_grid(steps, eps)

    def eager(generator=generator):
        generator = _generator(generator, seed, device)
        # The prior draw, then (keyed backends) the noise key: the order a graph replay uses too.
        x = sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
        return run_sampler(spec, score_fn, x, ts, options, sde=sde, denoise_last=denoise_last,
                           step_backend=make_steps(name, device, generator=generator), callback=callback,
                           progress=progress)

    if cuda_graph:
        x, n = graphs.sample_graph(spec, score_fn, shape, dtype, device, name, ts, options, sde, denoise_last,
                                   seed, generator, eager)
    else:
        x, n = eager()
    return (x, n) if return_nfe else x


def tweedie_proj_fn(score_fn: ScoreFn, steps: int, sde: VPSDE | None = None, eps: float = 1e-3) -> ScoreFn:
    """A training-free projection T built from the score by Tweedie's formula (our ablation, not the paper's).

    The optimum of the projection loss (ALGORITHMS §3) is T* = (alpha_{t'} E[x_0 | x_pred] - x_pred) / (1 + kappa),
    kappa = sqrt(beta(t)) / 2, t = t' + dtau. Treating x_pred as a draw of mu_{t'}, E[x_0 | x_pred] is
    approximated by Tweedie at t'. It costs one extra score evaluation per step, like a learned T;
    the sampler `predict_project_tweedie` reuses the step's own score instead (NFE = N).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (the N that T is used with), got {steps!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    sde = sde or VPSDE()
    dtau = (1.0 - eps) / int(steps)

    def proj_fn(x, t_prev):
        x0_hat = tweedie(x, score_fn(x, t_prev), t_prev, sde)
        kappa = torch.sqrt(sde.beta(t_prev.to(torch.float64) + dtau)) / 2
        return (bcast(sde.alpha(t_prev), x) * x0_hat - x) / bcast(1.0 + kappa, x)

    return proj_fn


__all__ = ["sample", "tweedie_proj_fn", "euler_maruyama", "predict_project", "predict_project_tweedie", "reverse_sde",
           "heun_ode", "langevin", "register_sampler", "SAMPLERS", "NFE_PER_STEP", "nfe", "eps_to_score", "TorchSteps",
           "make_steps", "resolve_backend", "draw_key", "FLAG_CLEAR", "release_graphs", "cached_graphs", "graph_stats"]
