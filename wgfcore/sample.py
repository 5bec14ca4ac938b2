"""Samplers for the VP reverse process, as plain functions, plus one `sample(...)` entry point.

ALGORITHMS §2 and §4: Euler-Maruyama (score-based baseline), Predict-Project (Ghimire et al.
Alg. 1), the §6.2 reverse family with parameter `a` (a = 0 is the probability-flow ODE), Heun on
the PF-ODE, and Langevin dynamics toward a fixed target. Every sampler has one signature,
`(score_fn, x, ts, *, proj_fn, delta_p, a, t_target, sde, denoise_last, step_backend, callback,
progress)`, k-diffusion style; an option a sampler has no use for is an error, never ignored.
ts is the forward-time grid t_0 = 1 > ... > t_N = eps. The update arithmetic lives in
`wgfcore.ops` (`TorchSteps`) or in the fused Triton kernels (`kernels.sampler_step.TritonSteps`);
everything a run needs is computed before its loop (a `_Plan`), and the loop makes no host sync:
non-finite network outputs are recorded in a device flag and reported once, at the end. With
`sample(..., cuda_graph=True)` the whole loop, networks included, is captured once and replayed.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections import OrderedDict
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import ops
from .ops import TorchSteps
from .sde import VPSDE, _bcast

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- step backends ------------------------------------------------------------------------------

_warned_interpreter = False


def draw_key(generator: torch.Generator | None, device) -> torch.Tensor:
    """The Triton backend's noise key: a 0-d int64 tensor on `device`, drawn from `generator`.

    Drawn on the device (no host sync); the kernels use its low 32 bits with the step index.
    """
    return torch.randint(0, 2**32, (), generator=generator, device=device, dtype=torch.int64)


def make_steps(backend: str, device, generator=None, seed: int | None = None):
    """Resolve a backend name ("auto", "torch", "triton") to a step backend for `device`.

    Triton: the noise key is `seed` if given (an integer in [0, 2**32)), else drawn from `generator`.
    """
    global _warned_interpreter
    device = torch.device(device)
    name = resolve_backend(backend, device)
    if name == "torch":
        return TorchSteps(generator)
    from kernels.sampler_step import TritonSteps
    if device.type != "cuda" and not _warned_interpreter:
        warnings.warn("backend='triton' on CPU runs the Triton interpreter: a correctness mode, not a fast path",
                      stacklevel=3)
        _warned_interpreter = True
    return TritonSteps(seed=draw_key(generator, device) if seed is None else seed, device=device)


def resolve_backend(backend: str, device) -> str:
    """"auto" -> "triton" on CUDA when the kernels import, else "torch"; checks the name."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend != "auto":
        if backend == "triton":
            try:
                import kernels.sampler_step  # noqa: F401
            except ImportError as e:  # pragma: no cover - depends on the install
                raise ImportError(f"backend='triton' needs the `kernels` package and triton: {e}") from e
        return backend
    if torch.device(device).type == "cuda":
        try:
            import kernels.sampler_step  # noqa: F401
            return "triton"
        except ImportError:  # pragma: no cover - depends on the install
            pass
    return "torch"


# --- shared loop machinery ----------------------------------------------------------------------

#: a guard flag's value while every network output was finite (then: the first bad step)
FLAG_CLEAR = 2**62


