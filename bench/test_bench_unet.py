"""ADM U-Net throughput (images/s) per execution path: the training step and the sampling forward.

Paths (wgfcore.nets.UNet):
  math       set_attention_backend("math"), torch norms (the reference)
  sdpa       set_kernels("torch"): nn.GroupNorm + SiLU, SDPA attention (the eager PyTorch path)
  triton     torch norms, Triton attention only (set_attention_backend("triton"))
  fused      set_kernels("fused"): Triton attention + fused GroupNorm/scale-shift/SiLU, token qkv
  sdpa-cl    set_kernels("torch", channels_last=True)
  fused-cl   set_kernels("fused", channels_last=True)
  compile-sdpa, compile-fused   torch.compile (inductor) of the sdpa / fused network

Rows:
  fwd+bwd  adm64, batch 32, bf16 autocast: one training step's network work (loss.backward,
           optimizer excluded), as issue 12 targets (>= 1.3x the eager sdpa path).
  fwd      adm64, batch 16 and 64, bf16 autocast, eval, no grad: the pass sampling runs 40 times
           per Predict-Project batch (N = 20, two networks).
The compile rows compile in their warm-up rounds (minutes for adm64); `-k "not compile"` skips them.
CPU rows: the tiny preset at 16 x 16 in fp32 for the torch paths, so the suite still runs without
a GPU; Triton rows skip there (interpreter), and so do compile rows (they would time inductor's
CPU code, which says nothing about the GPU path).
"""
import pytest
import torch

import kernels  # noqa: F401  (decides TRITON_INTERPRET before any @triton.jit is defined)
from wgfcore.nets import UNet

ON_GPU = torch.cuda.is_available() and not kernels.INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETER_SKIP = "Triton interpreter is a correctness mode, not a performance path"

PATHS = ["math", "sdpa", "triton", "fused", "sdpa-cl", "fused-cl", "compile-sdpa", "compile-fused"]
TRITON_PATHS = {"triton", "fused", "fused-cl", "compile-fused"}
# (mode, preset, batch)
GPU_ROWS = [("fwd+bwd", "adm64", 32), ("fwd", "adm64", 16), ("fwd", "adm64", 64)]
CPU_ROWS = [("fwd+bwd", "tiny", 8), ("fwd", "tiny", 8)]


def build(preset: str, path: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = UNet.from_preset(preset).to(DEVICE)
    base = path.removeprefix("compile-")
    if base == "math":
        net.set_attention_backend("math")
    elif base == "triton":
        net.set_attention_backend("triton")
    else:
        net.set_kernels("fused" if base.startswith("fused") else "torch", channels_last=base.endswith("-cl"))
    return torch.compile(net) if path.startswith("compile-") else net


def _params():
    for mode, preset, batch in GPU_ROWS:
        for path in PATHS:
            marks = [] if ON_GPU else [pytest.mark.skip(
                reason=INTERPRETER_SKIP if path in TRITON_PATHS else "CUDA-only row: adm64 is minutes per step on CPU")]
            yield pytest.param(mode, preset, batch, path, marks=marks, id=f"{mode}-{preset}-b{batch}-{path}")
    for mode, preset, batch in CPU_ROWS:
        for path in PATHS:
            marks = []
            if ON_GPU:
                marks.append(pytest.mark.skip(reason="CPU-only row"))
            elif path in TRITON_PATHS:
                marks.append(pytest.mark.skip(reason=INTERPRETER_SKIP))
            elif path.startswith("compile-"):
                marks.append(pytest.mark.skip(reason="GPU-only row: on CPU it would time inductor's CPU code, not the GPU path"))
            yield pytest.param(mode, preset, batch, path, marks=marks, id=f"{mode}-{preset}-b{batch}-{path}-cpu")


@pytest.mark.parametrize("mode,preset,batch,path", list(_params()))
def test_bench_unet(benchmark, record_rates, mode, preset, batch, path):
    net = build(preset, path)
    inner = getattr(net, "_orig_mod", net)
    res, ch = inner.img_resolution, inner.in_channels
    x = torch.randn(batch, ch, res, res, device=DEVICE)
    t = torch.rand(batch, device=DEVICE)
    target = torch.randn_like(x)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=ON_GPU)

    if mode == "fwd+bwd":
        net.train()

        def step():
            with autocast:
                loss = (net(x, t).float() - target).square().mean()
            loss.backward()
            net.zero_grad(set_to_none=True)
    else:
        net.eval()

        def step():
            with torch.no_grad(), autocast:
                net(x, t)

    def run():
        step()
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10 if ON_GPU else 3, warmup_rounds=3 if ON_GPU else 1, iterations=1)
    record_rates(benchmark, items=batch, item_name="images", preset=preset, path=path, mode=mode,
                 batch=batch, params=inner.num_parameters(), precision="bf16-autocast" if ON_GPU else "fp32")
