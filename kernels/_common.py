"""Checks and the input-layout policy that every kernel launcher shares (no triton here).

One home for them (ARCHITECTURE: "the checks that every launcher needs belong in one shared
helper module inside `kernels/`"), so that the step, attention and GroupNorm kernels fail alike,
and the sampler-step backends (Triton, C++) raise the very same errors for the same input.
Launcher plumbing: no ALGORITHMS.md section of its own (the step checks serve §2's updates).
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch

from . import INTERPRETED
from .noise import NOISE_R
from .optable import OPS, StepOp

# Storage dtypes every kernel accepts on a GPU (the interpreter has no bfloat16).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_device(op: str, x: torch.Tensor) -> None:
    """Raise if `x` cannot be handed to a Triton kernel in this process.

    CUDA tensors need compiled kernels; CPU tensors need TRITON_INTERPRET=1 set before `kernels`
    was first imported, and no bfloat16 (the interpreter runs numpy, which has none).
    """
    if x.device.type == "cuda":
        if INTERPRETED:
            raise ValueError(f"{op}: TRITON_INTERPRET=1 runs kernels on CPU tensors; got CUDA tensors")
    elif x.device.type == "cpu":
        if not INTERPRETED:
            raise ValueError(f"{op}: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before "
                             "`kernels` is first imported); put the tensors on CUDA")
        if x.dtype == torch.bfloat16:
            raise TypeError(f"{op}: the Triton interpreter has no bfloat16; use float32/float16 on CPU")
    else:
        raise ValueError(f"{op}: tensors must be on CUDA (or CPU under the interpreter), got {x.device}")


def check_dtype(op: str, dtype: torch.dtype, supported: tuple = SUPPORTED_DTYPES) -> None:
    """Raise unless `dtype` is one of `supported` (default: the set every kernel accepts)."""
    if dtype not in supported:
        names = ", ".join(str(d).replace("torch.", "") for d in supported)
        raise TypeError(f"{op}: dtype must be one of {names}, got {dtype}")


# --------------------------------------------------------------------------------------
# The one input-layout policy (as Liger-Kernel's `ensure_contiguous`, with each kernel's own
# notion of what it can read in place)
# --------------------------------------------------------------------------------------
# Every kernel input goes through `addressable`: a tensor whose strides the kernel can address is
# read in place; any other is copied once to a contiguous tensor, values unchanged (never
# rejected: a view the caller made stays a valid input). Outputs that a caller hands over
# (`out=`) are written in place, so they must already be addressable; those are rejected.
# What "addressable" means is each kernel's: the step kernels index flat offsets (contiguous);
# attention takes any batch/head/row strides with a unit stride along D (`unit_last`); GroupNorm
# any layout whose spatial dims flatten to one stride (kernels.groupnorm._spatial_merges).


def contiguous(x: torch.Tensor) -> bool:
    return x.is_contiguous()


def unit_last(x: torch.Tensor) -> bool:
    return x.stride(-1) == 1 or x.shape[-1] == 1


def addressable(x: torch.Tensor, readable: Callable[[torch.Tensor], bool] = contiguous) -> torch.Tensor:
    """x itself if the kernel can read it in place (`readable(x)`), else one contiguous copy of it."""
    return x if readable(x) else x.contiguous()


# --------------------------------------------------------------------------------------
# The sampler-step backends: one set of checks and messages for the Triton and C++ launchers
# --------------------------------------------------------------------------------------

# Storage dtypes of the step kernels: the attention set plus float64 (stored in fp64, computed
# in fp32 exactly as wgfcore.ops does, so that backend="triton" accepts what "torch" accepts).
STEP_DTYPES = SUPPORTED_DTYPES + (torch.float64,)
#: the guard flag's value while no network output was non-finite (steps lower it by atomic min)
FLAG_CLEAR = 2**62
# Element offsets are int32; the last noise group (4 R elements) may run up to 4R - 1 past numel.
MAX_NUMEL = 2**31 - 4 * NOISE_R

# How a kernel obtains each coefficient (the Triton kernels' constexprs take these values).
COEF_VALUE, COEF_SCALAR_PTR, COEF_SAMPLE_PTR = 0, 1, 2  # a python float; a 0-d tensor; entry b of (B,)
# The noise term: none; z a tensor argument; z drawn in-kernel from Philox keyed by (seed, step).
NOISE_NONE, NOISE_EXPLICIT, NOISE_PHILOX = 0, 1, 2


def check_tensors(op: str, named: dict, device_check: Callable = check_device, out=None) -> dict:
    """The step tensors: same shape, dtype, device; a step dtype; at most MAX_NUMEL elements.

    Returns `named` with each tensor made addressable (contiguous; see the policy above). `out`, if
    given, must match them and be contiguous already (it is written in place). `device_check(op, x)`
    is the backend's own device rule (default: the Triton kernels').
    """
    items = list(named.items()) + ([("out", out)] if out is not None else [])
    for name, t in items:
        if not torch.is_tensor(t):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    name0, x = items[0]
    for name, t in items[1:]:
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {name0} is on {x.device}; all tensors must "
                             "share one device")
    for name, t in items[1:]:
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {name0} has {x.dtype}; all tensors must share "
                            "one storage dtype")
    check_dtype(op, x.dtype, STEP_DTYPES)
    if x.ndim < 1:
        raise ValueError(f"{op}: {name0} must have shape (B, ...), got a 0-d tensor")
    for name, t in items[1:]:
        if t.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {name0}'s shape {tuple(x.shape)}")
    if out is not None and not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous (strides {out.stride()} for shape {tuple(out.shape)}): "
                         "it is written in place")
    device_check(op, x)
    if x.numel() > MAX_NUMEL:
        raise ValueError(f"{op}: at most {MAX_NUMEL} elements per call (int32 offsets), got {x.numel()}")
    return {name: addressable(t) for name, t in named.items()}


def coef_arg(op: str, name: str, c, x: torch.Tensor, interpreted: bool = INTERPRETED):
    """(argument, stride, mode) for a coefficient: python number, 0-d tensor or (B,) tensor.

    Tensors stay on the device and are loaded in-kernel: no host sync, no copy. `interpreted`: the
    Triton interpreter's rule (no bfloat16 (B,) coefficient); a CPU backend passes False.
    """
    if torch.is_tensor(c):
        if not c.is_floating_point():
            raise TypeError(f"{op}: coefficient {name} must be a floating tensor, got dtype {c.dtype}")
        if c.device != x.device:
            raise ValueError(f"{op}: coefficient {name} is on {c.device} but the tensors are on {x.device}; "
                             "compute the coefficient tables on the device before the loop")
        if c.ndim == 0:
            return c, 0, COEF_SCALAR_PTR
        if c.ndim == 1 and c.shape[0] == x.shape[0]:
            if c.dtype == torch.bfloat16 and interpreted:
                raise TypeError(f"{op}: the Triton interpreter has no bfloat16; coefficient {name} is bfloat16")
            return c, c.stride(0), COEF_SAMPLE_PTR
        raise ValueError(f"{op}: coefficient {name} must be a scalar or have shape (B,) = ({x.shape[0]},), "
                         f"got shape {tuple(c.shape)}")
    if isinstance(c, numbers.Real) and not isinstance(c, bool):
        return float(c), 0, COEF_VALUE
    raise TypeError(f"{op}: coefficient {name} must be a python number or a tensor, got {type(c).__name__}")


def check_key(op: str, seed, step):
    """seed and step as python ints in [0, 2**32); numpy integers are accepted."""
    if type(seed) is int and type(step) is int and 0 <= seed < 2**32 and 0 <= step < 2**32:
        return seed, step  # the common case, without the abstract-base-class checks below
    for name, v in (("seed", seed), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{op}: {name} must be an integer for in-kernel noise, got {type(v).__name__}")
        if not 0 <= int(v) < 2**32:
            raise ValueError(f"{op}: {name} must lie in [0, 2**32), got {v}")
    return int(seed), int(step)


def noise_mode(spec: StepOp, coefs: tuple, z=None, seed=None, step=None) -> int:
    """NOISE_NONE, NOISE_EXPLICIT or NOISE_PHILOX for a public launcher's call (`coefs` are
    `spec.columns` in order, the noise column None for no noise term)."""
    op = spec.name
    c_z = coefs[spec.columns.index(spec.noise)] if spec.noise is not None else None
    if c_z is None:
        if z is not None:
            raise ValueError(f"{op}: z was given but c_z is None; pass c_z to inject noise")
        return NOISE_NONE
    if z is not None:
        if seed is not None:
            raise ValueError(f"{op}: give either an explicit z or a seed for in-kernel noise, not both")
        return NOISE_EXPLICIT
    if seed is None or step is None:
        raise ValueError(f"{op}: c_z is given: pass z, or seed= and step= to draw the noise in-kernel")
    return NOISE_PHILOX


def check_seed(owner: str, seed):
    """A sampling run's seed: a python int in [0, 2**32) (numpy integers too) or a 0-d int64 tensor."""
    if torch.is_tensor(seed):
        if seed.ndim != 0 or seed.dtype != torch.int64:
            raise TypeError(f"{owner}: a seed tensor must be 0-d int64, got {seed.dtype} of shape {tuple(seed.shape)}")
        return seed
    return check_key(owner, seed, 0)[0]


