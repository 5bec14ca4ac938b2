"""Fused sampler-step kernels: every update of `wgfcore.ops` in one pass, noise drawn in-kernel.

ALGORITHMS §2: a sampler step is an affine combination of same-shaped tensors (state, score,
projection) plus c_z z. One kernel forms it: each input is read once, the output written once,
the Gaussian z is generated in registers by Philox, keyed by (seed, step, element offset).
The math mirrors `wgfcore.ops` (its oracle) term for term, in the same order, in fp32.
"""
from __future__ import annotations

import warnings
import weakref

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import INTERPRETED
from . import _common as C
from ._common import FLAG_CLEAR, STEP_DTYPES, SUPPORTED_DTYPES
from .noise import NOISE_R
from .optable import OPS, StepOp

__all__ = ["predict", "em", "project", "heun", "TritonSteps", "SUPPORTED_DTYPES", "STEP_DTYPES", "NOISE_R",
           "FLAG_CLEAR"]

# Noise layout (kernels/noise.py writes it out in torch). One Philox4x32-10 call on counter c yields
# four normals (two Box-Muller pairs); they go to elements g*4R + k*R + r (k = 0..3) where
# c = g*R + r. So four elements share one counter and the whole tile stays coalesced. The layout
# depends on R alone (never on the launch configuration: groups per program, warps), so a
# (seed, step) pair gives the same noise on every device and tile size. R = 1024 is kept: the H100
# measurements (README of shared/measurements/h100-2026-11-25) found R = 1024 with 8 warps as fast
# as R = 512 in bf16 and faster in fp32, and a new R would change every recorded noise stream.
_GROUP = 4 * NOISE_R

# Noise transforms, chosen by the storage dtype (kernels/noise.py is their reference in torch):
# fp32 and fp64 states keep Triton's randn4x (full-accuracy log, sin, cos on 31-bit uniforms), so
# every recorded fp32 noise stream stays as it was. 16-bit states (which round z to 8 or 11
# significant bits) use Box-Muller on 24-bit uniforms with the GPU's approximate log2, sqrt, sin,
# cos (one special-function instruction each, against some 40-100 instructions each for the
# full-accuracy sin, cos and log): the same Philox words, the same element layout.
_FAST_MATH: tl.constexpr = tl.constexpr(not INTERPRETED)  # the interpreter has no libdevice
_TWO_POW_M24: tl.constexpr = tl.constexpr(2.0**-24)
_TWO_PI: tl.constexpr = tl.constexpr(6.283185307179586)
_MINUS_2_LN2: tl.constexpr = tl.constexpr(-1.3862943611198906)

# Coefficient and noise modes (kernels._common holds their values, shared with the C++ backend);
# the same names inside the kernels.
COEF_VALUE: tl.constexpr = tl.constexpr(C.COEF_VALUE)            # a python float argument
COEF_SCALAR_PTR: tl.constexpr = tl.constexpr(C.COEF_SCALAR_PTR)  # a 0-d tensor, loaded in-kernel
COEF_SAMPLE_PTR: tl.constexpr = tl.constexpr(C.COEF_SAMPLE_PTR)  # entry b of a (B,) tensor
NOISE_NONE: tl.constexpr = tl.constexpr(C.NOISE_NONE)            # no c_z z term
NOISE_EXPLICIT: tl.constexpr = tl.constexpr(C.NOISE_EXPLICIT)    # z is a tensor argument
NOISE_PHILOX: tl.constexpr = tl.constexpr(C.NOISE_PHILOX)        # z drawn in-kernel from Philox keyed by (seed, step)
# Which tensor is a network output whose finiteness the sampling loop's kernel checks.
CHECK_NONE: tl.constexpr = tl.constexpr(0)
CHECK_T1: tl.constexpr = tl.constexpr(1)         # s in predict/em, T in project
CHECK_T3: tl.constexpr = tl.constexpr(3)         # s' in heun (its s was checked by the predict before it)

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
def _box_muller16(w_r, w_a):
    """Two normals from two Philox words, for 16-bit states: radius from w_r, angle from w_a.

    u = (w_r >> 8) + 1) 2^-24 in (0, 1] and t = (int32(w_a) >> 8) 2^-24 in [-1/2, 1/2), both exact
    in fp32; r = sqrt(-2 ln 2 log2 u); returns (r cos 2 pi t, r sin 2 pi t). The angle stays in
    [-pi, pi), where the GPU's sin.approx / cos.approx are accurate to about 2^-21.
    """
    u = ((w_r >> 8) + 1).to(tl.float32) * _TWO_POW_M24
    theta = ((w_a.to(tl.int32, bitcast=True) >> 8).to(tl.float32) * _TWO_POW_M24) * _TWO_PI
    if _FAST_MATH:
        log2u = libdevice.fast_log2f(u)
        c = libdevice.fast_cosf(theta)
        s = libdevice.fast_sinf(theta)
    else:
        log2u = tl.log2(u)
        c = tl.cos(theta)
        s = tl.sin(theta)
    # The approximate log2 may return a hair above 0 just below u = 1: clamp, never a NaN.
    r = tl.sqrt(tl.maximum(log2u * _MINUS_2_LN2, 0.0))
    return r * c, r * s


