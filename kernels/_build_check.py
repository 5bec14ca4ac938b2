"""Compiled-code facts of every kernel configuration that real code launches, read without a GPU.

    TRITON_INTERPRET=0 python -m kernels._build_check [--quick] [--json FILE] [--jobs N] [--list]
    TRITON_INTERPRET=0 python bench/build_check.py ...     # the same with the adm64 U-Net's launches
    python bench/build_check.py --warm --jobs 15            # on a GPU: fill Triton's cache

The interpreter runs a kernel's arithmetic in Python, never Triton's compiler, so layouts,
register allocation and vector widths are only seen in a real build. This module runs the code
that launches kernels -- the sampling loop's step backend, the public step launchers, the
attention API, the fused GroupNorm (SCENARIOS; bench/build_check.py adds the U-Net, as kernels
imports only torch and triton) -- on fake CUDA tensors (torch's FakeTensorMode: shapes, strides
and dtypes, no memory). Each Triton launch is turned into Triton's own warm-up of the same call:
Triton's launcher specialises it as on a GPU (16-byte pointer alignment, integers divisible by
16, `do_not_specialize`) and compiles it for sm_90 with the wheel's compiler, without launching.
For each distinct binary it reports ptxas's registers and spills, Triton's shared memory, and
the byte width of each pointer argument's global loads and stores in the PTX, and checks: no
spills, shared memory within an H100's, a step kernel on a multiple-of-16 element count moving
16 bytes per access, and every kernel of the package launched by some scenario (`Scenario`
says how to add one). Exit status 1 names what failed.

With `--warm` on a CUDA machine the same launches compile for that GPU into Triton's on-disk
cache (keys are those of a real launch), split over `--jobs` processes: bench/device_check.py
runs it (through bench/build_check.py) before its timed phases.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from . import INTERPRETED

TARGET = GPUTarget("cuda", 90, 32)
#: the most shared memory one block of an H100 (sm_90) may use: 227 KB, opted in
H100_MAX_SHARED = 227 * 1024
#: pointer alignment that a real launch sees: the CUDA caching allocator hands out 512-byte blocks
ALLOC_ALIGN = 512


# --------------------------------------------------------------------------------------
# Fake CUDA tensors and a recorder of Triton launches
# --------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One recorded launch: the kernel, its arguments by name, the scenario, its compiled binary."""

    scenario: str
    kernel: str
    args: dict
    kernel_obj: object = None
    error: str | None = None
    key: str | None = None  # Triton's specialisation key (set when the launcher reaches its compile step)
    jit: object = None  # the JITFunction


class _Pointer:
    """What Triton's launcher reads of a tensor argument: its dtype and its address.

    The address is an allocator-aligned base plus the tensor's storage offset, so a view that
    starts inside its storage (a q/k/v slice of a fused qkv tensor) is specialised as it would be.
    """

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = 64 * ALLOC_ALIGN + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


class _Sm90Driver:
    """A stand-in for Triton's CUDA driver on a machine without one: target sm_90, device 0.

    Triton's launcher asks the driver only for the target (to pick the compiler backend), the
    current device and stream (to key its in-memory cache); a warm-up launches nothing.
    """

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cuda", 0)


