"""Fused sampler steps on the CPU: a C++ twin of kernels/sampler_step.py, built with ninja at first use.

ALGORITHMS §2: each update of `wgfcore.ops` is one pass over memory, parallel over elements
(at::parallel_for, torch's own thread pool) and vectorised; the Gaussian z is drawn in the pass
from the Triton kernels' Philox stream, so a (seed, step) gives the same noise on CPU and GPU.

Why JIT at first use rather than ahead of time in setup.py: an ahead-of-time build needs torch
inside pip's isolated build environment (a second multi-GB torch download, possibly another ABI
than the one installed) and turns a missing compiler into a failed `pip install`. Built at first
use, `pip install -e .` stays pure Python; the first `CppSteps` compiles once (tens of seconds)
into torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), keyed by
this machine's CPU, the compiler and the torch version, and later processes load it in well under
a second; with no compiler, `status()` says so in one line and `backend="auto"` uses torch's steps.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import sysconfig
import threading

import torch

from . import _common as C
from ._common import FLAG_CLEAR, STEP_DTYPES
from .noise import NOISE_R
from .optable import OPS, StepOp

__all__ = ["predict", "em", "project", "heun", "CppSteps", "status", "available", "require", "NOISE_R",
           "FLAG_CLEAR", "STEP_DTYPES"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cpu_steps.cpp")

# --------------------------------------------------------------------------------------
# The build: once per process, on first use
# --------------------------------------------------------------------------------------

_lock = threading.Lock()
_ext = None
_error: str | None = None
_tried = False


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _cpu_signature() -> str:
    """What the -march=native code depends on: the CPU's feature flags (Linux), else the machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags). -ffp-contract=off: the compiler fuses no a*b + c on its own, so
    every product and sum rounds where wgfcore.ops' do (the tests compare the two bit for bit).
    Linux (gcc/clang) is what is built and tested here; on macOS the OpenMP runtime is not assumed
    (the steps then run on one thread); elsewhere a failed build leaves the torch steps."""
    cflags = ["-O3", "-ffp-contract=off", "-fno-math-errno", f"-DWGF_NOISE_R={NOISE_R}"]
    ldflags = []
    if sys.platform.startswith("linux"):
        # The code runs only where it was built (the cache name holds the CPU's flags).
        cflags += ["-march=native", "-fopenmp"]
        ldflags += ["-fopenmp"]  # libgomp.so.1: the very runtime torch loaded, so set_num_threads holds
    elif sys.platform == "darwin":
        cflags += ["-mcpu=native" if platform.machine() == "arm64" else "-march=native", "-fopenmp-simd"]
    return cflags, ldflags


def _name() -> str:
    key = "|".join([_cpu_signature(), _compiler(), torch.__version__, sys.version])
    return "wgf_cpu_steps_" + hashlib.sha1(key.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _quiet_torch_build_log():
    """torch.utils.cpp_extension's log at ERROR only: its "No CUDA runtime is found" line (these
    kernels never use CUDA) and its compiler-check warnings would add lines to our one."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _cpp_extension():
    with _quiet_torch_build_log():
        from torch.utils import cpp_extension
    return cpp_extension


def _preflight() -> str | None:
    """What is missing for the build, in one line; None when nothing obvious is."""
    cxx = _compiler()
    if shutil.which(cxx.split()[0]) is None:
        return (f"no C++ compiler: {cxx!r} was not found (install g++ or clang++, or set CXX to one)")
    if not _cpp_extension().is_ninja_available():
        return "ninja was not found (pip install ninja)"
    include = sysconfig.get_paths().get("include", "")
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"the Python headers were not found (no Python.h in {include}; install python3-dev)"
    return None


