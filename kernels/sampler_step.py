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

__all__ = ["predict", "em", "project", "heun", "TritonSteps", "SUPPORTED_DTYPES", "NOISE_R", "BYTES_PER_ELEMENT"]

# Noise layout. One Philox4x32-10 call on counter c yields four normals (two Box-Muller pairs);
# they go to elements g*4R + k*R + r (k = 0..3) where c = g*R + r. So four elements share one
# counter and the whole tile stays coalesced. The layout depends on R alone (never on the launch
# configuration), so a (seed, step) pair gives the same noise on every device and tile size.
NOISE_R = 1024
_GROUP = 4 * NOISE_R
# Element offsets are int32; the last group may run up to _GROUP - 1 past numel.
_MAX_NUMEL = 2**31 - _GROUP

# Coefficient modes (how the kernel obtains each coefficient).
_VALUE, _SCALAR_PTR, _SAMPLE_PTR = 0, 1, 2
# Noise modes.
_NO_NOISE, _EXPLICIT, _PHILOX = 0, 1, 2

# Minimum bytes moved per element, in units of the storage element size: inputs read once,
# output written once, in-kernel noise reads nothing. Used by the benchmarks for GB/s.
BYTES_PER_ELEMENT = {
    "predict": 3,            # x, s -> x_pred
    "em": 3,                 # x, s -> x  (noise in-kernel; 4 with an explicit z)
    "project": 3,            # x_pred, T -> x  (noise in-kernel; 4 with an explicit z)
    "heun": 5,               # x, s, x', s' -> x
}


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _coef(c, stride, b, mask, MODE: tl.constexpr):
    """A coefficient in fp32: a float argument, a 0-d tensor, or entry b of a (B,) tensor."""
    if MODE == 0:
        v = c
    elif MODE == 1:
        v = tl.load(c).to(tl.float32)
    else:
        v = tl.load(c + b * stride, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _part(offs, noise, out_ptr, t0, t1, t2, t3, z_ptr,
          c0, c1, c2, c3, cz, s0, s1, s2, s3, sz, numel, inner,
          NT: tl.constexpr, NOISE: tl.constexpr,
          M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, MZ: tl.constexpr,
          PER_SAMPLE: tl.constexpr):
    mask = offs < numel
    if PER_SAMPLE:
        b = offs // inner  # sample index of each element (x is (B, ...) and contiguous)
    else:
        b = offs * 0
    # Same association as wgfcore.ops: ((c0 t0 + c1 t1) + c2 t2) + c3 t3, then + cz z.
    acc = _coef(c0, s0, b, mask, M0) * tl.load(t0 + offs, mask=mask, other=0.0).to(tl.float32) \
        + _coef(c1, s1, b, mask, M1) * tl.load(t1 + offs, mask=mask, other=0.0).to(tl.float32)
    if NT >= 3:
        acc = acc + _coef(c2, s2, b, mask, M2) * tl.load(t2 + offs, mask=mask, other=0.0).to(tl.float32)
    if NT >= 4:
        acc = acc + _coef(c3, s3, b, mask, M3) * tl.load(t3 + offs, mask=mask, other=0.0).to(tl.float32)
    if NOISE == 1:
        acc = acc + _coef(cz, sz, b, mask, MZ) * tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    elif NOISE == 2:
        acc = acc + _coef(cz, sz, b, mask, MZ) * noise
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "step"])
def _affine_kernel(out_ptr, t0, t1, t2, t3, z_ptr,
                   c0, c1, c2, c3, cz, s0, s1, s2, s3, sz,
                   numel, inner, seed, step,
                   NT: tl.constexpr, NOISE: tl.constexpr,
                   M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, MZ: tl.constexpr,
                   PER_SAMPLE: tl.constexpr, R: tl.constexpr, GROUPS: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, R)
    for j in tl.static_range(GROUPS):
        g = pid * GROUPS + j
        base = g * (4 * R)
        if NOISE == 2:
            # Philox key = (seed, step) as its (low, high) 32-bit words: every step of every seed
            # is its own stream; the counter is the element's group-local index.
            key = seed.to(tl.uint32).to(tl.uint64) | (step.to(tl.uint32).to(tl.uint64) << 32)
            n0, n1, n2, n3 = tl.randn4x(key, g * R + r)
        else:
            n0 = 0.0
            n1 = 0.0
            n2 = 0.0
            n3 = 0.0
        _part(base + r, n0, out_ptr, t0, t1, t2, t3, z_ptr, c0, c1, c2, c3, cz, s0, s1, s2, s3, sz,
              numel, inner, NT, NOISE, M0, M1, M2, M3, MZ, PER_SAMPLE)
        _part(base + R + r, n1, out_ptr, t0, t1, t2, t3, z_ptr, c0, c1, c2, c3, cz, s0, s1, s2, s3, sz,
              numel, inner, NT, NOISE, M0, M1, M2, M3, MZ, PER_SAMPLE)
        _part(base + 2 * R + r, n2, out_ptr, t0, t1, t2, t3, z_ptr, c0, c1, c2, c3, cz, s0, s1, s2, s3, sz,
              numel, inner, NT, NOISE, M0, M1, M2, M3, MZ, PER_SAMPLE)
        _part(base + 3 * R + r, n3, out_ptr, t0, t1, t2, t3, z_ptr, c0, c1, c2, c3, cz, s0, s1, s2, s3, sz,
              numel, inner, NT, NOISE, M0, M1, M2, M3, MZ, PER_SAMPLE)