@contextlib.contextmanager
def recording(scenario: str, launches: list, compile_filter: Callable[[str], bool] | None = None):
    """Within the block every Triton launch is compiled (not run) and appended to `launches`.

    compile_filter(key) -> False skips compiling a specialisation (through Triton's
    jit_cache_hook, which also gives each launch its key): `--jobs` splits the distinct binaries
    over processes with it, `--list` compiles nothing.
    """
    orig_run = JITFunction.run
    knobs = triton.knobs.runtime
    old_hook = knobs.jit_cache_hook
    current: list[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        desc = {k: (_describe(v) if torch.is_tensor(v) else v) for k, v in bound.arguments.items()}
        desc.update({k: v for k, v in kwargs.items() if k not in params})  # launch options: num_warps...
        launch = Launch(scenario, self.fn.__name__, desc, jit=self)
        stand_ins = [_Pointer(a) if torch.is_tensor(a) else a for a in args]
        kw = {k: (_Pointer(v) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        current[:] = [launch]
        try:
            launch.kernel_obj = orig_run(self, *stand_ins, grid=grid, warmup=True, **kw)
        except Exception as e:  # noqa: BLE001 - a configuration that does not build is a finding
            launch.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}" if str(e).strip() \
                else type(e).__name__
        launches.append(launch)
        return None

    def hook(*, key, **_):
        if current:
            current[0].key = str(key)
        return not compile_filter(str(key))  # True: skip this compilation

    JITFunction.run = run
    if compile_filter is not None:
        knobs.jit_cache_hook = hook
    try:
        yield launches
    finally:
        JITFunction.run = orig_run
        knobs.jit_cache_hook = old_hook


def _describe(t: torch.Tensor) -> str:
    dt = str(t.dtype).removeprefix("torch.")
    return f"{dt}{list(t.shape)} strides {list(t.stride())}" + (f" +{t.storage_offset()}" if t.storage_offset() else "")


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=False)


def fake_module(module: torch.nn.Module) -> torch.nn.Module:
    """Give a module (built on the meta device) fake CUDA parameters and buffers of the same
    shapes, strides and dtypes. Call inside the fake mode."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cuda")
                m._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cuda")
    return module


@contextlib.contextmanager
def cuda_autocast(dtype=torch.bfloat16):
    """bf16 autocast for fake CUDA tensors: `torch.autocast("cuda")` turns itself off without a
    GPU, so the dispatcher's flags are set directly (what the bench's autocast sets)."""
    was, old = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", was)
        torch.set_autocast_dtype("cuda", old)
        torch.clear_autocast_cache()


def fake_backward(out: torch.Tensor) -> None:
    """Run the backward graph of `out`, from a dense gradient like it, node by node in this thread.

    torch's autograd engine asks the CUDA runtime about the device of CUDA tensors, which fails
    without a GPU, so this walks the graph itself: each node runs once all the nodes that feed
    it have run, with the gradients reduced to the shapes and dtypes its inputs had (what the
    engine does). Custom autograd.Functions run their Python backward: their launches record.
    """
    root = out.grad_fn
    pending, stack, seen = {}, [root], {root}
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is not None:
                pending[nxt] = pending.get(nxt, 0) + 1
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
    grads = {root: {out.output_nr: torch.empty_like(out, memory_format=torch.contiguous_format)}}
    ready = [root]
    while ready:
        node = ready.pop()
        got = grads.pop(node, {})
        if type(node).__name__ == "AccumulateGrad":
            continue
        args = [got.get(i) for i in range(len(node._input_metadata))]
        if hasattr(node, "_forward_cls"):  # a Python autograd.Function: grads per forward input
            outs = node.apply(*args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            outs = [g for g, need in zip(outs, node.needs_input_grad) if need]
            edges = [e for e in node.next_functions if e[0] is not None]
        else:
            outs = node(*args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            edges = node.next_functions
        for (nxt, idx), g in zip(edges, outs):
            if nxt is None:
                continue
            if g is not None:
                meta = nxt._input_metadata[idx]
                if list(g.shape) != list(meta.shape):
                    g = g.sum_to_size(meta.shape)
                if g.dtype != meta.dtype:
                    g = g.to(meta.dtype)
                slot = grads.setdefault(nxt, {})
                slot[idx] = g if idx not in slot else slot[idx] + g
            pending[nxt] -= 1
            if pending[nxt] == 0:
                ready.append(nxt)


def cuda(*shape, dtype=torch.float32, requires_grad=False) -> torch.Tensor:
    """A fake contiguous CUDA tensor (inside fake_mode())."""
    return torch.empty(shape, dtype=dtype, device="cuda", requires_grad=requires_grad)


# --------------------------------------------------------------------------------------
# Scenarios: the code whose launches are compiled. Add one per new launcher (see the notes).
# --------------------------------------------------------------------------------------

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def step_vector_rule(args: dict) -> int | None:
    """A step kernel on a multiple-of-16 element count must move 16 bytes per access."""
    numel = args.get("numel")
    return 16 if isinstance(numel, int) and numel % 16 == 0 else None


# the step kernels' element-wise tensors (not the coefficient, seed and flag pointers)
STEP_STREAMED = ("out_ptr", "t0", "t1", "t2", "t3", "z_ptr")


def _sampling_loop(pairs, shape=(16, 3, 64, 64), steps=4):
    """The step backend as sample() drives it (kernels.sampler_step.TritonSteps): one plan, then
    each update at (state dtype, network-output dtype)."""
    from . import sampler_step as S
    from .optable import OPS

    slim = getattr(S, "_SLIM_STATE", None)  # the slim launch calls a compiled kernel directly: not
    if slim is not None:                    # here, where launches only compile (every step takes run)
        slim["ok"] = False
    for state, net in pairs:
        x = cuda(*shape, dtype=state)
        s = cuda(*shape, dtype=net)
        tables = {name: cuda(steps, op.ncol) for name, op in OPS.items()}
        plan = S.TritonSteps(7).plan(x, tables)
        plan.predict(x, s, "predict", 0)
        plan.em(x, s, "em", 1, True)
        plan.em(x, s, "em", 2, False)
        plan.project(x, s, "project", 1, True)
        plan.heun(x, s, x, s, "heun", 1)


def _public_steps(dtypes, shapes):
    """The public launchers as the bench calls them: 0-d device coefficients with in-kernel noise,
    and per-sample coefficients with an explicit z."""
    from . import sampler_step as S

    for dtype in dtypes:
        for shape in shapes:
            x, s = cuda(*shape, dtype=dtype), cuda(*shape, dtype=dtype)
            c = [cuda(dtype=F32) for _ in range(4)]
            S.em(x, s, c[0], c[1], c[2], seed=1, step=3)
            S.project(x, s, c[0], c[1], seed=1, step=3)
            S.predict(x, s, c[0], c[1])
            S.heun(x, s, x, s, *c)
            per = [cuda(shape[0], dtype=F32) for _ in range(3)]
            S.em(x, s, per[0], per[1], per[2], z=cuda(*shape, dtype=dtype))


# bench/test_bench_attention.py's shapes (B, H, L, D); the U-Net's come from the U-Net itself
ATTENTION_SHAPES = [(32, 8, 64, 64), (32, 6, 256, 64), (32, 4, 1024, 64), (4, 16, 4096, 64), (4, 16, 4096, 128)]


def _attention(shapes, dtypes):
    """attention() forward and backward at (B, H, L, D) in each dtype, with every multi-block
    backward the module offers (kernels.attention.BACKWARDS, chosen by use_backward)."""
    from . import attention as A

    kinds = getattr(A, "BACKWARDS", (None,))
    for B, H, L, D in shapes:
        for dtype in dtypes:
            for kind in kinds:
                with A.use_backward(kind) if kind is not None else contextlib.nullcontext():
                    q, k, v = (cuda(B, H, L, D, dtype=dtype, requires_grad=True) for _ in range(3))
                    fake_backward(A.attention(q, k, v))


def _groupnorm(shapes, dtype=BF16):
    """The fused GroupNorm directly, forward and backward, with and without scale-shift, at
    (B, C, H, W) shapes of the U-Net's levels (32 groups)."""
    from .groupnorm import group_norm_act

    for B, C, H, W in shapes:
        for ss in (True, False):
            x = cuda(B, C, H, W, dtype=dtype, requires_grad=True)
            w, b = cuda(C, requires_grad=True), cuda(C, requires_grad=True)
            scale, shift = (cuda(B, C, dtype=dtype, requires_grad=True) for _ in range(2)) if ss else (None, None)
            fake_backward(group_norm_act(x, 32, w, b, scale, shift))