@triton.jit
def _normal4(key, counter, FAST: tl.constexpr):
    """Four standard normals per Philox4x32-10 counter (keyed by `key`): two Box-Muller pairs."""
    if FAST:
        w0, w1, w2, w3 = tl.randint4x(key, counter)
        n0, n1 = _box_muller16(w0, w1)
        n2, n3 = _box_muller16(w2, w3)
    else:
        n0, n1, n2, n3 = tl.randn4x(key, counter)
    return n0, n1, n2, n3


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
        # Storage dtype (constexpr): 16-bit states take the cheaper transform (see _FAST_MATH).
        n0, n1, n2, n3 = _normal4(key, g * R + r, out_ptr.dtype.element_ty.primitive_bitwidth == 16)
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


# `step` changes every launch: not specialised (one compiled variant serves every step). `numel`
# is fixed for a whole sampling run and specialised: Triton compiles one variant per class
# (1, a multiple of 16, other), and a multiple of 16 lets every load and store be a 16-byte
# vector (with _launch_config's warps), against 4 bytes in fp32 and 2 in bf16 without the hint
# (sm_90 builds, issue 18). The seed is read from the device and never specialises anything.
@triton.jit(do_not_specialize=["step"])
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


def _launch_config(numel: int, itemsize: int) -> tuple[int, int]:
    """(groups per program, num_warps) for `numel` elements whose narrowest tensor has `itemsize` bytes.

    One group = 4 R = 4096 elements, handled as four quarter-tiles of R elements, so a thread
    holds R / (32 num_warps) consecutive elements of each: its vector width. 16-byte accesses
    (the widest) take 4 fp32 elements (8 warps) or 8 16-bit ones (4 warps).
    fp32 and fp64: 8 warps. The H100 measurements found this tile layout at 99% of copy bandwidth
    in fp32 for a minimal kernel of the same form (92% with 4 warps).
    16-bit: 4 warps, for 16-byte accesses. Unmeasured: the same measurements found 8 warps
    better in bf16 (73% against 60%), but with 8-byte accesses and the full-accuracy noise
    transform, whose latency the extra warps hid; the "-w8" rows of bench/test_bench_step.py
    measure 8 warps against this choice.
    fp64 (a CPU-parity path): 4 warps; at 8, the sm_90 build of the public kernel with 0-d
    coefficients spills 8 bytes per thread, at 4 none.
    The narrowest tensor decides: an fp32 state with a bf16 network output takes 4 warps, or
    that output would be read 8 bytes at a time.
    Interpreter: one group per program (it runs programs one after another anyway).
    Neither number changes the noise (see NOISE_R).
    """
    if INTERPRETED:
        return 1, 4
    return 1, (8 if itemsize == 4 else 4)