def _summarize(e: BaseException, log_dir: str) -> str:
    """A failed build as one line: the compiler's first diagnostic (else the exception's first
    line), and where the whole output is."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error:" in ln), lines[0] if lines else type(e).__name__)
    log = os.path.join(log_dir, "build-error.log")
    try:
        os.makedirs(log_dir, exist_ok=True)
        with open(log, "w") as f:
            f.write(f"{type(e).__name__}: {e}\n")
        where = f"; full log: {log}"
    except OSError:
        where = ""
    return f"the C++ build failed ({first}){where}"


def _build():
    global _ext, _error, _tried
    with _lock:
        if _tried:
            return
        _tried = True
        _error = _preflight()
        if _error is not None:
            return
        cpp_extension = _cpp_extension()
        name = _name()
        # The folder torch's load() would pick itself (TORCH_EXTENSIONS_DIR, else its user cache),
        # asked for here to say where a first build goes and to put a failed build's log there.
        build_dir = cpp_extension._get_build_directory(name, verbose=False)
        cflags, ldflags = _flags()
        if not any(f.endswith((".so", ".pyd")) for f in os.listdir(build_dir)):
            print(f"kernels.cpu_steps: building the C++ step kernels (once per machine) in {build_dir}",
                  file=sys.stderr, flush=True)
        try:
            with _quiet_torch_build_log():
                _ext = cpp_extension.load(name=name, sources=[_SRC], extra_cflags=cflags, extra_ldflags=ldflags,
                                          build_directory=build_dir, with_cuda=False, verbose=False)
        except Exception as e:  # noqa: BLE001 - any failure to build or load means "not available"
            _error = _summarize(e, build_dir)
            return
        if _ext.NOISE_R != NOISE_R:  # pragma: no cover - a stale build of another layout
            _ext, _error = None, f"the built extension has NOISE_R={_ext.NOISE_R}, expected {NOISE_R}"
            return
        _ext.calibrate(torch.empty(0))  # a temporary no one else holds: what a sole output looks like in C++


def status() -> str | None:
    """None when the C++ step kernels are built and loaded (building them on first call);
    otherwise one line that says what is missing (no compiler, no ninja, a failed build)."""
    if not _tried:
        _build()
    return _error


def available() -> bool:
    """Whether the C++ step kernels can be used in this process (builds them on first call)."""
    return status() is None


def require(who: str = "backend='cpp'"):
    """The loaded extension, or a RuntimeError of one line saying what is missing."""
    reason = status()
    if reason is not None:
        raise RuntimeError(f"{who} needs the C++ step kernels, which are not available: {reason}")
    return _ext


# --------------------------------------------------------------------------------------
# Validation: kernels._common's checks (the Triton launchers' very messages), the CPU as device rule
# --------------------------------------------------------------------------------------

def _check_cpu(op: str, x: torch.Tensor) -> None:
    if x.device.type != "cpu":
        raise ValueError(f"{op}: the C++ step kernels take CPU tensors, got {x.device} "
                         "(kernels.sampler_step runs the same updates on CUDA)")


def _launch(spec: StepOp, tensors: tuple, coefs: tuple, z=None, seed=None, step=None, out=None):
    """Validate, then one pass computing sum_k a_k t_k (+ c_z z); `coefs` are `spec.columns` in order,
    the noise column None for no noise term (kernels.sampler_step._launch's rules)."""
    op = spec.name
    noise = C.noise_mode(spec, coefs, z, seed, step)
    named = dict(zip(spec.tensors, tensors))
    if noise == C.NOISE_EXPLICIT:
        named["z"] = z
    named = C.check_tensors(op, named, device_check=_check_cpu, out=out)  # copies non-contiguous inputs once
    x = named[spec.tensors[0]]
    seed, step = C.check_key(op, seed, step) if noise == C.NOISE_PHILOX else (0, 0)
    by_name = dict(zip(spec.columns, coefs))
    args = [_coef(op, a, by_name[a], x) if isinstance(a, str) else (float(a), None) for a in spec.scales]
    args += [(0.0, None)] * (4 - spec.nt)
    args.append(_coef(op, spec.noise, by_name[spec.noise], x) if noise != C.NOISE_NONE else (0.0, None))
    ext = require(op)
    if out is None:
        out = torch.empty_like(x)
    ext.affine(out, [named[n] for n in spec.tensors], named.get("z"), [a for a, _ in args], [t for _, t in args],
               noise, seed, step)
    return out


def _coef(op: str, name: str, c, x: torch.Tensor):
    """(value, fp32 tensor or None) for the C++ pass: kernels._common.coef_arg's checks, then a tensor
    (0-d or (B,)) read in fp32, as the Triton kernels load it."""
    arg, _, mode = C.coef_arg(op, name, c, x, interpreted=False)
    if mode == C.COEF_VALUE:
        return arg, None
    return 0.0, arg.to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------
# Public launchers: kernels.sampler_step's, on CPU tensors (any of fp32/fp64/fp16/bf16)
# --------------------------------------------------------------------------------------
# Coefficients: python numbers, 0-d tensors or (B,) tensors (any floating dtype, used in fp32).
# Tensors: one shape (B, ...), one dtype, on the CPU; a non-contiguous one is copied once (the
# layout policy of kernels._common). The result has x's dtype; `out=` (contiguous) may alias an
# input (each element is read before it is written). No autograd.


def predict(x, s, c_x, c_s, *, out=None) -> torch.Tensor:
    """x_pred = c_x x + c_s s (mirrors `wgfcore.ops.predict`)."""
    return _launch(OPS["predict"], (x, s), (c_x, c_s), out=out)


def em(x, s, c_x, c_s, c_z=None, *, z=None, seed=None, step=None, out=None) -> torch.Tensor:
    """x <- (c_x x + c_s s) + c_z z (mirrors `wgfcore.ops.em_step`); z explicit, or drawn from
    Philox keyed by (seed, step) exactly as the Triton kernels draw it; c_z None: no noise."""
    return _launch(OPS["em"], (x, s), (c_x, c_s, c_z), z, seed, step, out)


def project(x_pred, T, c_T, c_z=None, *, z=None, seed=None, step=None, out=None) -> torch.Tensor:
    """x <- (x_pred + c_T T) + c_z z (mirrors `wgfcore.ops.project`; Ghimire et al. Alg. 1)."""
    return _launch(OPS["project"], (x_pred, T), (c_T, c_z), z, seed, step, out)


def heun(x, s, x_p, s_p, c_x, c_s, c_xp, c_sp, *, out=None) -> torch.Tensor:
    """x <- c_x x + c_s s + c_xp x' + c_sp s' (mirrors `wgfcore.ops.heun_correct`)."""
    return _launch(OPS["heun"], (x, s, x_p, s_p), (c_x, c_s, c_xp, c_sp), out=out)


# --------------------------------------------------------------------------------------
# The sampling loop's backend
# --------------------------------------------------------------------------------------

class CppSteps:
    """Step backend for `wgfcore.sample` with the C++ kernels (the protocol of `TritonSteps`).

    `plan(x, tables)` validates the state and the tables once and packs each table into
    (N, NT + 1) fp32 rows; a step is then one call into C++ (no further checks), which reads row
    i, draws the noise of step i from Philox keyed by (seed, i) in the pass, and counts NaN/inf in
    the network output it reads into `finite_flag` (the first bad step), so the sampler needs no
    guard pass of its own. `seed`: a python int in [0, 2**32) or a 0-d int64 CPU tensor (its low
    32 bits are the key), as `wgfcore.sample.draw_key` draws it.
    """

    name = "cpp"

    def __init__(self, seed, device=None):
        self.seed = C.check_seed("CppSteps", seed)
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type != "cpu":
            raise ValueError(f"CppSteps: the C++ step kernels run on the CPU, got device={self.device}")
        self._tables = None
        #: after plan(): a 0-d int64 tensor, FLAG_CLEAR until a checked network output held a NaN
        #: or inf, then the first such step (the sampler reads it once, after the loop)
        self.finite_flag = None

    def plan(self, x: torch.Tensor, tables: dict) -> "CppSteps":
        """Validate x and the tables once; keep everything a step needs. Returns self."""
        C.check_tensors("CppSteps", {"x": x}, device_check=_check_cpu)
        if not x.is_contiguous():  # the loop hands this state to every step unchecked: no copy can help
            raise ValueError(f"CppSteps: the state x must be contiguous (strides {x.stride()} for shape "
                             f"{tuple(x.shape)})")
        checked = C.check_tables("CppSteps", x, tables)
        seed = self.seed
        if torch.is_tensor(seed):
            if seed.device != x.device:
                raise ValueError(f"CppSteps: the seed tensor is on {seed.device}, the state on {x.device}")
        else:
            seed = torch.tensor(seed, dtype=torch.int64)
        self._ext = require("CppSteps")
        self._seed_t = seed
        self._dtype = x.dtype
        self.finite_flag = torch.full((), FLAG_CLEAR, dtype=torch.int64)
        self._tables = {name: (C.pack_table(spec, tab), tab.shape[0]) for name, (spec, tab) in checked.items()}
        return self

    def accept(self, t: torch.Tensor) -> torch.Tensor:
        """A network output as the kernels take it: addressable (kernels._common's layout policy:
        contiguous here), in the state's dtype or fp32.

        Both conversions keep the values the update uses: a 16-bit output is exact in fp32, and
        wgfcore.ops reads an fp64 output in fp32 too.
        """
        if t.dtype != self._dtype and t.dtype != torch.float32:
            t = t.float()
        return C.addressable(t)

    def _step(self, name, i, t0, t1, t2, t3, nt, noisy, out):
        tab, n = self._tables[name]
        if not 0 <= i < n:
            raise IndexError(f"CppSteps: step {i} outside the planned table {name!r} of {n} rows")
        return self._ext.table_step(t0, t1, t2, t3, tab, i, nt, noisy, self._seed_t, self.finite_flag, out)

    # The network output each update reads (kernels.optable's `checked`: s, T, s') is checked
    # for NaN/inf into finite_flag in the same pass. `out`: a dead tensor (the loop's Run.spare) that
    # the result is written into when the C++ side finds its memory unshared and torch's own (memory
    # just read, warm in cache, instead of a fresh tensor's cold pages); otherwise, and for None, a new tensor.
    def predict(self, x, s, table: str, i: int, out=None):
        return self._step(table, i, x, s, x, s, 2, False, out)

    def em(self, x, s, table: str, i: int, noisy: bool, out=None):
        return self._step(table, i, x, s, x, s, 2, noisy, out)

    def project(self, x_pred, T, table: str, i: int, noisy: bool, out=None):
        return self._step(table, i, x_pred, T, x_pred, T, 2, noisy, out)

    def heun(self, x, s, x_p, s_p, table: str, i: int, out=None):
        return self._step(table, i, x, s, x_p, s_p, 4, False, out)

    def __repr__(self):
        seed = "<tensor>" if torch.is_tensor(self.seed) else self.seed
        return f"CppSteps(seed={seed}, device={self.device})"
