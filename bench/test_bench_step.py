"""Sampler-step kernels: fused Triton vs eager PyTorch vs torch.compile (GB/s, % of copy bandwidth).

Each row times one update of `wgfcore.ops` on a batch of 3x64x64 images. Eager is the unfused
sequence (torch.randn, then the ops one by one); compile is torch.compile of the same function,
randn included (Inductor can fuse its own RNG); triton is kernels.sampler_step with in-kernel
noise. Bytes are the minimum for the update: inputs read once, the output written once, noise
read never; so every implementation of one update is charged the same bytes.
"""
import pytest
import torch

import kernels
from kernels import sampler_step as ks
from wgfcore import ops

ON_GPU = torch.cuda.is_available() and not kernels.INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"

BATCHES = [1, 16, 64, 256]  # x 3 x 64 x 64: one image (49 KB in fp32) to 256 images (12.6 MB)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ["triton", "eager", "compile"]
# update -> (tensor inputs, coefficients, noisy)
INTERPRETER_REASON = "Triton interpreter is a correctness mode, not a performance path"
UPDATES = {"em": (2, 3, True), "project": (2, 2, True), "predict": (2, 2, False), "heun": (4, 4, False)}


def _params():
    for update in UPDATES:
        for impl in IMPLS:
            for dname in DTYPES:
                for B in BATCHES:
                    marks = []
                    if not ON_GPU and impl == "triton":
                        marks.append(pytest.mark.skip(reason=INTERPRETER_REASON))
                    elif not ON_GPU and impl == "compile":
                        marks.append(pytest.mark.skip(reason="torch.compile on CPU: tens of seconds of compile per "
                                                             "row; the comparison that matters is on GPU"))
                    elif not ON_GPU and (B != BATCHES[0] or dname != "fp32"):
                        marks.append(pytest.mark.skip(reason="CPU suite runs only the smallest size in fp32 (< 1 min)"))
                    yield pytest.param(update, impl, dname, B, marks=marks, id=f"{update}-{impl}-{dname}-B{B}")


def _fn(update, impl):
    """The update as a function of (tensors, coefficients, step) -> new tensor."""
    noisy = UPDATES[update][2]
    oracle = {"em": ops.em_step, "project": ops.project, "predict": ops.predict, "heun": ops.heun_correct}[update]
    if impl == "triton":
        kern = {"em": ks.em, "project": ks.project, "predict": ks.predict, "heun": ks.heun}[update]
        if noisy:
            return lambda T, C, i: kern(*T, *C, seed=1, step=i)
        return lambda T, C, i: kern(*T, *C)

    if noisy:  # ops signatures put z after the tensors: em_step(x, s, z, ...), project(x_pred, T, z, ...)
        def eager(T, C, i):
            return oracle(*T, torch.randn_like(T[0]), *C)
    else:
        def eager(T, C, i):
            return oracle(*T, *C)
    if impl == "eager":
        return eager
    compiled = torch.compile(eager, dynamic=False)
    return lambda T, C, i: compiled(T, C, 0)  # a constant i: no recompile per step


@pytest.mark.parametrize("update,impl,dname,B", list(_params()))
def test_step(benchmark, copy_bandwidth, record_rates, update, impl, dname, B):
    dtype = DTYPES[dname]
    n_t, n_c, _ = UPDATES[update]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    T = [torch.randn((B, 3, 64, 64), generator=g, device=DEVICE, dtype=dtype) for _ in range(n_t)]
    # 0-d device coefficients, as the samplers pass them (no host sync, no recompilation).
    C = [torch.tensor(v, device=DEVICE) for v in (1.01, -0.02, 0.13, 0.5)[:n_c]]
    fn = _fn(update, impl)
    numel = T[0].numel()
    calls = max(1, min(100, (1 << 24) // numel)) if ON_GPU else 3

    def run():
        for i in range(calls):
            fn(T, C, i)
        if ON_GPU:
            torch.cuda.synchronize()

    run()  # compile / autotune / first-launch costs stay out of the timing
    benchmark.pedantic(run, rounds=20 if ON_GPU else 5, warmup_rounds=2 if ON_GPU else 1)
    nbytes = ks.BYTES_PER_ELEMENT[update] * numel * T[0].element_size()
    record_rates(benchmark, calls=calls, nbytes=nbytes, copy_bw=copy_bandwidth,
                 update=update, impl=impl, dtype=dname, shape=[B, 3, 64, 64])