@dataclass
class Scenario:
    """Code to run on fake CUDA tensors; its launches are compiled and checked.

    Every kernel of the package must be launched by some scenario, and by a quick one: the
    `--quick` run (tests/test_build_check.py) reports a kernel that none reaches. A kernel
    reached through the attention API, group_norm_act or the U-Net needs nothing new; another adds a Scenario
    whose `run` calls its public launcher on `cuda(...)` tensors (inside the fake mode).

    min_access_bytes(args) -> bytes or None: the narrowest global load or store allowed, for a
    launch with these arguments, through each of the pointer arguments named in `streamed`
    (None: no vector-width rule for that launch).
    quick: part of `--quick` (tests/test_build_check.py).
    """

    name: str
    run: Callable[[], None]
    quick: bool = False
    min_access_bytes: Callable[[dict], int | None] | None = None
    streamed: tuple = ()
    note: str = ""


SCENARIOS: list[Scenario] = [
    Scenario("step/sample-loop", lambda: _sampling_loop([(F32, BF16), (BF16, BF16)]), quick=True,
             min_access_bytes=step_vector_rule, streamed=STEP_STREAMED,
             note="TritonSteps at 16x3x64x64: fp32 state + bf16 network, bf16"),
    Scenario("step/sample-loop-dtypes", lambda: _sampling_loop([(F32, F32), (F16, F16), (F64, F32)]),
             min_access_bytes=step_vector_rule, streamed=STEP_STREAMED, note="fp32, fp16, fp64 state"),
    Scenario("step/public", lambda: _public_steps([F32], [(16, 3, 64, 64)]), quick=True,
             min_access_bytes=step_vector_rule, streamed=STEP_STREAMED, note="the bench's public launchers, fp32 B16"),
    Scenario("step/public-dtypes", lambda: _public_steps([BF16, F16], [(16, 3, 64, 64), (1 << 27,)]),
             min_access_bytes=step_vector_rule, streamed=STEP_STREAMED, note="bf16/fp16 at B16 and at 2^27 elements"),
    Scenario("attention/bench-short", lambda: _attention(ATTENTION_SHAPES[:2], [BF16]), quick=True,
             note="L=64 (one tile) and L=256, bf16, forward and backward"),
    Scenario("attention/bench", lambda: _attention(ATTENTION_SHAPES, [BF16, F16]),
             note="every bench shape, bf16 and fp16"),
    Scenario("attention/fp32", lambda: _attention([(2, 3, 64, 64), (2, 3, 256, 64), (2, 3, 256, 128)], [F32]),
             note="fp32 storage (the GPU tests' dtype)"),
    Scenario("groupnorm/levels", lambda: _groupnorm([(16, 128, 64, 64), (16, 512, 8, 8)]), quick=True,
             note="the U-Net's first and last level, bf16, with and without scale-shift"),
]