# --------------------------------------------------------------------------------------
# Launcher: validation, then one launch
# --------------------------------------------------------------------------------------

# Python-side values of the modes (the launchers compare and pass plain ints).
_VALUE, _NO_NOISE, _EXPLICIT, _PHILOX = C.COEF_VALUE, C.NOISE_NONE, C.NOISE_EXPLICIT, C.NOISE_PHILOX
_CHECKS = {1: CHECK_T1.value, 3: CHECK_T3.value}  # kernels.optable's `checked` -> the kernel's CHECK


def _launch(spec: StepOp, tensors: tuple, coefs: tuple, z=None, seed=None, step=None, out=None):
    """Validate, then one launch of `_affine_kernel` computing sum_k a_k t_k (+ c_z z).

    `coefs` are `spec.columns` in order; the noise column may be None (no noise term).
    """
    op = spec.name
    noise = C.noise_mode(spec, coefs, z, seed, step)
    named = dict(zip(spec.tensors, tensors))
    if noise == _EXPLICIT:
        named["z"] = z
    named = C.check_tensors(op, named, out=out)  # non-contiguous inputs come back copied (kernels._common)
    x = named[spec.tensors[0]]
    tensors = [named[n] for n in spec.tensors]
    z = named.get("z")
    if noise == _PHILOX:
        seed, step = C.check_key(op, seed, step)
    else:
        seed, step = 0, 0
    by_name = dict(zip(spec.columns, coefs))
    args = [C.coef_arg(op, a, by_name[a], x) if isinstance(a, str) else (float(a), 0, _VALUE) for a in spec.scales]
    args += [(0.0, 0, _VALUE)] * (4 - spec.nt)  # unused coefficient slots (NT < 4)
    c_z = by_name.get(spec.noise)
    args.append(C.coef_arg(op, spec.noise, c_z, x) if noise != _NO_NOISE else (0.0, 0, _VALUE))

    if out is None:
        out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    # Tensors go to the kernel as they are (it reads data pointers; no autograd is involved).
    ts = list(tensors)
    ts += [ts[0]] * (4 - spec.nt)  # unused pointer slots, never loaded (NT is constexpr)
    z_arg = z if noise == _EXPLICIT else ts[0]
    per_sample = any(mode == C.COEF_SAMPLE_PTR for _, _, mode in args)
    groups, num_warps = _launch_config(numel, x.element_size())
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
# dtype; loaded and used in fp32). Tensors: one shape (B, ...), one dtype (fp32/fp16/bf16/fp64),
# one device; a non-contiguous input is copied once (kernels._common's one layout policy), `out=`
# must be contiguous. The result has x's dtype; `out=` may alias an input (each element is read
# before it is written). The kernels
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

# The slim launch: a step through the compiled kernel's own launcher, arguments pre-bound.
# Triton's normal launch (JITFunction.run) binds the arguments, computes their specialisation
# and its cache key, looks the kernel up, then calls CompiledKernel.run. In a sampling run
# everything but the tensors and the step index is the same for every step of one variant, so
# after the first normal launch of a variant TritonSteps calls CompiledKernel.run directly.
# That launcher's calling convention is Triton's internal one (3.x: grid, stream, function,
# packed metadata, launch metadata, enter and exit hooks, then every kernel argument); the
# first slim launch of a variant is checked bit for bit against the normal one, and any
# failure (another Triton version) turns the slim path off for the process with one warning.
_SLIM_STATE = {"ok": True}
_SLIM_CHECKED = weakref.WeakSet()  # compiled kernels whose slim launch passed the check


def _cuda_stream() -> int:
    # What Triton's own launch passes (driver.active.get_current_stream): the current raw stream
    # of the current device, so a launch inside a CUDA-graph capture lands in the graph.
    return torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice())