def _launch_config(numel: int) -> tuple[int, int]:
    """(groups per program, num_warps). One group = 4 R = 4096 elements.

    On GPU: 4096 elements per program with 4 warps is 8 elements (16-32 bytes) per thread per
    tensor per quarter-tile: full-width vector loads for every storage dtype. Large tensors take
    2 groups per program (8192 elements) to halve the number of programs and amortise the
    per-program coefficient and key set-up. Untuned; bench/test_bench_step.py measures it.
    Interpreter: one group per program (it runs programs one after another anyway).
    """
    if INTERPRETED:
        return 1, 4
    return (2 if numel >= 64 * 8192 else 1), 4


# --------------------------------------------------------------------------------------
# Launcher: validation, then one launch
# --------------------------------------------------------------------------------------


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
    check_dtype(op, x.dtype)
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
            return c.detach(), 0, _SCALAR_PTR
        if c.ndim == 1 and c.shape[0] == x.shape[0]:
            if c.dtype == torch.bfloat16 and INTERPRETED:
                raise TypeError(f"{op}: the Triton interpreter has no bfloat16; coefficient {name} is bfloat16")
            return c.detach(), c.stride(0), _SAMPLE_PTR
        raise ValueError(f"{op}: coefficient {name} must be a scalar or have shape (B,) = ({x.shape[0]},), "
                         f"got shape {tuple(c.shape)}")
    if isinstance(c, numbers.Real) and not isinstance(c, bool):
        return float(c), 0, _VALUE
    raise TypeError(f"{op}: coefficient {name} must be a python number or a tensor, got {type(c).__name__}")


