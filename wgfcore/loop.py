"""What every sampling loop shares: the sampler registry, one run's plan, its checked networks and its guard.

ALGORITHMS §2: a run builds its coefficient tables once, before its loop, hands them to a step
backend (`wgfcore.backends`), and the sampler's body then only calls networks and updates. A NaN or
inf from a network is found without a host sync in the loop: it always reaches the state (every
update carries each network output into x, and 0 * NaN is NaN), so one check of the final state
detects it; only then is the run repeated from the same prior draw and noise, checking each step,
to name the first bad one. A backend with a `finite_flag` checks in its kernels instead.
"""
from __future__ import annotations

import math
import numbers
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping
from weakref import getweakrefcount

import torch
from tqdm.auto import tqdm

from .backends import FLAG_CLEAR
from .ops import TorchSteps
from .sde import VPSDE, tweedie

#: the options a sampler may take; `sample()` and every sampler function accept each of them
OPTIONS = ("proj_fn", "delta_p", "a", "t_target")
#: an option's default that means "must be given"
REQUIRED = object()


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: `body(run, x) -> x` (its loop), `tables(sde, ts, **options)` (its float64
    coefficient tables by update name, plus optionally "t": the (N + 1,) times its networks see),
    its network evaluations per step, and the options it takes with their defaults."""

    name: str
    body: Callable
    tables: Callable
    nfe_per_step: int
    options: Mapping[str, object]
    function: Callable


SPECS: dict[str, SamplerSpec] = {}


class _View(Mapping):
    """A read-only view of the registry: name -> one field of its spec."""

    def __init__(self, field):
        self._field = field

    def __getitem__(self, name):
        return getattr(SPECS[name], self._field)

    def __iter__(self):
        return iter(SPECS)

    def __len__(self):
        return len(SPECS)

    def __repr__(self):
        return repr(dict(self))


#: name -> the sampler function `(score_fn, x, ts, *, proj_fn, delta_p, a, t_target, sde, ...)`
SAMPLERS = _View("function")
#: name -> network evaluations per step
NFE_PER_STEP = _View("nfe_per_step")


def register_sampler(name: str, *, nfe_per_step: int, tables: Callable, options: Mapping | None = None,
                     doc: str | None = None):
    """Decorator: register `body(run, x) -> x` as the sampler `name`; returns its sampler function.

    That is all a new sampler needs: `sample(..., sampler=name)`, `SAMPLERS`, `NFE_PER_STEP`,
    `nfe()` and the CUDA-graph path all read the registry; `doc` (default: the body's docstring)
    documents the sampler function. The body runs its steps over `run.steps()` with what the
    `Run` gives it and must carry every network output into the state it returns (the guard relies
    on it) without writing into its input x in place (a failed run is re-run from it). An update
    after which the body reads a network output t no more may pass `out=run.spare(t)` (optional: a
    body that never does is correct, one allocation per update slower on a CPU).
    """
    options = dict(options or {})
    if not isinstance(name, str) or not name:
        raise ValueError(f"a sampler name must be a non-empty string, got {name!r}")
    if isinstance(nfe_per_step, bool) or not isinstance(nfe_per_step, int) or nfe_per_step < 1:
        raise ValueError(f"nfe_per_step must be an integer >= 1, got {nfe_per_step!r}")
    if not set(options) <= set(OPTIONS):
        raise ValueError(f"a sampler's options must be among {OPTIONS}, got {sorted(options)}")

    def register(body):
        fn = _sampler_function(name, doc or body.__doc__)
        SPECS[name] = SamplerSpec(name, body, tables, nfe_per_step, options, fn)
        return fn

    return register


def get_spec(name) -> SamplerSpec:
    if not isinstance(name, str) or name not in SPECS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SPECS)}")
    return SPECS[name]


def _sampler_function(name: str, doc: str | None):
    def sampler(score_fn, x: torch.Tensor, ts: torch.Tensor, *, proj_fn=None, delta_p=None, a=None,
                t_target=None, sde: VPSDE | None = None, denoise_last: bool = True, step_backend=None,
                callback=None, progress: bool = False) -> torch.Tensor:
        options = dict(proj_fn=proj_fn, delta_p=delta_p, a=a, t_target=t_target)
        return run_sampler(get_spec(name), score_fn, x, ts, options, sde=sde, denoise_last=denoise_last,
                           step_backend=step_backend, callback=callback, progress=progress)[0]

    sampler.__name__ = sampler.__qualname__ = name
    sampler.__doc__ = doc
    return sampler


# --- checks made once, before a run -------------------------------------------------------------

def number(name, v, lo=0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < lo:
        raise ValueError(f"{name} must be a finite number >= {lo:g}, got {v!r}")
    return float(v)


def _check_option(k, v):
    if k == "proj_fn":
        if not callable(v):
            raise TypeError(f"proj_fn must be callable as proj_fn(x, t), got {type(v).__name__}")
        return v
    v = number(k, v)
    if k == "t_target" and not 0 < v <= 1:
        raise ValueError(f"t_target must lie in (0, 1], got {v}")
    return v


def check_options(spec: SamplerSpec, options: dict) -> dict:
    """The options of one run: each given value checked, then what the sampler needs is given and
    what it has no use for is not (an error, never ignored); defaults filled in."""
    given = {k: _check_option(k, v) for k, v in options.items() if v is not None}
    for k in given:
        if k not in spec.options:
            raise ValueError(f"{spec.name} takes no {k} (got {options[k]!r})")
    out = {}
    for k, default in spec.options.items():
        if k in given:
            out[k] = given[k]
        elif default is REQUIRED:
            raise ValueError(f"{spec.name} needs {k}" + {"proj_fn": " (the projection network T)",
                                                         "delta_p": " (ops.default_delta_p(N) gives the paper's value)"
                                                         }.get(k, ""))
        else:
            out[k] = default
    return out


def check_grid(ts) -> torch.Tensor:
    """ts as float64 on the host: 1-D, at least 2 entries, strictly decreasing within (0, 1]."""
    if not torch.is_tensor(ts) or ts.ndim != 1 or ts.numel() < 2:
        raise ValueError("ts must be a 1-D tensor of at least 2 decreasing forward times (see ops.time_grid)")
    ts = ts.detach().to("cpu", torch.float64)
    if not bool((ts[1:] < ts[:-1]).all()) or float(ts[-1]) <= 0 or float(ts[0]) > 1:
        raise ValueError("ts must decrease strictly within (0, 1]")
    return ts


def _check_output(out, name, shape, device):
    """The slow path of a network output's check (the fast one is inline in `Run._net`)."""
    if not torch.is_tensor(out):
        raise TypeError(f"{name} must return a tensor, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"{name} returned shape {tuple(out.shape)}, expected {tuple(shape)} (same as x)")
    if out.device != device:
        raise ValueError(f"{name} returned a tensor on {out.device}, expected {device} (same as x)")
    if not out.is_floating_point():
        raise TypeError(f"{name} returned dtype {out.dtype}, expected a floating tensor")


def _returned():
    return object()


def _sole_refcount() -> int:
    """sys.getrefcount of a call's result held by one local name and nothing else, measured in code of
    the shape of `Run._net` (the count a live object shows differs between CPython versions)."""
    out = _returned()
    return sys.getrefcount(out)


_SOLE = _sole_refcount()


class _NonFinite(Exception):
    def __init__(self, i, what):
        super().__init__(i, what)
        self.i, self.what = i, what


# --- one run ------------------------------------------------------------------------------------

_PLANS: "OrderedDict[tuple, tuple]" = OrderedDict()
_PLANS_KEPT = 16
_PLANS_LOCK = threading.Lock()


def _plan(spec: SamplerSpec, ts, options, sde, x):
    """(tables on x's device in fp32, network times, their (B,) views per step, noise flags) of a run.

    Pure functions of the arguments, so the last few are kept: a repeated call (sampling in batches)
    makes no tables and no per-step views again. A zero noise column draws no noise (the PF-ODE).
    """
    opts = {k: v for k, v in options.items() if k != "proj_fn"}
    try:
        key = (spec.name, tuple(sorted(opts.items())), sde, ts.numpy().tobytes(), x.shape[0], x.device)
        with _PLANS_LOCK:
            hit = _PLANS.get(key)
            if hit is not None and hit[0] is spec:
                _PLANS.move_to_end(key)
                return hit[1:]
    except TypeError:  # an unhashable SDE: no reuse
        key = None
    tabs = dict(spec.tables(sde, ts, **opts))
    t_net = tabs.pop("t", ts)
    t = t_net.to(device=x.device, dtype=torch.float32)[:, None].expand(-1, x.shape[0]).unbind(0)
    noise = next((tabs[k][:, -1] for k in ("em", "project") if k in tabs), None)
    noisy = tuple((noise != 0).tolist()) if noise is not None else (False,) * (ts.numel() - 1)
    tables = {k: v.to(device=x.device, dtype=torch.float32) for k, v in tabs.items()}
    if key is not None:
        with _PLANS_LOCK:
            _PLANS[key] = (spec, tables, t_net, t, noisy)
            while len(_PLANS) > _PLANS_KEPT:
                _PLANS.popitem(last=False)
    return tables, t_net, t, noisy


class Run:
    """What a sampler body sees: `n` steps, per-step network times `t` (N + 1 tensors of shape (B,)),
    noise flags `noisy`, the planned backend `B`, the networks `score(x, t)` / `proj(x, t)` (checked
    and counted), `emit(i, x_prev, x, s, **extra)` (None without a callback), and `spare(t)`: the
    `out=` of an update whose network output t the body reads no more."""

    def __init__(self, spec: SamplerSpec, x, ts, options, sde, denoise_last, backend, score_fn, callback=None,
                 progress=False, check=False):
        if not torch.is_tensor(x) or x.ndim < 1 or not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor of shape (B, ...), got {getattr(x, 'shape', x)!r}")
        self.spec, self.x0, self.ts, self.options, self.sde = spec, x, ts, options, sde
        self.denoise_last, self.score_fn, self.check = denoise_last, score_fn, check
        self.n = n = ts.numel() - 1
        tables, self.t_net, self.t, noisy = _plan(spec, ts, options, sde, x)
        self.noisy = list(noisy)
        if denoise_last:
            self.noisy[-1] = False
        self.B = backend
        backend.plan(x, tables)
        self.flag = getattr(backend, "finite_flag", None)
        self._rng = None
        if not check:
            self.mark_noise()
        self.shape, self.device, self.i, self._calls, self._spare = x.shape, x.device, 0, [0], None
        self.score = self._net(score_fn, "score_fn")
        self.proj = self._net(options.get("proj_fn"), "proj_fn")
        self.callback, self.progress = callback, progress
        self.emit = self._emit if callback is not None else None
        if check:
            self.B = _CheckedSteps(backend, self)

    def mark_noise(self) -> None:
        """Record where the backend's noise stream stands: a run that fails is re-run from here."""
        self._rng = self.B.rng_state() if self.flag is None else None

    @property
    def nfe(self) -> int:
        return self._calls[0]

    def steps(self):
        if self.check:
            return self._steps_checked()
        return tqdm(range(self.n), desc=self.spec.name, leave=False) if self.progress else range(self.n)

    def _steps_checked(self):
        for i in range(self.n):
            self.i = i
            yield i

    def _net(self, fn, name):
        if fn is None:
            return None
        shape, device, accept, calls, check, run = self.shape, self.device, self.B.accept, self._calls, self.check, self

        def net(x, t):
            out = fn(x, t)
            sole = sys.getrefcount(out) == _SOLE and not getweakrefcount(out)  # the network kept no reference
            calls[0] += 1
            if type(out) is not torch.Tensor or out.shape != shape or out.device != device \
                    or not out.is_floating_point():
                _check_output(out, name, shape, device)
            if check and not bool(torch.isfinite(out).all()):
                raise _NonFinite(run.i, name)
            mine = accept(out)
            if sole or mine is not out:  # a copy accept() made is the run's own too
                run._spare = mine
            return mine

        return net

    def spare(self, t):
        """t when an update may write its result into t, else None: the body's `out=` for an update after
        which it reads the network output t no more (nor shows it to anyone: without a callback).

        t must be the network output just returned, which no one but this run holds: the network kept
        no Python reference to it, not even a weak one (numpy's temporary elision makes the same refcount
        test). The backend
        checks the memory itself (unshared, its allocator's) before writing into it. This saves a fresh
        tensor per step, whose memory is cold: on a CPU, one pass over memory of about four.
        """
        if t is self._spare and self.emit is None:
            self._spare = None
            return t
        return None

    def _emit(self, i, x_prev, x, s, **extra):
        # Tweedie's denoised estimate at the time the score was taken, in the state's dtype.
        info = {"i": i, "t": float(self.ts[i]), "t_next": float(self.ts[i + 1]), "x": x, "x_prev": x_prev,
                "score": s, "denoised": tweedie(x_prev, s, self.t_net[i], self.sde).to(x_prev.dtype)}
        info.update(extra)
        self.callback(info)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """After the loop: the one host sync. Raises FloatingPointError naming the first bad step."""
        if self.flag is not None:
            i = int(self.flag)
            if i < FLAG_CLEAR:
                raise FloatingPointError(f"a network produced NaN or inf at step {i} (t = {float(self.ts[i]):.4g}); "
                                         "check the score/projection network and its inputs at that time")
        # With finite network outputs an update can still overflow the state's dtype (fp16): every
        # backend's final state is checked, once per run.
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            # A sum is finite only if every term is (NaN and inf propagate), and it reads x once with no
            # temporary (isfinite(x).all() writes a bool tensor: 30x slower on CPU); only a sum that
            # overflowed (or a real NaN/inf) falls through to the exact check.
            raise FloatingPointError(self._locate())
        return x

    def _locate(self) -> str:
        """The rare path: re-run from the same prior draw and noise, checking every step."""
        if self._rng is None and self.flag is None:
            return ("the samples hold NaN or inf; the step backend cannot replay its noise, so the first bad step "
                    "is unknown")
        rerun = Run(self.spec, self.x0, self.ts, self.options, self.sde, self.denoise_last, self.B, self.score_fn,
                    check=True)
        if self._rng is not None:  # a flagged backend draws its noise from (key, step): it replays as it is
            self.B.set_rng_state(self._rng)
        try:
            self.spec.body(rerun, self.x0)
        except _NonFinite as e:
            t = f"(t = {float(self.ts[e.i]):.4g})"
            if e.what == "state":
                return (f"the state became NaN or inf at step {e.i} {t} though every network output was finite: "
                        f"the update overflowed {self.x0.dtype}")
            return f"{e.what} produced NaN or inf at step {e.i} {t}; check that network and its inputs at that time"
        return ("the samples hold NaN or inf, but a re-run from the same prior draw and noise found every network "
                "output and state finite: the networks are not deterministic (dropout left on? state kept between "
                "calls?), so the first bad step is unknown")


class _CheckedSteps:
    """A backend seen through the re-run: each update's output checked for NaN/inf."""

    def __init__(self, backend, run):
        self._b, self._run = backend, run
        self.accept = backend.accept

    def __getattr__(self, op):
        fn = getattr(self._b, op)

        def checked(*args, **kw):
            out = fn(*args, **kw)
            if not bool(torch.isfinite(out).all()):
                raise _NonFinite(self._run.i, "state")
            return out

        return checked


def run_sampler(spec: SamplerSpec, score_fn, x, ts, options, *, sde=None, denoise_last=True, step_backend=None,
                callback=None, progress=False):
    """One checked run of `spec` from x over the grid ts; returns (x, network evaluations made)."""
    options = check_options(spec, options)
    run = Run(spec, x, check_grid(ts), options, sde or VPSDE(), denoise_last,
              step_backend if step_backend is not None else TorchSteps(), score_fn, callback, progress)
    return run.finish(spec.body(run, x)), run.nfe


__all__ = ["OPTIONS", "REQUIRED", "SamplerSpec", "SPECS", "SAMPLERS", "NFE_PER_STEP", "register_sampler", "get_spec",
           "check_options", "check_grid", "Run", "run_sampler", "number"]