class _Guard:
    """Checks network outputs: shape, device and dtype on the host (free), finiteness on the device.

    The first step with a non-finite output goes into a device flag (no sync); `finish` reads it
    once, after the loop. A backend with a `finite_flag` (TritonSteps) checks finiteness inside
    its step kernels, which read the outputs anyway: no extra launch per network call. Otherwise
    (TorchSteps) the guard checks with torch. Outputs pass through the backend's `accept`.
    """

    def __init__(self, x: torch.Tensor, backend):
        self.shape, self.device, self.accept = x.shape, x.device, backend.accept
        flag = getattr(backend, "finite_flag", None)
        self.in_kernel = flag is not None
        self.first_bad = flag if self.in_kernel else torch.full((), FLAG_CLEAR, dtype=torch.int64, device=x.device)

    def reset(self):
        self.first_bad.fill_(FLAG_CLEAR)

    def __call__(self, out, name: str, i: int):
        if not torch.is_tensor(out):
            raise TypeError(f"{name} must return a tensor, got {type(out).__name__}")
        if out.shape != self.shape:
            raise ValueError(f"{name} returned shape {tuple(out.shape)}, expected {tuple(self.shape)} (same as x)")
        if out.device != self.device:
            raise ValueError(f"{name} returned a tensor on {out.device}, expected {self.device} (same as x)")
        if not out.is_floating_point():
            raise TypeError(f"{name} returned dtype {out.dtype}, expected a floating tensor")
        out = self.accept(out)
        if not self.in_kernel:
            self.first_bad.masked_fill_((self.first_bad > i) & ~torch.isfinite(out).all(), i)
        return out

    def finish(self, ts):
        i = int(self.first_bad)  # the one host sync, after the loop
        if i < FLAG_CLEAR:
            raise FloatingPointError(
                f"a network produced NaN or inf at step {i} (t = {float(ts[i]):.4g}); "
                f"check the score/projection network and its inputs at that time"
            )


def _check_grid(ts):
    if not torch.is_tensor(ts) or ts.ndim != 1 or ts.numel() < 2:
        raise ValueError("ts must be a 1-D tensor of at least 2 decreasing forward times (see ops.time_grid)")
    ts = ts.detach().to("cpu", torch.float64)
    if not bool((ts[1:] < ts[:-1]).all()) or float(ts[-1]) <= 0 or float(ts[0]) > 1:
        raise ValueError("ts must decrease strictly within (0, 1]")
    return ts


def _tweedie(sde, x, s, t):
    """E[x_0 | x_t] from the score (Tweedie): (x + sigma^2 s) / alpha."""
    return (x + _bcast(sde.sigma(t) ** 2, x) * s) / _bcast(sde.alpha(t), x)


def _emit(callback, sde, i, ts, x_prev, x, s, **extra):
    t = float(ts[i])
    info = {"i": i, "t": t, "t_next": float(ts[i + 1]), "x": x, "x_prev": x_prev, "score": s,
            "denoised": _tweedie(sde, x_prev, s, t)}
    info.update(extra)
    callback(info)


def _number(name, v, lo=0.0):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < lo:
        raise ValueError(f"{name} must be a finite number >= {lo:g}, got {v!r}")
    return float(v)


def _options(sampler, proj_fn, delta_p, a, t_target):
    """Check the options of one sampler: what it needs is given, what it has no use for is not."""
    unused = {"proj_fn": proj_fn, "delta_p": delta_p, "a": a, "t_target": t_target}
    if sampler == "predict_project":
        if proj_fn is None:
            raise ValueError("predict_project needs proj_fn (the projection network T); use euler_maruyama without one")
        if delta_p is None:
            raise ValueError("predict_project needs delta_p (ops.default_delta_p(N) gives the paper's value)")
        delta_p = _number("delta_p", delta_p)
        del unused["proj_fn"], unused["delta_p"]
    elif sampler == "reverse_sde":
        a = 1.0 if a is None else _number("a", a)
        del unused["a"]
    elif sampler == "langevin":
        if t_target is not None:
            t_target = _number("t_target", t_target)
            if not 0 < t_target <= 1:
                raise ValueError(f"t_target must lie in (0, 1], got {t_target}")
        del unused["t_target"]
    for k, v in unused.items():
        if v is not None:
            raise ValueError(f"{sampler} takes no {k} (got {v!r})")
    return dict(delta_p=delta_p, a=a, t_target=t_target)


