"""Fused attention (kernels/attention.py) against PyTorch SDPA, per shape, dtype and backend (TFLOP/s).

Shapes (issue 12): the adm64 U-Net at batch 32 -- 8 heads at 8 x 8 (L = 64), 6 at 16 x 16
(L = 256), 4 at 32 x 32 (L = 1024), head dim 64 -- and long sequences, B=4, H=16, L=4096,
D in {64, 128}. Backends: the Triton kernel; SDPA as torch picks it ("sdpa") and each SDPA
backend forced ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"), so "the best SDPA
backend" is read from the rows; the plain math path at L <= 1024. Flops: 4 B H L^2 D for the
forward (two matmuls), and 2.5 times that for the backward (five matmuls), so a fwd+bwd row
counts 3.5 x.

Tuning rows ("triton-g2", "triton-g4"): the Triton kernel at L <= 256 with 2 or 4 (batch, head)
pairs per program (kernels.attention.override_config), the lever whose effect is not yet
measured. `-k "triton-g"` runs just those.

Backward rows ("triton-bwd5", fwd+bwd only, L above the one-tile backward's 64): the atomic
backward (FA-2's 5 matmuls, dQ added atomically; kernels.attention.use_backward("atomic")) against
the default two-pass one (7 matmuls, no atomics) in the "triton" rows of the same run: the
measurement that decides kernels.attention's default. Both rows count the same 3.5 x flops.

On CPU the Triton and CUDA-only rows skip with a reason; small torch rows still run.
"""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels  # noqa: F401  (decides TRITON_INTERPRET before any @triton.jit is defined)

ON_GPU = torch.cuda.is_available() and not kernels.INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETER_SKIP = "Triton interpreter is a correctness mode, not a performance path"

# (name, B, H, L, D)
GPU_SHAPES = [
    ("L64", 32, 8, 64, 64), ("L256", 32, 6, 256, 64), ("L1024", 32, 4, 1024, 64),
    ("L4096-D64", 4, 16, 4096, 64), ("L4096-D128", 4, 16, 4096, 128),
]
CPU_SHAPES = [("cpu-L64", 2, 2, 64, 64)]
IMPLS = ["triton", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "math"]
GROUPED = {"triton-g2": 2, "triton-g4": 4}
BACKWARD_ROWS = {"triton-bwd5": "atomic"}  # impl -> kernels.attention backward kind (fwd+bwd rows)
SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}


def math_attention(q, k, v):
    w = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


def attention_fn(impl):
    if impl == "triton" or impl in GROUPED or impl in BACKWARD_ROWS:
        from kernels.attention import attention

        return attention
    if impl == "math":
        return math_attention
    if impl == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v):
        with sdpa_kernel(SDPA_BACKENDS[impl]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return sdpa


def _params():
    for mode in ("fwd", "fwd+bwd"):
        for name, B, H, L, D in GPU_SHAPES:
            for dtype in (torch.bfloat16, torch.float16):
                impls = IMPLS + (list(GROUPED) if L <= 256 else [])
                impls += list(BACKWARD_ROWS) if mode == "fwd+bwd" and L > 64 else []
                for impl in impls:
                    marks = []
                    if not ON_GPU:
                        triton_row = impl == "triton" or impl in GROUPED or impl in BACKWARD_ROWS
                        marks.append(pytest.mark.skip(reason=INTERPRETER_SKIP if triton_row else "CUDA-only row (GPU shapes)"))
                    elif L > 1024 and impl in ("math", "sdpa-math"):
                        marks.append(pytest.mark.skip(reason="L x L scores at L=4096: the math paths are not contenders"))
                    tag = str(dtype).removeprefix("torch.")
                    yield pytest.param(mode, impl, B, H, L, D, dtype, marks=marks, id=f"{mode}-{impl}-{name}-{tag}")
        for name, B, H, L, D in CPU_SHAPES:
            for impl in ("math", "sdpa-math"):
                marks = [] if not ON_GPU else [pytest.mark.skip(reason="CPU-only row")]
                yield pytest.param(mode, impl, B, H, L, D, torch.float32, marks=marks, id=f"{mode}-{impl}-{name}-float32")


def _grouped(impl, L, D, dtype):
    """Context that forces GROUP for the tuning rows, or the backward kind for the backward rows
    (a no-op context otherwise)."""
    import contextlib

    if impl in BACKWARD_ROWS:
        from kernels.attention import use_backward

        return use_backward(BACKWARD_ROWS[impl])
    if impl not in GROUPED:
        return contextlib.nullcontext()
    from kernels.attention import _one_block_backward, override_config

    stack = contextlib.ExitStack()
    stack.enter_context(override_config("fwd", L, D, dtype, GROUP=GROUPED[impl]))
    bwd = "bwd1" if _one_block_backward(L, D, dtype) else "bwd"
    stack.enter_context(override_config(bwd, L, D, dtype, GROUP=GROUPED[impl]))
    return stack


@pytest.mark.parametrize("mode,impl,B,H,L,D,dtype", list(_params()))
def test_bench_attention(benchmark, record_rates, mode, impl, B, H, L, D, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v, do = (torch.randn(B, H, L, D, generator=g, device=DEVICE, dtype=dtype) for _ in range(4))
    fn = attention_fn(impl)

    with _grouped(impl, L, D, dtype):
        # The row being timed must compute attention: compare with the fp32 math path.
        with torch.no_grad():
            try:
                out = fn(q, k, v)
            except RuntimeError as e:  # e.g. a forced SDPA backend that cannot run this shape
                pytest.skip(f"{impl} cannot run this shape here: {str(e).splitlines()[0][:120]}")
            ref = math_attention(q.float(), k.float(), v.float())
            err = (out.float() - ref).abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 3e-2), f"{impl} disagrees with math: {err}"

        if mode == "fwd":
            def step():
                with torch.no_grad():
                    fn(q, k, v)
        else:
            for x in (q, k, v):
                x.requires_grad_()

            def step():
                o = fn(q, k, v)
                torch.autograd.grad(o, (q, k, v), do)

        def run():
            step()
            if ON_GPU:
                torch.cuda.synchronize()

        benchmark.pedantic(run, rounds=20 if ON_GPU else 3, warmup_rounds=2 if ON_GPU else 1, iterations=1)
    flops = 4.0 * B * H * L * L * D * (1.0 if mode == "fwd" else 3.5)
    record_rates(benchmark, flops=flops, impl=impl, mode=mode, shape=[B, H, L, D],
                 dtype=str(dtype).removeprefix("torch."))
