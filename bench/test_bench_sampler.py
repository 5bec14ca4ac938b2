"""End to end: images/s of Predict-Project at N = 20 (NFE = 40), fused steps vs unfused.

backend="triton" runs every predict/project update as one kernel with in-kernel noise;
backend="torch" is wgfcore.ops with torch.randn. The networks are fixed small conv nets
(random weights, seeded) standing in for s and T, so the figure isolates what the step
kernels change: the share of a sampling run spent outside the networks.
"""
import pytest
import torch
from torch import nn

import kernels
from wgfcore.sample import sample

ON_GPU = torch.cuda.is_available() and not kernels.INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
STEPS = 20
BATCHES = [16, 128] if ON_GPU else [1]
WIDTH = 32 if ON_GPU else 8  # CPU: a narrower net keeps the CPU suite under a minute
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def conv_net(seed: int, width: int = 32) -> nn.Module:
    """A fixed 3-layer conv net 3 -> width -> width -> 3 on 64x64 images (ignores t)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
        nn.Conv2d(width, 3, 3, padding=1),
    )
    with torch.no_grad():
        net[-1].weight.mul_(0.1)  # small outputs keep 20 steps of x + c T bounded
    return net.eval()


def _params():
    for backend in ("triton", "torch"):
        for dname in DTYPES:
            for B in BATCHES:
                marks = []
                if not ON_GPU and backend == "triton":
                    marks.append(pytest.mark.skip(reason="Triton interpreter is a correctness mode, not a performance "
                                                         "path"))
                elif not ON_GPU and dname != "fp32":
                    marks.append(pytest.mark.skip(reason="CPU suite runs fp32 only (< 1 min)"))
                yield pytest.param(backend, dname, B, marks=marks, id=f"predict_project-{backend}-{dname}-B{B}")


@pytest.mark.parametrize("backend,dname,B", list(_params()))
def test_predict_project_images_per_s(benchmark, record_rates, backend, dname, B):
    dtype = DTYPES[dname]
    s_net = conv_net(0, WIDTH).to(device=DEVICE, dtype=dtype)
    t_net = conv_net(1, WIDTH).to(device=DEVICE, dtype=dtype)

    def score_fn(x, t):
        return s_net(x)

    def proj_fn(x, t):
        return t_net(x)

    def run():
        with torch.no_grad():
            x = sample(score_fn, (B, 3, 64, 64), STEPS, sampler="predict_project", proj_fn=proj_fn, seed=0,
                       device=DEVICE, dtype=dtype, backend=backend)
        if ON_GPU:
            torch.cuda.synchronize()
        return x

    x = run()  # first-launch / compile costs stay out of the timing
    assert torch.isfinite(x).all()
    benchmark.pedantic(run, rounds=5 if ON_GPU else 2, warmup_rounds=1 if ON_GPU else 0)
    record_rates(benchmark, calls=1, items=B, item_name="images", sampler="predict_project", steps=STEPS,
                 nfe=2 * STEPS, net_width=WIDTH, backend=backend, dtype=dname, shape=[B, 3, 64, 64])