class _Plan:
    """Everything one sampling run computes before its loop (ALGORITHMS §2: coefficients up front).

    Validates the grid and the options once, builds the coefficient tables on x's device, hands
    them to the step backend's `plan` (which validates the state and binds its launches), and
    keeps per-step time tensors and noise flags, so that the loop only calls networks and steps.
    """

    def __init__(self, sampler, x, ts, *, proj_fn, delta_p, a, t_target, sde, denoise_last, step_backend):
        if not torch.is_tensor(x) or x.ndim < 1 or not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor of shape (B, ...), got {getattr(x, 'shape', x)!r}")
        opt = _options(sampler, proj_fn, delta_p, a, t_target)
        self.sampler, self.sde = sampler, sde or VPSDE()
        self.ts = _check_grid(ts)
        self.n = n = self.ts.numel() - 1
        self.backend = step_backend if step_backend is not None else TorchSteps()
        sde, ts = self.sde, self.ts
        dev = dict(device=x.device, dtype=torch.float32)
        last = [bool(denoise_last) and i == n - 1 for i in range(n)]
        if sampler in ("euler_maruyama", "reverse_sde", "predict_project"):
            a = 1.0 if sampler != "reverse_sde" else opt["a"]
            C = ops.reverse_coefficients(sde, ts, a)
            if sampler == "predict_project":
                c_T = ops.project_coefficients(sde, ts, opt["delta_p"])
                tables = {"predict": torch.stack([C["c_x"], C["c_s"]], 1), "project": torch.stack([c_T, C["c_z"]], 1)}
                self.noisy = [not b for b in last]
            else:
                tables = {"em": torch.stack([C["c_x"], C["c_s"], C["c_z"]], 1)}
                self.noisy = [a > 0 and not b for b in last]
            self.t = list(ts.to(**dev)[:, None].expand(-1, x.shape[0]).unbind(0))
        elif sampler == "heun_ode":
            C = ops.heun_coefficients(sde, ts)
            tables = {"predict": torch.stack([C["p_x"], C["p_s"]], 1),
                      "heun": torch.stack([C["c_x"], C["c_s"], C["c_xp"], C["c_sp"]], 1)}
            self.t = list(ts.to(**dev)[:, None].expand(-1, x.shape[0]).unbind(0))
        elif sampler == "langevin":
            dtau = ts[:-1] - ts[1:]
            beta = sde.beta(ts[:-1])
            tables = {"em": torch.stack([torch.ones_like(beta), beta * dtau, torch.sqrt(2 * beta * dtau)], 1)}
            self.noisy = [not b for b in last]
            t_fix = float(ts[-1]) if opt["t_target"] is None else opt["t_target"]
            self.t = [torch.full((x.shape[0],), t_fix, **dev)] * (n + 1)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        self.backend.plan(x, {k: v.to(**dev) for k, v in tables.items()})
        self.guard = _Guard(x, self.backend)


def _steps_iter(p: _Plan, progress: bool):
    return tqdm(range(p.n), desc=p.sampler, leave=False) if progress else range(p.n)


def _loop_em(p: _Plan, score_fn, proj_fn, x, callback, progress):
    """Euler-Maruyama family and Langevin: one network call and one `em` update per step."""
    B, guard, t = p.backend, p.guard, p.t
    for i in _steps_iter(p, progress):
        s = guard(score_fn(x, t[i]), "score_fn", i)
        x_new = B.em(x, s, "em", i, p.noisy[i])
        if callback is not None:
            _emit(callback, p.sde, i, p.ts, x, x_new, s)
        x = x_new
    return x


def _loop_predict_project(p: _Plan, score_fn, proj_fn, x, callback, progress):
    B, guard, t = p.backend, p.guard, p.t
    for i in _steps_iter(p, progress):
        s = guard(score_fn(x, t[i]), "score_fn", i)
        x_pred = B.predict(x, s, "predict", i)
        T = guard(proj_fn(x_pred, t[i + 1]), "proj_fn", i)
        x_new = B.project(x_pred, T, "project", i, p.noisy[i])
        if callback is not None:
            _emit(callback, p.sde, i, p.ts, x, x_new, s, x_pred=x_pred, proj=T)
        x = x_new
    return x


def _loop_heun(p: _Plan, score_fn, proj_fn, x, callback, progress):
    B, guard, t = p.backend, p.guard, p.t
    for i in _steps_iter(p, progress):
        s = guard(score_fn(x, t[i]), "score_fn", i)
        x_p = B.predict(x, s, "predict", i)
        s_p = guard(score_fn(x_p, t[i + 1]), "score_fn", i)
        x_new = B.heun(x, s, x_p, s_p, "heun", i)
        if callback is not None:
            _emit(callback, p.sde, i, p.ts, x, x_new, s, x_pred=x_p)
        x = x_new
    return x