def _check_key(op: str, seed, step):
    for name, v in (("seed", seed), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{op}: {name} must be a python int for in-kernel noise, got {type(v).__name__}")
        if not 0 <= int(v) < 2**32:
            raise ValueError(f"{op}: {name} must lie in [0, 2**32), got {v}")
    return int(seed), int(step)


def _launch(op: str, tensors: dict, coefs: dict, c_z=None, z=None, seed=None, step=None, out=None):
    """Validate, then one launch of `_affine_kernel` computing sum_k c_k t_k (+ c_z z)."""
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
    named = dict(tensors)
    if noise == _EXPLICIT:
        named["z"] = z
    if out is not None:
        named["out"] = out
    x = _check_tensors(op, named)
    if noise == _PHILOX:
        seed, step = _check_key(op, seed, step)
    else:
        seed, step = 0, 0
    args = [_coef_arg(op, n, c, x) for n, c in coefs.items()]
    args += [_coef_arg(op, "c_z", c_z, x) if noise != _NO_NOISE else (0.0, 0, _VALUE)]
    while len(args) < 5:  # unused coefficient slots (NT < 4) before c_z
        args.insert(len(args) - 1, (0.0, 0, _VALUE))

    if out is None:
        out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    ts = [t.detach() for t in tensors.values()]
    nt = len(ts)
    ts += [ts[0]] * (4 - nt)  # unused pointer slots, never loaded (NT is constexpr)
    z_arg = z.detach() if noise == _EXPLICIT else ts[0]
    per_sample = any(mode == _SAMPLE_PTR for _, _, mode in args)
    groups, num_warps = _launch_config(numel)
    grid = (triton.cdiv(numel, _GROUP * groups),)
    _affine_kernel[grid](
        out, ts[0], ts[1], ts[2], ts[3], z_arg,
        *(a for a, _, _ in args), *(s for _, s, _ in args),
        numel, numel // x.shape[0], seed, step,
        NT=nt, NOISE=noise, M0=args[0][2], M1=args[1][2], M2=args[2][2], M3=args[3][2], MZ=args[4][2],
        PER_SAMPLE=per_sample, R=NOISE_R, GROUPS=groups, num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------------------
# Public launchers, one per update of wgfcore.ops
# --------------------------------------------------------------------------------------
# Coefficients: python numbers, 0-d tensors or (B,) tensors on the tensors' device (any floating
# dtype; loaded and used in fp32). Tensors: one shape (B, ...), one dtype (fp32/fp16/bf16), one
# device, contiguous (non-contiguous input is rejected, never silently copied). The result has
# x's dtype; `out=` may alias an input (each element is read before it is written). The kernels
# define no backward: outputs never require grad (sampling needs none; use wgfcore.ops for that).


def predict(x, s, c_x, c_s, *, out=None) -> torch.Tensor:
    """x_pred = c_x x + c_s s (mirrors `wgfcore.ops.predict`). 3 element-sizes of traffic per element."""
    return _launch("predict", {"x": x, "s": s}, {"c_x": c_x, "c_s": c_s}, out=out)


def em(x, s, c_x, c_s, c_z=None, *, z=None, seed=None, step=None, out=None) -> torch.Tensor:
    """x <- (c_x x + c_s s) + c_z z (mirrors `wgfcore.ops.em_step`).

    c_z None: no noise (the PF-ODE Euler step / the final denoised step). Otherwise z is either
    given explicitly, or drawn in-kernel from Philox keyed by (seed, step, element offset):
    the same (seed, step) gives the same z, another step or seed an independent one.
    """
    return _launch("em", {"x": x, "s": s}, {"c_x": c_x, "c_s": c_s}, c_z, z, seed, step, out)


def project(x_pred, T, c_T, c_z=None, *, z=None, seed=None, step=None, out=None) -> torch.Tensor:
    """x <- (x_pred + c_T T) + c_z z (mirrors `wgfcore.ops.project`; Ghimire et al. Alg. 1).

    Noise as in `em`; c_z None: no noise.
    """
    return _launch("project", {"x_pred": x_pred, "T": T}, {"c_xpred": 1.0, "c_T": c_T}, c_z, z, seed, step, out)


def heun(x, s, x_p, s_p, c_x, c_s, c_xp, c_sp, *, out=None) -> torch.Tensor:
    """x <- c_x x + c_s s + c_xp x' + c_sp s' (mirrors `wgfcore.ops.heun_correct`). 5 element-sizes per element."""
    return _launch("heun", {"x": x, "s": s, "x_p": x_p, "s_p": s_p},
                   {"c_x": c_x, "c_s": c_s, "c_xp": c_xp, "c_sp": c_sp}, out=out)


class TritonSteps:
    """Step backend for `wgfcore.sample` with the fused kernels (same methods as `TorchSteps`).

    Noise of step i is drawn in-kernel from Philox keyed by (seed, i, offset): no noise tensor
    is allocated or read, and a fixed seed makes a whole sampling run deterministic.
    """

    name = "triton"

    def __init__(self, seed: int, device=None):
        self.seed, _ = _check_key("TritonSteps", seed, 0)
        self.device = torch.device(device) if device is not None else None

    def predict(self, x, s, c_x, c_s):
        return predict(x, s, c_x, c_s)

    def em(self, x, s, c_x, c_s, c_z, step: int):
        return em(x, s, c_x, c_s, c_z, seed=None if c_z is None else self.seed, step=step)

    def project(self, x_pred, T, c_T, c_z, step: int):
        return project(x_pred, T, c_T, c_z, seed=None if c_z is None else self.seed, step=step)

    def heun(self, x, s, x_p, s_p, c_x, c_s, c_xp, c_sp):
        return heun(x, s, x_p, s_p, c_x, c_s, c_xp, c_sp)

    def __repr__(self):
        return f"TritonSteps(seed={self.seed}, device={self.device})"
