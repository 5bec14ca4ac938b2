"""Fused sampler-step kernels: every update of `wgfcore.ops` in one pass, noise drawn in-kernel.

ALGORITHMS §2: a sampler step is an affine combination of same-shaped tensors (state, score,
projection) plus c_z z. One kernel forms it: each input is read once, the output written once,
the Gaussian z is generated in registers by Philox, keyed by (seed, step, element offset).
The math mirrors `wgfcore.ops` (its oracle) term for term, in the same order, in fp32.
"""
from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from ._common import SUPPORTED_DTYPES, check_device, check_dtype
from .optable import OPS, StepOp

__all__ = ["predict", "em", "project", "heun", "TritonSteps", "SUPPORTED_DTYPES", "STEP_DTYPES", "NOISE_R"]

# Noise layout. One Philox4x32-10 call on counter c yields four normals (two Box-Muller pairs);
# they go to elements g*4R + k*R + r (k = 0..3) where c = g*R + r. So four elements share one
# counter and the whole tile stays coalesced. The layout depends on R alone (never on the launch
# configuration: groups per program, warps), so a (seed, step) pair gives the same noise on every
# device and tile size. R = 1024 is kept: the H100 measurements (README of
# shared/measurements/h100-2026-11-25) found R = 1024 with 8 warps as fast as R = 512 in bf16 and
# faster in fp32, and a new R would change every recorded noise stream.
NOISE_R = 1024
_GROUP = 4 * NOISE_R
# Element offsets are int32; the last group may run up to _GROUP - 1 past numel.
_MAX_NUMEL = 2**31 - _GROUP

# Coefficient modes (how the kernel obtains each coefficient); the same names inside the kernels.
COEF_VALUE: tl.constexpr = tl.constexpr(0)       # a python float argument
COEF_SCALAR_PTR: tl.constexpr = tl.constexpr(1)  # a 0-d tensor, loaded in-kernel
COEF_SAMPLE_PTR: tl.constexpr = tl.constexpr(2)  # entry b of a (B,) tensor
# Noise modes.
NOISE_NONE: tl.constexpr = tl.constexpr(0)       # no c_z z term
NOISE_EXPLICIT: tl.constexpr = tl.constexpr(1)   # z is a tensor argument
NOISE_PHILOX: tl.constexpr = tl.constexpr(2)     # z drawn in-kernel from Philox keyed by (seed, step)
# Which tensor is a network output whose finiteness the sampling loop's kernel checks.
CHECK_NONE: tl.constexpr = tl.constexpr(0)
CHECK_T1: tl.constexpr = tl.constexpr(1)         # s in predict/em, T in project
CHECK_T3: tl.constexpr = tl.constexpr(3)         # s' in heun (its s was checked by the predict before it)
#: the guard flag's value while no network output was non-finite (steps lower it by atomic min)
FLAG_CLEAR = 2**62

# Storage dtypes of the step kernels: the attention set plus float64 (stored in fp64, computed
# in fp32 exactly as wgfcore.ops does, so that backend="triton" accepts what "torch" accepts).
STEP_DTYPES = SUPPORTED_DTYPES + (torch.float64,)

# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _coef(c, stride, b, mask, MODE: tl.constexpr):
    """A coefficient in fp32: a float argument, a 0-d tensor, or entry b of a (B,) tensor."""
    if MODE == COEF_VALUE:
        v = c
    elif MODE == COEF_SCALAR_PTR:
        v = tl.load(c).to(tl.float32)
    else:
        v = tl.load(c + b * stride, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _part(offs, noise, out_ptr, t0, t1, t2, t3, z_ptr,
          c0, c1, c2, c3, cz, s0, s1, s2, s3, sz, numel, inner,
          NT: tl.constexpr, NOISE: tl.constexpr,
          M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, MZ: tl.constexpr,
          PER_SAMPLE: tl.constexpr, CHECK: tl.constexpr):
    """The update itself, for one quarter-tile: the only place a kernel writes the formula.

    Returns how many elements of the network output (t1 if CHECK == CHECK_T1, t3 if
    CHECK_T3) are NaN or inf; v - v is 0 exactly for finite v and NaN otherwise.
    """
    mask = offs < numel
    if PER_SAMPLE:
        b = offs // inner  # sample index of each element (x is (B, ...) and contiguous)
    else:
        b = offs * 0
    # Same association as wgfcore.ops: ((c0 t0 + c1 t1) + c2 t2) + c3 t3, then + cz z.
    v1 = tl.load(t1 + offs, mask=mask, other=0.0).to(tl.float32)
    acc = _coef(c0, s0, b, mask, M0) * tl.load(t0 + offs, mask=mask, other=0.0).to(tl.float32) \
        + _coef(c1, s1, b, mask, M1) * v1
    if NT >= 3:
        acc = acc + _coef(c2, s2, b, mask, M2) * tl.load(t2 + offs, mask=mask, other=0.0).to(tl.float32)
    if NT >= 4:
        v3 = tl.load(t3 + offs, mask=mask, other=0.0).to(tl.float32)
        acc = acc + _coef(c3, s3, b, mask, M3) * v3
    if NOISE == NOISE_EXPLICIT:
        acc = acc + _coef(cz, sz, b, mask, MZ) * tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    elif NOISE == NOISE_PHILOX:
        acc = acc + _coef(cz, sz, b, mask, MZ) * noise
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if CHECK == CHECK_T1:
        nbad = tl.sum(((v1 - v1) != 0.0).to(tl.int32), axis=0)
    elif CHECK == CHECK_T3:
        nbad = tl.sum(((v3 - v3) != 0.0).to(tl.int32), axis=0)
    else:
        nbad = 0
    return nbad


@triton.jit
def _tile(g, seed, step, out_ptr, t0, t1, t2, t3, z_ptr, c0, c1, c2, c3, cz, s0, s1, s2, s3, sz, numel, inner,
          NT: tl.constexpr, NOISE: tl.constexpr,
          M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, MZ: tl.constexpr,
          PER_SAMPLE: tl.constexpr, R: tl.constexpr, CHECK: tl.constexpr):
    """Group g (4 R elements): its noise, then the update on each of its four quarter-tiles.

    Returns the count of non-finite network-output elements (see `_part`)."""
    r = tl.arange(0, R)
    base = g * (4 * R)
    if NOISE == NOISE_PHILOX:
        # Philox key = (seed, step) as its (low, high) 32-bit words: every step of every seed
        # is its own stream; the counter is the element's group-local index.
        key = seed.to(tl.uint32).to(tl.uint64) | (step.to(tl.uint32).to(tl.uint64) << 32)
        n0, n1, n2, n3 = tl.randn4x(key, g * R + r)
    else:
        n0 = 0.0
        n1 = 0.0
        n2 = 0.0
        n3 = 0.0
    nbad = _part(base + r, n0, out_ptr, t0, t1, t2, t3, z_ptr, c0, c1, c2, c3, cz, s0, s1, s2, s3, sz,
                 numel, inner, NT, NOISE, M0, M1, M2, M3, MZ, PER_SAMPLE, CHECK)
    nbad += _part(base + R + r, n1, out_ptr, t0, t1, t2, t3, z_ptr, c0, c1, c2, c3, cz, s0, s1, s2, s3, sz,
                  numel, inner, NT, NOISE, M0, M1, M2, M3, MZ, PER_SAMPLE, CHECK)
    nbad += _part(base + 2 * R + r, n2, out_ptr, t0, t1, t2, t3, z_ptr, c0, c1, c2, c3, cz, s0, s1, s2, s3, sz,
                  numel, inner, NT, NOISE, M0, M1, M2, M3, MZ, PER_SAMPLE, CHECK)
    nbad += _part(base + 3 * R + r, n3, out_ptr, t0, t1, t2, t3, z_ptr, c0, c1, c2, c3, cz, s0, s1, s2, s3, sz,
                  numel, inner, NT, NOISE, M0, M1, M2, M3, MZ, PER_SAMPLE, CHECK)
    return nbad


@triton.jit(do_not_specialize=["seed", "step"])
def _affine_kernel(out_ptr, t0, t1, t2, t3, z_ptr,
                   c0, c1, c2, c3, cz, s0, s1, s2, s3, sz,
                   numel, inner, seed, step,
                   NT: tl.constexpr, NOISE: tl.constexpr,
                   M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, MZ: tl.constexpr,
                   PER_SAMPLE: tl.constexpr, R: tl.constexpr, GROUPS: tl.constexpr):
    """The public launchers' kernel: any coefficient kind, explicit or in-kernel noise."""
    pid = tl.program_id(0)
    for j in tl.static_range(GROUPS):
        _tile(pid * GROUPS + j, seed, step, out_ptr, t0, t1, t2, t3, z_ptr, c0, c1, c2, c3, cz,
              s0, s1, s2, s3, sz, numel, inner, NT, NOISE, M0, M1, M2, M3, MZ, PER_SAMPLE, R, CHECK_NONE)


@triton.jit(do_not_specialize=["numel", "step"])
def _table_kernel(out_ptr, t0, t1, t2, t3, coef_ptr, seed_ptr, flag_ptr, numel, step,
                  NT: tl.constexpr, NOISE: tl.constexpr, R: tl.constexpr, GROUPS: tl.constexpr,
                  CHECK: tl.constexpr):
    """The sampling loop's kernel (ten arguments, so that a launch costs little host time).

    It also checks the network output it reads (CHECK): a program that finds a NaN or inf
    lowers the int64 at flag_ptr to `step` (atomic min), so the sampler's non-finite guard
    costs no launch of its own; the flag is read once, after the loop.

    Coefficients of step `step` are row `step` of a (N, NT + 1) fp32 table, column k scaling
    tensor k and column NT scaling the noise. The seed is read from the device (a 0-d int64
    tensor), so a captured CUDA graph replays with whatever seed was written there: a new seed
    needs no new capture. Same `_tile` as `_affine_kernel`: the same bits for the same inputs.
    """
    pid = tl.program_id(0)
    row = coef_ptr + step * (NT + 1)
    c0 = tl.load(row)
    c1 = tl.load(row + 1)
    if NT >= 3:
        c2 = tl.load(row + 2)
    else:
        c2 = 0.0
    if NT >= 4:
        c3 = tl.load(row + 3)
    else:
        c3 = 0.0
    if NOISE == NOISE_PHILOX:
        cz = tl.load(row + NT)
        seed = tl.load(seed_ptr)
    else:
        cz = 0.0
        seed = 0
    nbad = 0
    for j in tl.static_range(GROUPS):
        nbad += _tile(pid * GROUPS + j, seed, step, out_ptr, t0, t1, t2, t3, t0, c0, c1, c2, c3, cz,
                      0, 0, 0, 0, 0, numel, 1, NT, NOISE, COEF_VALUE, COEF_VALUE, COEF_VALUE, COEF_VALUE,
                      COEF_VALUE, False, R, CHECK)
    if CHECK != CHECK_NONE:
        if nbad > 0:
            tl.atomic_min(flag_ptr, step.to(tl.int64))


def _launch_config(numel: int) -> tuple[int, int]:
    """(groups per program, num_warps). One group = 4 R = 4096 elements.

    On GPU: one group of 4096 elements per program with 8 warps (8 elements per thread per
    tile, across its four quarter-tiles). The H100 measurements found this tile layout at 99%
    of copy bandwidth in fp32 and 73% in bf16 for a minimal kernel of the same form, against
    92% / 60% with 4 warps: more warps hide the Philox + Box-Muller latency. That this
    kernel reaches it too is for the 2^27-element rows of bench/test_bench_step.py to show.
    Interpreter: one group per program (it runs programs one after another anyway).
    Neither number changes the noise (see NOISE_R).
    """
    if INTERPRETED:
        return 1, 4
    return 1, 8


# --------------------------------------------------------------------------------------
# Launcher: validation, then one launch
# --------------------------------------------------------------------------------------

# Python-side values of the modes (the launchers compare and pass plain ints).
_VALUE, _SCALAR_PTR, _SAMPLE_PTR = COEF_VALUE.value, COEF_SCALAR_PTR.value, COEF_SAMPLE_PTR.value
_NO_NOISE, _EXPLICIT, _PHILOX = NOISE_NONE.value, NOISE_EXPLICIT.value, NOISE_PHILOX.value
_CHECKS = {1: CHECK_T1.value, 3: CHECK_T3.value}  # kernels.optable's `checked` -> the kernel's CHECK


def _pack(spec: StepOp, tab: torch.Tensor) -> torch.Tensor:
    """A sampler table (N, spec.ncol) as the table kernel's (N, NT + 1) fp32 rows (kernels.optable)."""
    tab = tab.to(torch.float32)
    cols = [tab[:, k] if isinstance(k, int) else tab.new_full((tab.shape[0],), k) for k in spec.kernel_columns()]
    return torch.stack(cols, 1).contiguous()


def _check_tensors(op: str, named: dict[str, torch.Tensor]):
    """All tensors: same shape, dtype, device; supported dtype; contiguous. Returns the first."""
    items = list(named.items())
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
    for name, t in items:
        # Rejected rather than copied: a hidden .contiguous() would add a full extra pass.
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)}); "
                             "call .contiguous() first")
    check_device(op, x)
    if x.numel() > _MAX_NUMEL:
        raise ValueError(f"{op}: at most {_MAX_NUMEL} elements per call (int32 offsets), got {x.numel()}")
    return x


