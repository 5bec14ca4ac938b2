"""ADM U-Net forward+backward throughput (images/s) with each attention backend.

GPU rows: the adm64 preset at batch 32 under bf16 autocast (one training step's network
work, optimizer excluded). CPU rows: the tiny preset at 16 x 16 in fp32, so the suite
still runs without a GPU; the Triton row skips there (interpreter).
"""
import pytest
import torch

import kernels  # noqa: F401  (decides TRITON_INTERPRET before any @triton.jit is defined)
from wgfcore.nets import UNet

ON_GPU = torch.cuda.is_available() and not kernels.INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETER_SKIP = "Triton interpreter is a correctness mode, not a performance path"

# (preset, batch, overrides)
GPU_ROWS = [("adm64", 32, {})]
CPU_ROWS = [("tiny", 8, {})]


def _params():
    for preset, batch, over in GPU_ROWS:
        for backend in ("math", "sdpa", "triton"):
            marks = [] if ON_GPU else [pytest.mark.skip(
                reason=INTERPRETER_SKIP if backend == "triton" else "CUDA-only row: adm64 fwd+bwd is minutes on CPU")]
            yield pytest.param(preset, batch, over, backend, marks=marks, id=f"{preset}-b{batch}-{backend}")
    for preset, batch, over in CPU_ROWS:
        for backend in ("math", "sdpa", "triton"):
            marks = []
            if ON_GPU:
                marks.append(pytest.mark.skip(reason="CPU-only row"))
            elif backend == "triton":
                marks.append(pytest.mark.skip(reason=INTERPRETER_SKIP))
            yield pytest.param(preset, batch, over, backend, marks=marks, id=f"{preset}-b{batch}-{backend}-cpu")


@pytest.mark.parametrize("preset,batch,over,backend", list(_params()))
def test_bench_unet_fwd_bwd(benchmark, record_rates, preset, batch, over, backend):
    torch.manual_seed(0)
    net = UNet.from_preset(preset, attn_backend=backend, **over).to(DEVICE).train()
    res, ch = net.img_resolution, net.in_channels
    x = torch.randn(batch, ch, res, res, device=DEVICE)
    t = torch.rand(batch, device=DEVICE)
    target = torch.randn_like(x)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ON_GPU):
            loss = (net(x, t).float() - target).square().mean()
        loss.backward()
        net.zero_grad(set_to_none=True)

    def run():
        step()
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10 if ON_GPU else 3, warmup_rounds=2 if ON_GPU else 1, iterations=1)
    record_rates(benchmark, items=batch, item_name="images", preset=preset, backend=backend,
                 batch=batch, params=net.num_parameters(), precision="bf16-autocast" if ON_GPU else "fp32")