def _facts(out, t0, t1, t2, t3):
    """What a compiled variant was specialised on that may change between steps: the tensors'
    dtypes and whether every pointer is 16-byte aligned (Triton's pointer specialisation)."""
    aligned = ((out.data_ptr() | t0.data_ptr() | t1.data_ptr() | t2.data_ptr() | t3.data_ptr()) & 15) == 0
    return t0.dtype, t1.dtype, t2.dtype, t3.dtype, aligned


class _SlimLaunch:
    """One compiled variant of `_table_kernel` with its launcher and fixed arguments bound."""

    __slots__ = ("run", "function", "meta", "grid0", "fixed", "consts", "stream", "facts")

    def __init__(self, compiled, grid0: int, seed_t, flag, numel: int, kw: dict, facts, stream):
        self.run, self.function, self.meta = compiled.run, compiled.function, compiled.packed_metadata
        self.grid0, self.fixed, self.facts, self.stream = grid0, (seed_t, flag, numel), facts, stream
        # The constexprs, positionally in the kernel's parameter order, as the normal launch passes them.
        self.consts = tuple(kw[name] for name in _table_kernel.arg_names[10:])

    def __call__(self, out, t0, t1, t2, t3, tab, i):
        seed_t, flag, numel = self.fixed
        self.run(self.grid0, 1, 1, self.stream(), self.function, self.meta, None, None, None,
                 out, t0, t1, t2, t3, tab, seed_t, flag, numel, i, *self.consts)


def _was_checked(compiled, add: bool = False) -> bool:
    try:
        if add:
            _SLIM_CHECKED.add(compiled)
        return compiled in _SLIM_CHECKED
    except TypeError:  # not weak-referenceable: check it in every run
        return False