def _coef_arg(op: str, name: str, c, x: torch.Tensor):
    """(argument, stride, mode) for a coefficient: python number, 0-d tensor or (B,) tensor.

    Tensors stay on the device and are loaded in-kernel: no host sync, no copy.
    """
    if torch.is_tensor(c):
        if not c.is_floating_point():
            raise TypeError(f"{op}: coefficient {name} must be a floating tensor, got dtype {c.dtype}")
        if c.device != x.device:
            raise ValueError(f"{op}: coefficient {name} is on {c.device} but the tensors are on {x.device}; "
                             "compute the coefficient tables on the device before the loop")
        if c.ndim == 0:
            return c, 0, _SCALAR_PTR
        if c.ndim == 1 and c.shape[0] == x.shape[0]:
            if c.dtype == torch.bfloat16 and INTERPRETED:
                raise TypeError(f"{op}: the Triton interpreter has no bfloat16; coefficient {name} is bfloat16")
            return c, c.stride(0), _SAMPLE_PTR
        raise ValueError(f"{op}: coefficient {name} must be a scalar or have shape (B,) = ({x.shape[0]},), "
                         f"got shape {tuple(c.shape)}")
    if isinstance(c, numbers.Real) and not isinstance(c, bool):
        return float(c), 0, _VALUE
    raise TypeError(f"{op}: coefficient {name} must be a python number or a tensor, got {type(c).__name__}")