_LOOPS = {"euler_maruyama": _loop_em, "reverse_sde": _loop_em, "langevin": _loop_em,
          "predict_project": _loop_predict_project, "heun_ode": _loop_heun}


def _run(sampler, score_fn, x, ts, *, proj_fn, delta_p, a, t_target, sde, denoise_last, step_backend, callback,
         progress):
    p = _Plan(sampler, x, ts, proj_fn=proj_fn, delta_p=delta_p, a=a, t_target=t_target, sde=sde,
              denoise_last=denoise_last, step_backend=step_backend)
    x = _LOOPS[sampler](p, score_fn, proj_fn, x, callback, progress)
    p.guard.finish(p.ts)
    return x


# --- samplers: one signature -------------------------------------------------------------------
# (score_fn, x, ts, *, proj_fn, delta_p, a, t_target, sde, denoise_last, step_backend, callback,
#  progress). step_backend: a TorchSteps (default) or TritonSteps; callback(info) gets a dict per
# step; progress shows a tqdm bar. Options a sampler has no use for must stay None.

def reverse_sde(score_fn: ScoreFn, x: torch.Tensor, ts: torch.Tensor, *, proj_fn=None, delta_p=None,
                a: float | None = None, t_target=None, sde: VPSDE | None = None, denoise_last: bool = True,
                step_backend=None, callback=None, progress: bool = False) -> torch.Tensor:
    """The §6.2 family dx = (beta x + (1 + a) beta s) dtau + sqrt(2 a beta) dw, Euler-Maruyama on ts.

    a = 1 (the default) is the usual reverse SDE, a = 0 the probability-flow ODE (Euler). With
    denoise_last the final step returns its mean (no noise), as score_sde does. NFE = N.
    """
    return _run("reverse_sde", score_fn, x, ts, proj_fn=proj_fn, delta_p=delta_p, a=a, t_target=t_target, sde=sde,
                denoise_last=denoise_last, step_backend=step_backend, callback=callback, progress=progress)


def euler_maruyama(score_fn: ScoreFn, x: torch.Tensor, ts: torch.Tensor, *, proj_fn=None, delta_p=None, a=None,
                   t_target=None, sde: VPSDE | None = None, denoise_last: bool = True, step_backend=None,
                   callback=None, progress: bool = False) -> torch.Tensor:
    """The score-based baseline (ALGORITHMS §2, eq. 9/29): x <- x + beta dtau (x + 2 s) + sqrt(2 beta dtau) z.

    This is `reverse_sde` with a = 1. NFE = N.
    """
    return _run("euler_maruyama", score_fn, x, ts, proj_fn=proj_fn, delta_p=delta_p, a=a, t_target=t_target,
                sde=sde, denoise_last=denoise_last, step_backend=step_backend, callback=callback, progress=progress)


def predict_project(score_fn: ScoreFn, x: torch.Tensor, ts: torch.Tensor, *, proj_fn: ScoreFn | None = None,
                    delta_p: float | None = None, a=None, t_target=None, sde: VPSDE | None = None,
                    denoise_last: bool = True, step_backend=None, callback=None,
                    progress: bool = False) -> torch.Tensor:
    """Predict-Project sampling (Ghimire et al. Alg. 1; ALGORITHMS §2). NFE = 2N. Needs proj_fn and delta_p.

        x_pred = x + beta dtau (x + 2 s(x, t_i))                        # predict
        x      = x_pred + sqrt(beta) delta_p dtau T(x_pred, t_{i+1})     # project
                 + sqrt(2 beta dtau) z                                   # inject noise
    """
    return _run("predict_project", score_fn, x, ts, proj_fn=proj_fn, delta_p=delta_p, a=a, t_target=t_target,
                sde=sde, denoise_last=denoise_last, step_backend=step_backend, callback=callback, progress=progress)