def check_tables(owner: str, x: torch.Tensor, tables: dict) -> dict:
    """The sampler's coefficient tables, checked once per run: name -> (StepOp, table)."""
    checked = {}
    for name, tab in tables.items():
        spec = OPS.get(name)
        if spec is None:
            raise ValueError(f"{owner}: unknown coefficient table {name!r}; known: {sorted(OPS)}")
        if not torch.is_tensor(tab) or tab.ndim != 2 or tab.shape[1] != spec.ncol or not tab.is_floating_point():
            raise ValueError(f"{owner}: table {name!r} must be a floating (N, {spec.ncol}) tensor with columns "
                             f"({', '.join(spec.columns)}), got {getattr(tab, 'shape', type(tab).__name__)}")
        if tab.device != x.device:
            raise ValueError(f"{owner}: table {name!r} is on {tab.device}, the state on {x.device}")
        checked[name] = (spec, tab)
    return checked


def pack_table(spec: StepOp, tab: torch.Tensor) -> torch.Tensor:
    """A sampler table (N, spec.ncol) as the kernels' (N, NT + 1) fp32 rows (kernels.optable)."""
    tab = tab.to(torch.float32)
    cols = [tab[:, k] if isinstance(k, int) else tab.new_full((tab.shape[0],), k) for k in spec.kernel_columns()]
    return torch.stack(cols, 1).contiguous()
