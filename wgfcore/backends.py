"""Step backends by name: a registry where adding a backend is one `register_backend` call.

ALGORITHMS §2: a backend does a sampler's per-step updates. Every backend keeps one protocol:

- built per run by its entry's `build(device, rng)`; `rng` is a `torch.Generator` for a backend
  that draws noise from torch (`keyed=False`), or a noise key for one that draws its own
  (`keyed=True`): a python int in [0, 2**32) or a 0-d int64 tensor on the device;
- `plan(x, tables)` once per run: `tables` maps an update name (predict, em, project, heun) to its
  (N, K) floating coefficient table on x's device (columns as in `wgfcore.ops.TorchSteps`);
- `accept(t)` on each network output; `predict/em/project/heun(..., table, i[, noisy], out=None)` per
  step, where `out` may be a network output the body no longer reads and no one else holds
  (`wgfcore.loop.Run.spare`): the backend may write the result into it, or ignore it;
- either a `finite_flag` (a 0-d int64 device tensor, `FLAG_CLEAR` until a network output it read
  held a NaN or inf, then the first such step) or `rng_state()` / `set_rng_state(state)`, with
  which the sampler re-runs a failed run to find its first non-finite step.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .ops import TorchSteps

#: a finite_flag's value while every network output was finite (then: the first bad step)
FLAG_CLEAR = 2**62


@dataclass(frozen=True)
class Backend:
    """A registry entry. `unavailable(device)` is None where the backend runs, else why not (one line).
    `auto` maps a device type ("cpu", "cuda", ...) to this backend's rank there: "auto" picks the
    available backend of highest rank for the device."""

    name: str
    build: Callable[[torch.device, object], object]
    keyed: bool
    unavailable: Callable[[torch.device], str | None] = lambda device: None
    auto: dict = field(default_factory=dict)


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, build, *, keyed: bool, unavailable=None, auto=None) -> Backend:
    """Add a step backend under `name` (see the module docstring for the protocol it must keep).

    Example (a backend that draws its own noise from a key, preferred by "auto" on CPU):

        register_backend("cpp", lambda device, key: CppSteps(key, device=device), keyed=True,
                         unavailable=lambda device: None if cpp_built() else "the C++ extension did not build",
                         auto={"cpu": 10})
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a backend name must be a non-empty string other than 'auto', got {name!r}")
    entry = Backend(name, build, bool(keyed), unavailable or (lambda device: None), dict(auto or {}))
    BACKENDS[name] = entry
    return entry


def draw_key(generator: torch.Generator | None, device) -> torch.Tensor:
    """A keyed backend's noise key: a 0-d int64 tensor on `device`, drawn from `generator` (no host sync)."""
    return torch.randint(0, 2**32, (), generator=generator, device=device, dtype=torch.int64)


#: (backend, device type) pairs that "auto" preferred but found unavailable, and warned about
_passed_over: set = set()


def resolve_backend(backend: str, device) -> str:
    """A backend name for `device`: "auto" -> the available one of highest rank there; a name is checked."""
    device = torch.device(device)
    if backend == "auto":
        ranked = sorted(((e.auto.get(device.type, e.auto.get("*")), e.name) for e in BACKENDS.values()
                         if e.auto.get(device.type, e.auto.get("*")) is not None), reverse=True)
        passed = []
        for _, name in ranked:
            why = BACKENDS[name].unavailable(device)
            if why is None:
                for other, other_why in passed:  # one warning per process and backend, not one per call
                    if (other, device.type) not in _passed_over:
                        _passed_over.add((other, device.type))
                        warnings.warn(f"backend='auto' uses {name!r} on {device.type}: {other!r} is not available "
                                      f"({other_why})", stacklevel=3)
                return name
            passed.append((name, why))
        raise ValueError(f"no step backend is available on {device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    why = BACKENDS[backend].unavailable(device)
    if why is not None:
        raise ImportError(f"backend={backend!r} cannot run on {device}: {why}")
    return backend


def make_steps(backend: str, device, generator: torch.Generator | None = None, seed=None):
    """A step backend for one run on `device`: `backend` resolved, noise from `generator` or `seed`.

    A keyed backend takes `seed` as its key if given (an int in [0, 2**32) or a 0-d int64 tensor),
    else one drawn from `generator`; the others draw their noise from `generator`.
    """
    device = torch.device(device)
    entry = BACKENDS[resolve_backend(backend, device)]
    if entry.keyed:
        return entry.build(device, draw_key(generator, device) if seed is None else seed)
    return entry.build(device, generator)


# --- the built-in backends ----------------------------------------------------------------------

_warned_interpreter = False


def _triton_unavailable(device: torch.device) -> str | None:
    try:
        import kernels.sampler_step  # noqa: F401  (lazy: wgfcore runs without Triton)
    except ImportError as e:  # pragma: no cover - depends on the install
        return f"it needs the `kernels` package and triton ({e})"
    return None


def _build_triton(device: torch.device, key):
    global _warned_interpreter
    from kernels.sampler_step import TritonSteps

    if device.type != "cuda" and not _warned_interpreter:
        warnings.warn("backend='triton' on CPU runs the Triton interpreter: a correctness mode, not a fast path",
                      stacklevel=3)
        _warned_interpreter = True
    return TritonSteps(seed=key, device=device)


def _cpp_unavailable(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "the C++ step kernels run on CPU tensors (backend='triton' is the CUDA one)"
    try:
        from kernels import cpu_steps  # lazy: the first call builds the extension (once per machine)
    except ImportError as e:  # pragma: no cover - depends on the install
        return f"it needs the `kernels` package ({e})"
    return cpu_steps.status()


def _build_cpp(device: torch.device, key):
    from kernels.cpu_steps import CppSteps

    return CppSteps(key, device=device)


register_backend("torch", lambda device, generator: TorchSteps(generator), keyed=False, auto={"*": 0})
register_backend("triton", _build_triton, keyed=True, unavailable=_triton_unavailable, auto={"cuda": 10})
# Faster than torch on a CPU at every bench shape (docs/cpu_steps.md), and draws Triton's noise stream.
register_backend("cpp", _build_cpp, keyed=True, unavailable=_cpp_unavailable, auto={"cpu": 10})

__all__ = ["Backend", "BACKENDS", "register_backend", "resolve_backend", "make_steps", "draw_key", "FLAG_CLEAR"]