def heun_ode(score_fn: ScoreFn, x: torch.Tensor, ts: torch.Tensor, *, proj_fn=None, delta_p=None, a=None,
             t_target=None, sde: VPSDE | None = None, denoise_last: bool = True, step_backend=None, callback=None,
             progress: bool = False) -> torch.Tensor:
    """Heun (2nd order) on the probability-flow ODE dx/dtau = beta (x + s). NFE = 2N.

    The grid ends at t_N = eps > 0, so every step, the last included, takes its correction. The
    ODE has no noise, so every step is already noise-free and `denoise_last` changes nothing.
    """
    return _run("heun_ode", score_fn, x, ts, proj_fn=proj_fn, delta_p=delta_p, a=a, t_target=t_target, sde=sde,
                denoise_last=denoise_last, step_backend=step_backend, callback=callback, progress=progress)


def langevin(score_fn: ScoreFn, x: torch.Tensor, ts: torch.Tensor, *, proj_fn=None, delta_p=None, a=None,
             t_target: float | None = None, sde: VPSDE | None = None, denoise_last: bool = True,
             step_backend=None, callback=None, progress: bool = False) -> torch.Tensor:
    """Langevin dynamics toward a fixed target p = exp(-V) (ALGORITHMS §4, Ghimire et al. §6.3).

    x <- x + beta_i dtau s(x, t_target) + sqrt(2 beta_i dtau) z, i.e. -grad V = s(., t_target)
    with t_target = ts[-1] by default (the data end). Step sizes follow the same beta schedule as
    the reverse SDE, so the two can be compared step for step: Langevin follows a *fixed*
    energy, the reverse SDE the time-varying gradient flow of -KL. NFE = N.
    """
    return _run("langevin", score_fn, x, ts, proj_fn=proj_fn, delta_p=delta_p, a=a, t_target=t_target, sde=sde,
                denoise_last=denoise_last, step_backend=step_backend, callback=callback, progress=progress)


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


# --- CUDA graphs --------------------------------------------------------------------------------

#: most captured sampling loops kept at once; the least recently used is released beyond it
GRAPH_CACHE_SIZE = 4
_GRAPHS: "OrderedDict[tuple, _Captured]" = OrderedDict()


def release_graphs() -> int:
    """Release every captured sampling loop (`sample(..., cuda_graph=True)`); returns how many."""
    n = len(_GRAPHS)
    _GRAPHS.clear()
    if n and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n


def cached_graphs() -> list[tuple]:
    """The keys of the captured loops now cached, least recently used first."""
    return list(_GRAPHS)