# --------------------------------------------------------------------------------------
# Facts read from a compiled binary, and the rules
# --------------------------------------------------------------------------------------

_REG = re.compile(r"%\w+")
_PARAM = re.compile(r"_param_(\d+)\b")
_ADDR = re.compile(r"\[\s*(%\w+)")


def _instructions(ptx: str):
    """(opcode, operand text) of each PTX instruction, predicate guard removed."""
    for line in ptx.splitlines():
        line = line.split("//")[0].strip().rstrip(";")
        if not line or line.startswith((".", "}", "{", "$")) or line.endswith(":"):
            continue
        if line.startswith("@"):
            line = line.split(None, 1)[1] if " " in line else ""
        op, _, rest = line.partition(" ")
        yield op, rest.strip()


def _origins(ptx: str) -> dict:
    """For each register, the kernel parameters (by PTX index) whose value flows into it.

    A small forward data-flow over the PTX: ld.param gives a register its parameter; any other
    instruction gives its destination the union of its sources' origins; a value loaded from
    global memory starts with none (it is data, not an address). Repeated until stable, as loops
    reassign registers.
    """
    origin: dict[str, frozenset] = {}
    instrs = list(_instructions(ptx))
    for _ in range(8):
        changed = False
        for op, rest in instrs:
            if op.startswith(("st.", "cp.", "red.", "bar", "ret", "bra", "membar", "fence")) or not rest:
                continue
            dest_part, _, src_part = rest.partition(",")
            dests = _REG.findall(dest_part)
            if op.startswith("ld.param"):
                new = frozenset(int(i) for i in _PARAM.findall(src_part))
            elif op.startswith(("ld.", "atom.")):
                new = frozenset()
            else:
                new = frozenset().union(*(origin.get(r, frozenset()) for r in _REG.findall(src_part)))
            for d in dests:
                merged = origin.get(d, frozenset()) | new
                if merged != origin.get(d):
                    origin[d] = merged
                    changed = True
        if not changed:
            break
    return origin


