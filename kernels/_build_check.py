"""Compile kernels for a GPU target without a GPU: `TRITON_INTERPRET=0 python -m kernels._build_check`.

The Triton interpreter runs the kernels' arithmetic on CPU but not the compiler's front end,
layouts or register allocation; this builds each kernel at the launch configurations the
launchers use on a GPU (kernels.attention._config's table, kernels.groupnorm._blocks, the
sampler-step kernels' variants as TritonSteps and the public launchers use them) for an
sm_90 (H100) target, and prints ptxas's register and spill counts. TRITON_INTERPRET=0 must be
set before `kernels` is imported (without CUDA it otherwise defaults to 1), so this runs in its
own process (tests/test_attention.py calls it that way). Needs only the Triton wheel (its
bundled ptxas), no CUDA device.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import INTERPRETED
from . import attention as A
from . import groupnorm as G
from . import sampler_step as S

if INTERPRETED:
    sys.exit("kernels._build_check: set TRITON_INTERPRET=0 before running it (it builds for the GPU)")
TARGET = GPUTarget("cuda", 90, 32)
_TY = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
LAUNCH = ("num_warps", "num_stages")


def build(fn, pointers: dict, floats: tuple, cfg: dict) -> str:
    """Compile `fn` with pointer types `pointers`, fp32 scalars `floats`, other args i32."""
    consts = {k: v for k, v in cfg.items() if k not in LAUNCH}
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in consts else pointers.get(name, "fp32" if name in floats else "i32")
    opts = {k: cfg[k] for k in LAUNCH if k in cfg}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET, options=opts)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return "built (no ptxas to count registers)"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    try:
        out = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return f"{regs.group(1) if regs else '?'} registers, {spill.group(1) if spill else '?'} bytes spilled"


def attention_cases(quick: bool):
    """(L, D, dtype) at the bench shapes and the U-Net's, in every storage dtype; `quick`:
    bf16 at L = 64 and 256 (the one-tile and the two-kernel backward paths) only."""
    if quick:
        yield from ((64, 64, torch.bfloat16), (256, 64, torch.bfloat16))
        return
    for L, D in ((64, 64), (256, 64), (1024, 64), (4096, 64), (4096, 128), (64, 32), (256, 128)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            yield L, D, dtype


def main(argv) -> int:
    quick = "--quick" in argv
    seen = set()
    for L, D, dtype in attention_cases(quick):
        t = _TY[dtype]
        fwd = A._config("fwd", L, D, dtype)
        jobs = [("fwd", A._fwd_kernel, dict(Q=t, K=t, V=t, O=t, LSE2="*fp32"), ("qk_scale_log2",), fwd)]
        common = dict(Q=t, K=t, V=t, O=t, DO=t, DQ=t, DK=t, DV=t, LSE2="*fp32", DELTA="*fp32")
        if A._one_block_backward(L, D, dtype):
            jobs.append(("bwd1", A._bwd_one_block_kernel, common, ("scale", "qk_scale_log2"), A._config("bwd1", L, D, dtype)))
        else:
            bwd = A._config("bwd", L, D, dtype)
            jobs.append(("dq", A._bwd_dq_kernel, common, ("scale", "qk_scale_log2"), bwd))
            jobs.append(("dkdv", A._bwd_dkdv_kernel, common, ("scale", "qk_scale_log2"), bwd))
        for name, fn, ptrs, floats, cfg in jobs:
            key = (name, t, tuple(sorted(cfg.items())), D)
            if key in seen:
                continue
            seen.add(key)
            cfg = dict(cfg, D=D, PRECISION=A._precision(dtype))
            print(f"attention {name} L={L} D={D} {t[1:]} {cfg}: {build(fn, ptrs, floats, cfg)}", flush=True)
    # GroupNorm at the adm64 U-Net's group shapes: (groups, channels per group, positions).
    gn_shapes = ((32, 4, 4096), (32, 8, 1024), (32, 12, 256), (32, 16, 64), (32, 1, 64))
    for groups, cg, p in gn_shapes[::4] if quick else gn_shapes:
        for has_ss, act in ((True, True),) if quick else ((True, True), (False, True), (False, False)):
            blocks = G._blocks(groups, cg, p)
            t = "*bf16"
            cfg = dict(blocks, CG=cg, HAS_SS=has_ss, ACT=act)
            f_ptrs = dict(X=t, Y=t, W="*fp32", Bias="*fp32", SCALE=t, SHIFT=t, MEAN="*fp32", RSTD="*fp32")
            b_ptrs = dict(f_ptrs, DY=t, DX=t, DW="*fp32", DB="*fp32", DSCALE="*fp32", DSHIFT="*fp32")
            print(f"groupnorm fwd G={groups} CG={cg} P={p} {cfg}: {build(G._gn_fwd_kernel, f_ptrs, ('eps',), cfg)}", flush=True)
            print(f"groupnorm bwd G={groups} CG={cg} P={p} {cfg}: {build(G._gn_bwd_kernel, b_ptrs, (), cfg)}", flush=True)
    for name, fn, ptrs, floats, cfg in step_jobs(quick):
        print(f"step {name} {cfg}: {build(fn, ptrs, floats, cfg)}", flush=True)
    return 0


def step_jobs(quick: bool):
    """The sampler-step kernels: the sampling loop's table kernel at (state dtype, network-output
    dtype, NT, CHECK, NOISE) as TritonSteps launches it, and the public kernel with 0-d tensor
    coefficients and Philox noise, and with per-sample coefficients and an explicit z."""
    v = lambda c: c.value  # noqa: E731 - the kernels' named modes are tl.constexpr objects
    cases = [("fp32", "bf16", 2, 1, v(S.NOISE_PHILOX)), ("bf16", "bf16", 4, 3, v(S.NOISE_NONE)),
             ("fp64", "fp32", 2, 1, v(S.NOISE_NONE))]
    for dt, sdt, nt, check, noise in cases[:1] if quick else cases:
        ptrs = dict(out_ptr=f"*{dt}", t0=f"*{dt}", t1=f"*{sdt}", t2=f"*{dt}", t3=f"*{sdt}", coef_ptr="*fp32",
                    seed_ptr="*i64", flag_ptr="*i64")
        yield "table", S._table_kernel, ptrs, (), dict(NT=nt, NOISE=noise, R=S.NOISE_R, GROUPS=1, CHECK=check, num_warps=8)
    for noise, mode, per_sample in [(v(S.NOISE_PHILOX), v(S.COEF_SCALAR_PTR), False),
                                    (v(S.NOISE_EXPLICIT), v(S.COEF_SAMPLE_PTR), True)]:
        ptrs = dict(out_ptr="*bf16", t0="*bf16", t1="*bf16", t2="*bf16", t3="*bf16", z_ptr="*bf16",
                    **({k: "*fp32" for k in ("c0", "c1", "cz")}))
        yield "affine", S._affine_kernel, ptrs, ("c2", "c3"), dict(
            NT=2, NOISE=noise, M0=mode, M1=mode, M2=0, M3=0, MZ=mode, PER_SAMPLE=per_sample, R=S.NOISE_R,
            GROUPS=1, num_warps=8)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