class _Captured:
    """One captured loop: static input (prior draw, noise key), static output, its plan, its graph.

    Holds the networks too, so that their ids in the cache key cannot be reused while it lives.
    """

    def __init__(self, sampler, plan, x_in, key, generator, fns, sampler_kw):
        self.sampler, self.plan, self.x_in, self.key, self.generator = sampler, plan, x_in, key, generator
        self.fns, self.sampler_kw = fns, sampler_kw
        self.graph, self.x_out, self.calls = None, None, 0

    def capture(self, score_fn, proj_fn):
        p, loop = self.plan, _LOOPS[self.sampler]
        # Warm-up on a side stream (as torch.cuda.graphs recommends): compiles the Triton kernels,
        # lets cuBLAS/cuDNN/torch.compile set up, so that the capture records steady-state work.
        side = torch.cuda.Stream(device=self.x_in.device)
        side.wait_stream(torch.cuda.current_stream(self.x_in.device))
        with torch.cuda.stream(side):
            self.x_in.normal_(generator=torch.Generator(self.x_in.device).manual_seed(0))
            loop(p, score_fn, proj_fn, self.x_in, None, False)
        torch.cuda.current_stream(self.x_in.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:  # torch backend: its noise generator becomes graph-safe
            graph.register_generator_state(self.generator)
        score_c, proj_c = _Counted(score_fn), _Counted(proj_fn) if proj_fn is not None else None
        with torch.cuda.graph(graph):
            p.guard.reset()
            self.x_out = loop(p, score_c, proj_c, self.x_in, None, False)
        self.graph = graph
        self.calls = score_c.calls + (proj_c.calls if proj_c is not None else 0)


def _graph_key(sampler, shape, dtype, device, backend, steps, eps, sde, denoise_last, sampler_kw, score_fn, proj_fn):
    return (sampler, shape, dtype, device, backend, steps, eps, sde, bool(denoise_last),
            tuple(sorted(sampler_kw.items())), id(score_fn), id(proj_fn))


def _seed_int(seed, generator, device) -> int:
    """A python seed for a graph's own generator (torch backend): `seed`, or one drawn from `generator`."""
    if seed is not None:
        return seed
    if generator is not None:
        return int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    return torch.Generator().seed()


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


@torch.no_grad()  # sampling never needs gradients; without this, networks with parameters build a graph over all N steps
def sample(score_fn: ScoreFn, shape, steps: int, sampler: str = "predict_project", proj_fn: ScoreFn | None = None,
           delta_p: float | None = None, a: float = 1.0, sde: VPSDE | None = None, seed: int | None = None,
           generator: torch.Generator | None = None, device=None, dtype: torch.dtype = torch.float32,
           eps: float = 1e-3, denoise_last: bool = True, backend: str = "auto", progress: bool = False,
           callback=None, return_nfe: bool = False, cuda_graph: bool = False):
    """Draw samples of shape `shape` by running `sampler` for `steps` steps from the prior N(0, I).

    score_fn(x, t) -> grad log p_t(x) and proj_fn(x, t) -> T(x, t) take t of shape (B,) in forward
    time and return a floating tensor of x's shape on x's device (any floating dtype: it is read
    as is and the update computed in fp32; the Triton backend copies a non-contiguous output to a
    contiguous one, values unchanged).
    `delta_p=None` takes the paper's value for N (`ops.default_delta_p`); samplers without a
    projection ignore delta_p, and every sampler but reverse_sde ignores a (both are still
    checked). `seed` (any integer torch.Generator.manual_seed takes) or an explicit `generator`
    fixes the prior draw and the noise. `backend`: "torch", "triton" (fused kernels; the
    interpreter on CPU) or "auto" (triton on CUDA when available, else torch).
    `callback(info)` gets a dict per step (i, t, x, x_prev, score, denoised, ...).

    `cuda_graph=True` (CUDA only; no callback, no progress): the whole N-step loop, networks
    included, is captured into a CUDA graph on first use and replayed afterwards. Captures are
    cached by (sampler, shape, dtype, device, backend, steps, eps, sde, denoise_last, delta_p or
    a, and the identities of score_fn and proj_fn); `release_graphs()` frees them, and at most
    `GRAPH_CACHE_SIZE` are kept. A replay reads the networks' parameters as they are then, but
    replays the Python control flow recorded at capture: networks whose work depends on Python
    state need `release_graphs()` after it changes. Networks under autocast should use
    `torch.autocast(..., cache_enabled=False)`. With the Triton backend a replay is bitwise equal
    to eager sampling with the same seed (the noise key is a device input: a new seed needs no
    new capture); with the torch backend the graph has its own generator, registered with the
    graph and seeded from `seed` each call (deterministic per seed, not equal to eager).
    Returns x, or (x, nfe) with return_nfe=True, nfe being the network evaluations actually made.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    seed = _check_seed(seed)
    shape = tuple(int(d) for d in (shape if not isinstance(shape, numbers.Integral) else (shape,)))
    if len(shape) < 1 or min(shape) < 1:
        raise ValueError(f"shape must be (B, ...) with positive sizes, got {shape}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
    a = _number("a", a)
    if delta_p is not None:
        delta_p = _number("delta_p", delta_p)
    if sampler == "predict_project":
        if proj_fn is None:
            raise ValueError("sampler='predict_project' needs proj_fn (the projection network T)")
        if delta_p is None:
            delta_p = ops.default_delta_p(steps)
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    if cuda_graph:
        if callback is not None or progress:
            raise ValueError("cuda_graph=True replays a captured loop: callback= and progress=True cannot run "
                             "inside it; drop them or use cuda_graph=False")
    sde = sde or VPSDE()
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got device={device}")
    backend_name = resolve_backend(backend, device)
    kw = {}
    if sampler == "predict_project":
        kw = dict(proj_fn=proj_fn, delta_p=delta_p)
    elif sampler == "reverse_sde":
        kw = dict(a=a)
    ts = ops.time_grid(steps, eps)
    if cuda_graph:
        return _sample_graph(score_fn, proj_fn, shape, steps, sampler, kw, sde, seed, generator, device, dtype, eps,
                             denoise_last, backend_name, return_nfe, ts)
    if generator is None:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    # The prior draw, then (Triton) the noise key: the same order as a graph replay, hence its bits.
    x = sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
    step_backend = make_steps(backend_name, device, generator=generator)
    score_c = _Counted(score_fn)
    proj_c = _Counted(proj_fn) if sampler == "predict_project" else None
    if proj_c is not None:
        kw["proj_fn"] = proj_c
    x = SAMPLERS[sampler](score_c, x, ts, sde=sde, denoise_last=denoise_last, step_backend=step_backend,
                          callback=callback, progress=progress, **kw)
    calls = score_c.calls + (proj_c.calls if proj_c is not None else 0)
    return (x, calls) if return_nfe else x


def _sample_graph(score_fn, proj_fn, shape, steps, sampler, kw, sde, seed, generator, device, dtype, eps,
                  denoise_last, backend_name, return_nfe, ts):
    key = _graph_key(sampler, shape, dtype, device, backend_name, steps, eps, sde, denoise_last,
                     {k: v for k, v in kw.items() if k != "proj_fn"}, score_fn,
                     proj_fn if sampler == "predict_project" else None)
    entry = _GRAPHS.get(key)
    if entry is None:
        x_in = torch.empty(shape, dtype=dtype, device=device)
        if backend_name == "torch":
            graph_gen, noise_key = torch.Generator(device=device), None
            step_backend = TorchSteps(graph_gen)
        else:
            from kernels.sampler_step import TritonSteps
            graph_gen, noise_key = None, torch.zeros((), dtype=torch.int64, device=device)
            step_backend = TritonSteps(seed=noise_key, device=device)
        plan = _Plan(sampler, x_in, ts, proj_fn=kw.get("proj_fn"), delta_p=kw.get("delta_p"), a=kw.get("a"),
                     t_target=None, sde=sde, denoise_last=denoise_last, step_backend=step_backend)
        entry = _Captured(sampler, plan, x_in, noise_key, graph_gen, (score_fn, proj_fn), kw)
        entry.capture(score_fn, proj_fn if sampler == "predict_project" else None)
        _GRAPHS[key] = entry
        while len(_GRAPHS) > max(1, GRAPH_CACHE_SIZE):
            _GRAPHS.popitem(last=False)
    else:
        _GRAPHS.move_to_end(key)
    if backend_name == "torch":
        entry.generator.manual_seed(_seed_int(seed, generator, device))
        x0 = sde.prior_sampling(shape, generator=entry.generator, device=device, dtype=dtype)
        entry.x_in.copy_(x0)
    else:
        if generator is None:
            generator = torch.Generator(device=device)
            if seed is not None:
                generator.manual_seed(seed)
            else:
                generator.seed()
        entry.x_in.copy_(sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype))
        entry.key.copy_(draw_key(generator, device))
    entry.graph.replay()
    entry.plan.guard.finish(entry.plan.ts)
    x = entry.x_out.clone()
    return (x, entry.calls) if return_nfe else x


def eps_to_score(eps_model: ScoreFn, sde: VPSDE | None = None) -> ScoreFn:
    """Turn an epsilon-prediction network eps(x, t) into a score: s = -eps / sigma_t (ALGORITHMS §1)."""
    sde = sde or VPSDE()

    def score_fn(x, t):
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
        x0_hat = _tweedie(sde, x, score_fn(x, t_prev), t_prev)
        kappa = torch.sqrt(sde.beta(t_prev.to(torch.float64) + dtau)) / 2
        return (_bcast(sde.alpha(t_prev), x) * x0_hat - x) / _bcast(1.0 + kappa, x)

    return proj_fn


__all__ = ["sample", "tweedie_proj_fn", "euler_maruyama", "predict_project", "reverse_sde", "heun_ode", "langevin",
           "SAMPLERS", "NFE_PER_STEP", "nfe", "eps_to_score", "TorchSteps", "make_steps", "resolve_backend", "draw_key",
           "release_graphs", "cached_graphs", "GRAPH_CACHE_SIZE"]