def access_widths(ptx: str, params: list[str | None]) -> dict:
    """Byte widths of the global accesses through each pointer argument, read from the PTX:
    {argument: {"load": {bytes: count}, "store": {bytes: count}}}.

    `params` names the PTX parameters in order (a compiled kernel's non-constexpr arguments;
    None for the non-pointers).
    An access is attributed to the arguments its address derives from; ld/st.global and
    cp.async (global to shared) count. Accesses whose address comes from no parameter, such as
    libdevice's constant tables for sin/cos, are left out.
    """
    origin = _origins(ptx)
    out: dict = {}
    for op, rest in _instructions(ptx):
        if op.startswith(("ld.global", "st.global")):
            parts = op.split(".")
            vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
            bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfus]\d+", p)), 0)
            width, kind = vec * bits // 8, "load" if op.startswith("ld") else "store"
        elif op.startswith("cp.async.") and ".shared.global" in op:
            m = re.search(r"\]\s*,\s*\[[^]]*\]\s*,\s*(\w+)", rest)
            if not m:
                continue
            width, kind = int(m.group(1), 0), "load"
            rest = rest.split("]", 1)[1]  # the global address is the second operand
        else:
            continue
        addr = _ADDR.search(rest)
        for i in sorted(origin.get(addr.group(1), frozenset()) if addr else ()):
            if i >= len(params) or not params[i]:
                continue  # an integer argument in the address arithmetic (an index, a stride)
            name = params[i]
            hist = out.setdefault(name, {"load": {}, "store": {}})[kind]
            hist[width] = hist.get(width, 0) + 1
    return out