def _launch_hooks_set() -> bool:
    """Whether a launch hook (a profiler's) is installed: those need the normal launch, which builds
    their launch metadata. Triton 3.8 keeps the hooks as always-present chains, empty by default."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    hooks = [getattr(runtime, name, None) for name in ("launch_enter_hook", "launch_exit_hook")]
    return any(h is not None and bool(getattr(h, "calls", True)) for h in hooks)


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
        self.seed = C.check_seed("TritonSteps", seed)
        self.device = torch.device(device) if device is not None else None
        self._tables = None
        #: after plan(): a 0-d int64 device tensor, FLAG_CLEAR until a checked network output held
        #: a NaN or inf, then the first such step (the sampler's guard reads it once, at the end)
        self.finite_flag = None

    def plan(self, x: torch.Tensor, tables: dict) -> "TritonSteps":
        """Validate x and the tables once; keep everything a launch needs. Returns self."""
        C.check_tensors("TritonSteps", {"x": x})
        if not x.is_contiguous():  # the loop hands this state to every step unchecked: no copy can help
            raise ValueError(f"TritonSteps: the state x must be contiguous (strides {x.stride()} for shape "
                             f"{tuple(x.shape)})")
        if self.device is not None and x.device != self.device:
            raise ValueError(f"TritonSteps: built for {self.device}, got a state on {x.device}")
        packed = {name: (C.pack_table(spec, tab), tab.shape[0])
                  for name, (spec, tab) in C.check_tables("TritonSteps", x, tables).items()}
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
        groups, num_warps = _launch_config(self._numel, x.element_size())
        self._itemsize = x.element_size()
        self._grid0 = max(1, -(-self._numel // (_GROUP * groups)))
        self._run = _table_kernel[(self._grid0,)]
        self._slim = {}  # (op, noisy) -> _SlimLaunch, or None once it cannot be used
        self._kw = {(op, noisy): dict(NT=spec.nt, NOISE=_PHILOX if noisy else _NO_NOISE, CHECK=_CHECKS[spec.checked],
                                      R=NOISE_R, GROUPS=groups, num_warps=num_warps)
                    for op, spec in OPS.items() for noisy in ((False, True) if spec.noise else (False,))}
        return self

    def accept(self, t: torch.Tensor) -> torch.Tensor:
        """A network output as the kernels take it: addressable (kernels._common's one layout policy:
        contiguous here), and no bfloat16 in the interpreter.

        Both conversions keep every value, so the torch and Triton backends see the same numbers.
        Other floating dtypes (fp16/bf16/fp32/fp64) go to the kernel as they are: it loads each
        tensor in its own dtype and computes in fp32, as `wgfcore.ops` does.
        """
        if INTERPRETED and t.dtype == torch.bfloat16:
            t = t.float()
        return C.addressable(t)

    def _step(self, table, i, t0, t1, t2, t3, op, noisy):
        tab, n = self._tables[table]
        if not 0 <= i < n:
            raise IndexError(f"TritonSteps: step {i} outside the planned table {table!r} of {n} rows")
        out = torch.empty_like(t0)
        if self._numel:
            key = (op, noisy)
            slim = self._slim.get(key)
            if slim is not None and slim.facts == _facts(out, t0, t1, t2, t3):
                slim(out, t0, t1, t2, t3, tab, i)
            else:
                kw = self._kw[key]
                narrow = min(t1.element_size(), t2.element_size(), t3.element_size())
                if narrow < self._itemsize:  # a 16-bit network output: its own warp count (_launch_config)
                    kw = dict(kw, num_warps=_launch_config(self._numel, narrow)[1])
                compiled = self._run(out, t0, t1, t2, t3, tab, self._seed_t, self.finite_flag, self._numel, i, **kw)
                if key not in self._slim:
                    self._slim[key] = self._bind_slim(key, compiled, out, (t0, t1, t2, t3), tab, i)
        return out

    def _bind_slim(self, key, compiled, out, ts, tab, i):
        """A checked `_SlimLaunch` for variant `key` after its first normal launch (which wrote
        `out` and returned `compiled`), or None: the normal launch then serves every step."""
        if compiled is None or not _SLIM_STATE["ok"] or _launch_hooks_set():
            return None  # the interpreter launches no compiled kernel
        try:
            if out.is_cuda and torch.cuda.is_current_stream_capturing():
                return None  # the check below reads the result back: not possible while capturing
            slim = _SlimLaunch(compiled, self._grid0, self._seed_t, self.finite_flag, self._numel, self._kw[key],
                               _facts(out, *ts), _cuda_stream if out.is_cuda else lambda: 0)
            if _was_checked(compiled):  # in an earlier run: no second launch, no sync
                return slim
            again = torch.empty_like(out)
            slim(again, *ts, tab, i)
            # Same inputs, same step: the flag's atomic min is idempotent, the noise is the same.
            problem = None if torch.equal(again, out) else "its result differs from the normal launch's"
        except Exception as e:  # any Triton whose launcher is not the one this was written for
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            _was_checked(compiled, add=True)
            return slim
        _SLIM_STATE["ok"] = False
        warnings.warn(f"TritonSteps: the slim launch through the compiled kernel's own launcher is off ({problem}; "
                      f"triton {triton.__version__}); every step takes Triton's normal launch", RuntimeWarning,
                      stacklevel=4)
        return None

    # The network output of each update (kernels.optable: `checked`) is checked for NaN/inf
    # into finite_flag by the kernel that reads it anyway.
    # `out` (a dead network output the loop could spare) is not used: on a GPU a fresh tensor costs
    # no pass over memory (the caching allocator), and no measurement says reuse would pay.
    def predict(self, x, s, table: str, i: int, out=None):
        return self._step(table, i, x, s, x, x, "predict", False)

    def em(self, x, s, table: str, i: int, noisy: bool, out=None):
        return self._step(table, i, x, s, x, x, "em", bool(noisy))

    def project(self, x_pred, T, table: str, i: int, noisy: bool, out=None):
        return self._step(table, i, x_pred, T, x_pred, x_pred, "project", bool(noisy))

    def heun(self, x, s, x_p, s_p, table: str, i: int, out=None):
        return self._step(table, i, x, s, x_p, s_p, "heun", False)

    def __repr__(self):
        seed = "<device tensor>" if torch.is_tensor(self.seed) else self.seed
        return f"TritonSteps(seed={seed}, device={self.device})"
