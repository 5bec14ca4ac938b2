"""Empirical optimal denoiser D* (ALGORITHMS §5): streamed online softmax vs the full softmax (TFLOP/s, GB/s).

This is the bench that decides whether a fused Triton mean-shift kernel (flash-attention style) is worth
writing: such a kernel only removes the (B, chunk) logits round trip and the extra passes of the torch
version, so it pays only if the streamed torch version is far from the matmul rate. One call is two
matmuls, 4 B M D flops; its minimum traffic is the dataset read once (M D) plus x and D* (2 B D).
"streamed" is `optimal_denoiser` (compute in fp32 or fp64), "full" materialises all B x M weights.
"""
import pytest
import torch

import kernels  # noqa: F401  (decides TRITON_INTERPRET before anything else, as bench/conftest does)
from wgfcore.denoisers import optimal_denoiser

ON_GPU = torch.cuda.is_available() and not kernels.INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"

# (name, B, M, feature shape): digits as in train/chen_optimal.py; 16x16 RGB; the 50K x 64x64 target.
SIZES = [("digits", 16, 1797, (8, 8)), ("rgb16", 16, 4096, (3, 16, 16)), ("rgb64-50k", 64, 50_000, (3, 64, 64))]
IMPLS = ["streamed-fp32", "streamed-fp64", "full-fp32"]


def full_softmax(x, sigma, data):
    """The obvious implementation: all B x M logits at once (memory O(B M))."""
    X, Y = x.flatten(1), data.flatten(1)
    logits = (X @ Y.T - 0.5 * (Y * Y).sum(1)) / sigma ** 2
    return (torch.softmax(logits, dim=1) @ Y).reshape(x.shape)


def _params():
    for name, B, M, feat in SIZES:
        for impl in IMPLS:
            marks = []
            if not ON_GPU and M > 5000:
                marks.append(pytest.mark.skip(reason="50K x 12288 on CPU takes minutes per call; GPU row"))
            yield pytest.param(impl, B, M, feat, marks=marks, id=f"{impl}-{name}")


@pytest.mark.parametrize("impl,B,M,feat", list(_params()))
def test_bench_optimal_denoiser(benchmark, record_rates, impl, B, M, feat):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    data = torch.rand(M, *feat, generator=g, device=DEVICE) * 2 - 1
    x = data[:B] + 0.3 * torch.randn(B, *feat, generator=g, device=DEVICE)
    sigma = 0.5
    if impl == "full-fp32":
        fn = lambda: full_softmax(x, sigma, data)  # noqa: E731
    else:
        dt = torch.float32 if impl.endswith("fp32") else torch.float64
        fn = lambda: optimal_denoiser(x, sigma, data, compute_dtype=dt)  # noqa: E731
    out = fn()
    ref = optimal_denoiser(x, sigma, data, compute_dtype=torch.float64)
    assert (out - ref).abs().max() < 1e-3  # the rows being timed compute the right thing

    def run():
        fn()
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=5 if ON_GPU else 3, warmup_rounds=1, iterations=1)
    D = data[0].numel()
    record_rates(benchmark, calls=1, nbytes=4 * (M * D + 2 * B * D), flops=4.0 * B * M * D, impl=impl, B=B, M=M,
                 D=D)