def _ptxas(ptx: str) -> dict:
    """Registers, spill bytes and stack frame from the wheel's ptxas -v, as Triton invokes it."""
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(exe):
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        log = subprocess.run([exe, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", log)
    spill_st = re.search(r"(\d+) bytes spill stores", log)
    spill_ld = re.search(r"(\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": (int(spill_st.group(1)) if spill_st else 0) + (int(spill_ld.group(1)) if spill_ld else 0),
            "stack_bytes": int(stack.group(1)) if stack else None}


def facts(launch: Launch, sc: "Scenario") -> dict:
    """The report row of one distinct binary."""
    row = {"scenario": launch.scenario, "kernel": launch.kernel, "launch": _launch_summary(launch.args)}
    if launch.error:
        row["error"] = launch.error
        row["problems"] = [f"does not build: {launch.error}"]
        return row
    k = launch.kernel_obj
    md = k.metadata
    ptx = k.asm["ptx"]
    # PTX parameters are the non-constexpr arguments in order; only pointers name an access
    params = [name if str(ty).startswith("*") else None for name, ty in k.src.signature.items() if ty != "constexpr"]
    row.update(hash=k.hash, num_warps=md.num_warps, num_stages=md.num_stages, shared_bytes=md.shared,
               **_ptxas(ptx), accesses=access_widths(ptx, params))
    row["do_not_specialize"] = [str(a) for a in getattr(launch.jit, "do_not_specialize", None) or []]
    need = sc.min_access_bytes(launch.args) if sc.min_access_bytes else None
    row["vector_rule"] = {"bytes": need, "arguments": list(sc.streamed)} if need else None
    row["problems"] = problems(row)
    return row


def problems(row: dict) -> list[str]:
    """The rules: no spills, shared memory within an H100's, and the scenario's vector-width rule
    on the streamed arguments that the kernel accesses."""
    out = []
    if row.get("spill_bytes"):
        out.append(f"spills {row['spill_bytes']} bytes")
    if row.get("shared_bytes", 0) > H100_MAX_SHARED:
        out.append(f"needs {row['shared_bytes']} bytes of shared memory, an H100 block has {H100_MAX_SHARED}")
    rule = row.get("vector_rule")
    if rule:
        seen = False
        for arg in rule["arguments"]:
            for kind, widths in row["accesses"].get(arg, {}).items():
                if widths:
                    seen = True
                    if min(widths) < rule["bytes"]:
                        out.append(f"{arg}: {kind}s of {min(widths)} bytes ({_hist(widths)}); "
                                   f"{rule['bytes']} needed")
        if not seen:
            out.append(f"none of {', '.join(rule['arguments'])} is loaded or stored in the PTX")
    return out


def _hist(widths: dict) -> str:
    return " ".join(f"{w}Bx{n}" for w, n in sorted(widths.items()))


def _access_summary(acc: dict, kind: str) -> str:
    return "; ".join(f"{arg} {_hist(h[kind])}" for arg, h in acc.items() if h[kind]) or "-"


def _launch_summary(args: dict) -> str:
    parts = []
    for k, v in args.items():
        if isinstance(v, str) and "[" in v:
            continue  # tensors: the first one is enough to name the shape
        parts.append(f"{k}={v}")
    first = next((f"{k}: {v}" for k, v in args.items() if isinstance(v, str) and "[" in v), "")
    return f"{first}; " + ", ".join(parts)


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def collect(scenarios, *, rank: int = 0, jobs: int = 1, with_facts: bool = True, list_only: bool = False) -> list[dict]:
    """Run the scenarios; compile this rank's share of the distinct specialisations; one row each.

    list_only: compile nothing, one row per distinct specialisation key."""
    if list_only:
        keep = lambda key: False  # noqa: E731
    else:
        keep = None if jobs == 1 else (lambda key: zlib.crc32(key.encode()) % jobs == rank)
    rows, seen = [], set()
    for sc in scenarios:
        launches: list[Launch] = []
        t0 = time.monotonic()
        try:
            with fake_mode(), recording(sc.name, launches, keep):
                sc.run()
        except Exception as e:  # noqa: BLE001 - a scenario that cannot run is reported, not fatal
            rows.append({"scenario": sc.name, "kernel": "-", "launch": "-", "problems":
                         [f"scenario failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"]})
            continue
        if not launches and rank == 0:
            rows.append({"scenario": sc.name, "kernel": "-", "launch": "-",
                         "problems": ["no Triton launch recorded: the scenario no longer reaches a kernel"]})
        for la in launches:
            if list_only:
                if la.key not in seen:
                    seen.add(la.key)
                    rows.append({"scenario": sc.name, "kernel": la.kernel, "launch": _launch_summary(la.args),
                                 "key": la.key, "problems": [la.error] if la.error else []})
                continue
            if la.kernel_obj is None and la.error is None:
                continue  # another rank compiles it
            ident = la.kernel_obj.hash if la.kernel_obj is not None else (la.kernel, la.error)
            if ident in seen:
                continue
            seen.add(ident)
            if with_facts:
                row = facts(la, sc)
            else:
                row = {"scenario": sc.name, "kernel": la.kernel, "problems": [la.error] if la.error else []}
            rows.append(row)
        if rank == 0:
            print(f"# {sc.name}: {len(launches)} launches recorded in {time.monotonic() - t0:.1f} s", file=sys.stderr,
                  flush=True)
    return rows


def _worker(payload):
    rank, jobs, names, with_facts, sm90 = payload
    if sm90:
        driver.set_active(_Sm90Driver())
    chosen = [s for s in SCENARIOS if s.name in names]
    return collect(chosen, rank=rank, jobs=jobs, with_facts=with_facts)


def run(scenarios, jobs: int, with_facts: bool, list_only: bool = False, sm90: bool = True) -> list[dict]:
    names = [s.name for s in scenarios]
    if jobs <= 1 or list_only:
        rows = collect(scenarios, with_facts=with_facts, list_only=list_only)
    else:
        import multiprocessing as mp

        # Without CUDA, fork (the workers inherit the imports); with CUDA, spawn, as a forked
        # process cannot use CUDA once its parent has touched it.
        ctx = mp.get_context("spawn" if torch.cuda.is_available() else "fork")
        with ctx.Pool(jobs) as pool:
            parts = pool.map(_worker, [(r, jobs, names, with_facts, sm90) for r in range(jobs)])
        rows = [r for part in parts for r in part]
    # one row per binary, first scenario wins (several scenarios can launch the same binary)
    out, seen = [], set()
    for r in rows:
        ident = r.get("hash") or r.get("key") or (r["scenario"], r["kernel"], r["launch"])
        if ident not in seen:
            seen.add(ident)
            out.append(r)
    return out


def kernel_functions() -> dict[str, str]:
    """Every top-level Triton kernel of the package ({name: module}): the module-level
    @triton.jit functions whose names end in `_kernel` (helpers such as `_tile` are inlined)."""
    import importlib
    import pkgutil

    import kernels

    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name == "_build_check":
            continue
        path = os.path.join(kernels.__path__[0], info.name + ".py")
        if not os.path.exists(path) or "triton.jit" not in open(path).read():
            continue  # import only the Triton modules (not, e.g., a C++ extension's builder)
        mod = importlib.import_module(f"kernels.{info.name}")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "arg_names"):
                found[name] = mod.__name__
    return found


def unreached(rows: list[dict]) -> list[dict]:
    """A problem row for each kernel of the package that no scenario launched."""
    launched = {r["kernel"] for r in rows}
    return [{"scenario": "-", "kernel": name, "launch": "-",
             "problems": [f"{module}.{name} is launched by no scenario: add one to SCENARIOS (see its docstring)"]}
            for name, module in sorted(kernel_functions().items()) if name not in launched]


def format_rows(rows: list[dict]) -> str:
    lines = ["| scenario | kernel | warps/stages | registers | spills | shared B | loads (bytes x count) "
             "| stores | launch | problems |", "|---|---|---|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        acc = r.get("accesses", {})
        lines.append(
            f"| {r['scenario']} | {r['kernel']} | {r.get('num_warps', '-')}/{r.get('num_stages', '-')} "
            f"| {r.get('registers', '-')} | {r.get('spill_bytes', '-')} | {r.get('shared_bytes', '-')} "
            f"| {_access_summary(acc, 'load')} | {_access_summary(acc, 'store')} | {r.get('launch', '-')} "
            f"| {'; '.join(r['problems']) or 'ok'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels._build_check", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the scenarios marked quick (the CI test)")
    p.add_argument("--scenario", action="append", default=[], help="run only this scenario (repeatable)")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    p.add_argument("--warm", action="store_true",
                   help="on a CUDA machine: compile every configuration for this GPU into Triton's cache, no report")
    p.add_argument("--list", action="store_true", help="record the launches and list their specialisations; compile "
                                                       "nothing")
    args = p.parse_args(argv)
    if args.jobs < 1:
        print(f"kernels._build_check: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    known = {s.name for s in SCENARIOS}
    unknown = [n for n in args.scenario if n not in known]
    if unknown:
        print(f"kernels._build_check: unknown scenario {unknown[0]!r}; known: {', '.join(sorted(known))}",
              file=sys.stderr)
        return 2
    chosen = [s for s in SCENARIOS if (not args.quick or s.quick) and (not args.scenario or s.name in args.scenario)]
    if INTERPRETED:
        print("kernels._build_check: set TRITON_INTERPRET=0 before running it (it builds for the GPU; without CUDA "
              "the kernels package defaults to the interpreter)", file=sys.stderr)
        return 2
    if args.warm:
        if not torch.cuda.is_available():
            print("kernels._build_check: --warm compiles for this machine's GPU, and there is none", file=sys.stderr)
            return 2
    else:
        driver.set_active(_Sm90Driver())  # compile for sm_90 whatever this machine has
    t0 = time.monotonic()
    rows = run(chosen, args.jobs, with_facts=not args.warm, list_only=args.list, sm90=not args.warm)
    if not args.scenario:
        rows += unreached(rows)
    bad = [r for r in rows if r["problems"]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": "sm_90", "triton": triton.__version__, "torch": torch.__version__,
                       "seconds": round(time.monotonic() - t0, 1), "rows": rows}, f, indent=1)
    if args.list:
        for r in rows:
            print(f"{r['scenario']} {r['kernel']}: {r['launch']}")
    elif not args.warm:
        print(format_rows(rows))
    print(f"# {len(rows)} distinct binaries from {len(chosen)} scenarios in {time.monotonic() - t0:.0f} s; "
          f"{len(bad)} with problems", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