def _check_key(op: str, seed, step):
    """seed and step as python ints in [0, 2**32); numpy integers are accepted."""
    if type(seed) is int and type(step) is int and 0 <= seed < 2**32 and 0 <= step < 2**32:
        return seed, step  # the common case, without the abstract-base-class checks below
    for name, v in (("seed", seed), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{op}: {name} must be an integer for in-kernel noise, got {type(v).__name__}")
        if not 0 <= int(v) < 2**32:
            raise ValueError(f"{op}: {name} must lie in [0, 2**32), got {v}")
    return int(seed), int(step)


def _launch(spec: StepOp, tensors: tuple, coefs: tuple, z=None, seed=None, step=None, out=None):
    """Validate, then one launch of `_affine_kernel` computing sum_k a_k t_k (+ c_z z).

    `coefs` are `spec.columns` in order; the noise column may be None (no noise term).
    """
    op = spec.name
    c_z = coefs[spec.columns.index(spec.noise)] if spec.noise is not None else None
    if c_z is None:
        if z is not None:
            raise ValueError(f"{op}: z was given but c_z is None; pass c_z to inject noise")
        noise = _NO_NOISE
    elif z is not None:
        if seed is not None:
            raise ValueError(f"{op}: give either an explicit z or a seed for in-kernel noise, not both")
        noise = _EXPLICIT
    else:
        if seed is None or step is None:
            raise ValueError(f"{op}: c_z is given: pass z, or seed= and step= to draw the noise in-kernel")
        noise = _PHILOX
    named = dict(zip(spec.tensors, tensors))
    if noise == _EXPLICIT:
        named["z"] = z
    if out is not None:
        named["out"] = out
    x = _check_tensors(op, named)
    if noise == _PHILOX:
        seed, step = _check_key(op, seed, step)
    else:
        seed, step = 0, 0
    by_name = dict(zip(spec.columns, coefs))
    args = [_coef_arg(op, a, by_name[a], x) if isinstance(a, str) else (float(a), 0, _VALUE) for a in spec.scales]
    args += [(0.0, 0, _VALUE)] * (4 - spec.nt)  # unused coefficient slots (NT < 4)
    args.append(_coef_arg(op, spec.noise, c_z, x) if noise != _NO_NOISE else (0.0, 0, _VALUE))

    if out is None:
        out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    # Tensors go to the kernel as they are (it reads data pointers; no autograd is involved).
    ts = list(tensors)
    ts += [ts[0]] * (4 - spec.nt)  # unused pointer slots, never loaded (NT is constexpr)
    z_arg = z if noise == _EXPLICIT else ts[0]
    per_sample = any(mode == _SAMPLE_PTR for _, _, mode in args)
    groups, num_warps = _launch_config(numel)
    # Plain integer ceil-division: triton.cdiv called from Python goes through the JIT's
    # call machinery, which measured ~30 us per call on a loaded CPU here.
    grid = (-(-numel // (_GROUP * groups)),)
    _affine_kernel[grid](
        out, ts[0], ts[1], ts[2], ts[3], z_arg,
        *(a for a, _, _ in args), *(s for _, s, _ in args),
        numel, numel // x.shape[0], seed, step,
        NT=spec.nt, NOISE=noise, M0=args[0][2], M1=args[1][2], M2=args[2][2], M3=args[3][2], MZ=args[4][2],
        PER_SAMPLE=per_sample, R=NOISE_R, GROUPS=groups, num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------------------
# Public launchers, one per update of kernels.optable (and of wgfcore.ops)
# --------------------------------------------------------------------------------------
# Coefficients: python numbers, 0-d tensors or (B,) tensors on the tensors' device (any floating
# dtype; loaded and used in fp32). Tensors: one shape (B, ...), one dtype (fp32/fp16/bf16), one
# device, contiguous (non-contiguous input is rejected, never silently copied). The result has
# x's dtype; `out=` may alias an input (each element is read before it is written). The kernels
# define no backward: outputs never require grad (sampling needs none; use wgfcore.ops for that).


def predict(x, s, c_x, c_s, *, out=None) -> torch.Tensor:
    """x_pred = c_x x + c_s s (mirrors `wgfcore.ops.predict`). 3 element-sizes of traffic per element."""
    return _launch(OPS["predict"], (x, s), (c_x, c_s), out=out)


def em(x, s, c_x, c_s, c_z=None, *, z=None, seed=None, step=None, out=None) -> torch.Tensor:
    """x <- (c_x x + c_s s) + c_z z (mirrors `wgfcore.ops.em_step`).

    c_z None: no noise (the PF-ODE Euler step / the final denoised step). Otherwise z is either
    given explicitly, or drawn in-kernel from Philox keyed by (seed, step, element offset):
    the same (seed, step) gives the same z, another step or seed an independent one.
    """
    return _launch(OPS["em"], (x, s), (c_x, c_s, c_z), z, seed, step, out)


def project(x_pred, T, c_T, c_z=None, *, z=None, seed=None, step=None, out=None) -> torch.Tensor:
    """x <- (x_pred + c_T T) + c_z z (mirrors `wgfcore.ops.project`; Ghimire et al. Alg. 1).

    Noise as in `em`; c_z None: no noise.
    """
    return _launch(OPS["project"], (x_pred, T), (c_T, c_z), z, seed, step, out)


def heun(x, s, x_p, s_p, c_x, c_s, c_xp, c_sp, *, out=None) -> torch.Tensor:
    """x <- c_x x + c_s s + c_xp x' + c_sp s' (mirrors `wgfcore.ops.heun_correct`). 5 element-sizes per element."""
    return _launch(OPS["heun"], (x, s, x_p, s_p), (c_x, c_s, c_xp, c_sp), out=out)


# --------------------------------------------------------------------------------------
# The sampling loop's backend: validate once per run, then launch with pre-bound arguments
# --------------------------------------------------------------------------------------

class TritonSteps:
    """Step backend for `wgfcore.sample` with the fused kernels (the protocol of `wgfcore.ops.TorchSteps`).

    `plan(x, tables)` runs once per sampling run: it validates the state and the coefficient
    tables, packs each table into the kernel's (N, NT + 1) fp32 layout and binds the launch
    (grid, constexprs, seed pointer, guard flag). Each step is then one launch of `_table_kernel`
    with ten arguments and no further checks: the tensors it gets are the loop's own outputs and network
    outputs that the sampler already checked (shape, device, floating dtype) and made
    contiguous through `accept`. The public `predict/em/project/heun` keep their full checks.

    Noise of step i is drawn in-kernel from Philox keyed by (seed, i, offset). `seed` is a
    python int in [0, 2**32) or a 0-d int64 tensor on the device (its low 32 bits are the key);
    the kernel reads it from the device, so a CUDA graph replays with whatever seed it holds.
    """

    name = "triton"

    def __init__(self, seed, device=None):
        if torch.is_tensor(seed):
            if seed.ndim != 0 or seed.dtype != torch.int64:
                raise TypeError(f"TritonSteps: a seed tensor must be 0-d int64, got {seed.dtype} of shape "
                                f"{tuple(seed.shape)}")
            self.seed = seed
        else:
            self.seed, _ = _check_key("TritonSteps", seed, 0)
        self.device = torch.device(device) if device is not None else None
        self._tables = None
        #: after plan(): a 0-d int64 device tensor, FLAG_CLEAR until a checked network output held
        #: a NaN or inf, then the first such step (the sampler's guard reads it once, at the end)
        self.finite_flag = None

    def plan(self, x: torch.Tensor, tables: dict) -> "TritonSteps":
        """Validate x and the tables once; keep everything a launch needs. Returns self."""
        _check_tensors("TritonSteps", {"x": x})
        if self.device is not None and x.device != self.device:
            raise ValueError(f"TritonSteps: built for {self.device}, got a state on {x.device}")
        packed = {}
        for name, tab in tables.items():
            spec = OPS.get(name)
            if spec is None:
                raise ValueError(f"TritonSteps: unknown coefficient table {name!r}; known: {sorted(OPS)}")
            cols = ", ".join(spec.columns)
            if (not torch.is_tensor(tab) or tab.ndim != 2 or tab.shape[1] != spec.ncol
                    or not tab.is_floating_point()):
                raise ValueError(f"TritonSteps: table {name!r} must be a floating (N, {spec.ncol}) tensor with columns "
                                 f"({cols}), got {getattr(tab, 'shape', type(tab).__name__)}")
            if tab.device != x.device:
                raise ValueError(f"TritonSteps: table {name!r} is on {tab.device}, the state on {x.device}")
            packed[name] = (_pack(spec, tab), tab.shape[0])
        seed = self.seed
        if torch.is_tensor(seed):
            if seed.device != x.device:
                raise ValueError(f"TritonSteps: the seed tensor is on {seed.device}, the state on {x.device}")
        else:
            seed = torch.tensor(seed, dtype=torch.int64, device=x.device)
        self._seed_t = seed
        self.finite_flag = torch.full((), FLAG_CLEAR, dtype=torch.int64, device=x.device)
        self._tables = packed
        self._numel = x.numel()
        groups, num_warps = _launch_config(self._numel)
        self._run = _table_kernel[(max(1, -(-self._numel // (_GROUP * groups))),)]
        self._kw = {(op, noisy): dict(NT=spec.nt, NOISE=_PHILOX if noisy else _NO_NOISE, CHECK=_CHECKS[spec.checked],
                                      R=NOISE_R, GROUPS=groups, num_warps=num_warps)
                    for op, spec in OPS.items() for noisy in ((False, True) if spec.noise else (False,))}
        return self

    def accept(self, t: torch.Tensor) -> torch.Tensor:
        """A network output as the kernels take it: contiguous, and no bfloat16 in the interpreter.

        Both conversions keep every value, so the torch and Triton backends see the same numbers.
        Other floating dtypes (fp16/bf16/fp32/fp64) go to the kernel as they are: it loads each
        tensor in its own dtype and computes in fp32, as `wgfcore.ops` does.
        """
        if INTERPRETED and t.dtype == torch.bfloat16:
            t = t.float()
        return t if t.is_contiguous() else t.contiguous()

    def _step(self, table, i, t0, t1, t2, t3, op, noisy):
        tab, n = self._tables[table]
        if not 0 <= i < n:
            raise IndexError(f"TritonSteps: step {i} outside the planned table {table!r} of {n} rows")
        out = torch.empty_like(t0)
        if self._numel:
            self._run(out, t0, t1, t2, t3, tab, self._seed_t, self.finite_flag, self._numel, i,
                      **self._kw[(op, noisy)])
        return out

    # The network output of each update (kernels.optable: `checked`) is checked for NaN/inf
    # into finite_flag by the kernel that reads it anyway.
    def predict(self, x, s, table: str, i: int):
        return self._step(table, i, x, s, x, x, "predict", False)

    def em(self, x, s, table: str, i: int, noisy: bool):
        return self._step(table, i, x, s, x, x, "em", bool(noisy))

    def project(self, x_pred, T, table: str, i: int, noisy: bool):
        return self._step(table, i, x_pred, T, x_pred, x_pred, "project", bool(noisy))

    def heun(self, x, s, x_p, s_p, table: str, i: int):
        return self._step(table, i, x, s, x_p, s_p, "heun", False)

    def __repr__(self):
        seed = "<device tensor>" if torch.is_tensor(self.seed) else self.seed
        return f"TritonSteps(seed={seed}, device={self.device})"
