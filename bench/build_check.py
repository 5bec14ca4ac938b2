"""The build check with the U-Net: kernels/_build_check.py's scenarios plus the adm64 U-Net's launches.

    TRITON_INTERPRET=0 python bench/build_check.py [the options of python -m kernels._build_check]

`kernels` imports only torch and triton, so the launches of the U-Net (which lives in wgfcore and
calls the kernels) are recorded from here: the fused adm64 network's training step (batch 32, NCHW
and channels_last) and sampling forward (batch 16 and 64) under bf16 autocast, as
bench/test_bench_unet.py and the adm64 sampler rows run it, on fake CUDA tensors. Every GroupNorm
and attention configuration those make is compiled for sm_90 and checked like the others.
bench/device_check.py warms Triton's cache with `--warm` from here.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import _build_check as B  # noqa: E402


def unet(batch: int, train: bool, channels_last: bool, preset: str = "adm64"):
    """The U-Net with set_kernels("fused") under bf16 autocast: the training step's forward and
    backward, or the sampling forward."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from wgfcore.nets import UNet

    with unset_fake_temporarily():  # built and converted on meta (no memory), then given fake CUDA weights
        with torch.device("meta"):
            net = UNet.from_preset(preset)
        net.set_kernels("fused", channels_last=channels_last)
    B.fake_module(net)
    res, ch = net.img_resolution, net.in_channels
    x = B.cuda(batch, ch, res, res)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = B.cuda(batch)
    net.train(train)
    with B.cuda_autocast():
        out = net(x, t)
    if train:
        B.fake_backward(out.float())


UNET_SCENARIOS = [
    B.Scenario("unet/adm64-train", lambda: unet(32, True, False), note="fused, batch 32, fwd+bwd"),
    B.Scenario("unet/adm64-train-cl", lambda: unet(32, True, True), note="fused channels_last, batch 32, fwd+bwd"),
    B.Scenario("unet/adm64-sample", lambda: (unet(16, False, False), unet(64, False, True)),
               note="fused forward, batch 16 NCHW and 64 channels_last"),
    B.Scenario("unet/tiny-train", lambda: unet(8, True, False, preset="tiny"),
               note="the tiny preset's fused step: GroupNorm and one-tile attention"),
]
# At import, so that the build check's worker processes (spawned on a GPU machine, which import
# this file again) know them too.
B.SCENARIOS.extend(s for s in UNET_SCENARIOS if s.name not in {x.name for x in B.SCENARIOS})

if __name__ == "__main__":
    sys.exit(B.main())
