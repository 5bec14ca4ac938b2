"""Sampler-step kernels: fused Triton vs eager PyTorch vs torch.compile (GB/s, % of copy bandwidth).

Also: the public kernels at 2^27 elements (the memory limit) and the host time per call of the
public launcher, of the sampling loop's planned launch, and of one step inside sample().

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
from kernels.optable import OPS
from wgfcore import ops

ON_GPU = torch.cuda.is_available() and not kernels.INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"


def sync():
    if ON_GPU:
        torch.cuda.synchronize()

BATCHES = [1, 16, 64, 256]  # x 3 x 64 x 64: one image (49 KB in fp32) to 256 images (12.6 MB)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ["triton", "eager", "compile"]
INTERPRETER_REASON = "Triton interpreter is a correctness mode, not a performance path"
UPDATES = ("em", "project", "predict", "heun")  # kernels.optable names; noisy ones with their noise
# One value per table column (kernels.optable), 0-d on the device as the samplers pass them.
COEF_VALUES = (1.01, -0.02, 0.13, 0.5)


def _coefs(update):
    return [torch.tensor(v, device=DEVICE) for v in COEF_VALUES[:OPS[update].ncol]]


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
    spec = OPS[update]
    noisy = spec.noise is not None
    oracle = getattr(ops, spec.oracle)
    if impl == "triton":
        kern = getattr(ks, update)
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
    g = torch.Generator(device=DEVICE).manual_seed(0)
    T = [torch.randn((B, 3, 64, 64), generator=g, device=DEVICE, dtype=dtype) for _ in range(OPS[update].nt)]
    C = _coefs(update)  # 0-d device coefficients: no host sync, no recompilation
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
    nbytes = OPS[update].bytes_per_element() * numel * T[0].element_size()
    record_rates(benchmark, calls=calls, nbytes=nbytes, copy_bw=copy_bandwidth,
                 update=update, impl=impl, dtype=dname, shape=[B, 3, 64, 64])


# --- the memory limit: 2^27 elements, far beyond L2 (issue 11 item 3) ---------------------------

LARGE = 1 << 27


def _large_params():
    for update in UPDATES:
        for dname in DTYPES:
            marks = [] if ON_GPU else [pytest.mark.skip(reason="CUDA-only row: 2^27 elements is a bandwidth test")]
            yield pytest.param(update, dname, None, marks=marks, id=f"{update}-triton-{dname}-large")
            if DTYPES[dname].itemsize == 2:
                # 16-bit states launch 4 warps (16-byte accesses; kernels.sampler_step._launch_config);
                # this row measures the earlier 8 warps (8-byte accesses) against that choice.
                yield pytest.param(update, dname, 8, marks=marks, id=f"{update}-triton-w8-{dname}-large")


@pytest.mark.parametrize("update,dname,warps", list(_large_params()))
def test_step_large(benchmark, copy_bandwidth, record_rates, monkeypatch, update, dname, warps):
    """The public kernel at 2^27 elements, as a share of the same session's copy bandwidth."""
    dtype = DTYPES[dname]
    if warps is not None:
        monkeypatch.setattr(ks, "_launch_config", lambda numel, itemsize: (1, warps))
    T = [torch.empty(LARGE, device=DEVICE, dtype=dtype).normal_() for _ in range(OPS[update].nt)]
    C = _coefs(update)
    fn = _fn(update, "triton")
    calls = 5

    def run():
        for i in range(calls):
            fn(T, C, i)
        sync()

    run()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    nbytes = OPS[update].bytes_per_element() * LARGE * T[0].element_size()
    record_rates(benchmark, calls=calls, nbytes=nbytes, copy_bw=copy_bandwidth,
                 update=update, impl="triton" if warps is None else f"triton-w{warps}", dtype=dname, shape=[LARGE])


# --- host time per call (issue 11 item 2): the public launcher vs the sampling loop's path -------

HOST_NUMEL = 4096
HOST_CALLS = 2000


def _host_params():
    for path in ("public-em", "plan-em", "sample-em-step"):
        marks = [] if ON_GPU else [pytest.mark.skip(reason=INTERPRETER_REASON)]
        yield pytest.param(path, marks=marks, id=f"host-{path}-fp32-{HOST_NUMEL}")


@pytest.mark.parametrize("path", list(_host_params()))
def test_host_time_per_call(benchmark, record_rates, path):
    """Wall time per call at 4096 elements, one sync per round: launch-bound, so this is host time.

    public-em: kernels.sampler_step.em with 0-d device coefficients (full validation per call);
    plan-em: TritonSteps.em after one plan() (what sample() calls per step);
    sample-em-step: a whole sample(euler_maruyama, N = HOST_CALLS) run with a network that returns
    a fixed tensor, divided by N: the loop, the guard and the fused step, per step.
    """
    from wgfcore.sample import sample

    x = torch.randn(4, HOST_NUMEL // 4, device=DEVICE)
    s = torch.randn_like(x)
    C = [torch.tensor(v, device=DEVICE) for v in (1.01, -0.02, 0.13)]
    plan = ks.TritonSteps(7).plan(x, {"em": torch.tensor([[1.01, -0.02, 0.13]] * HOST_CALLS, device=DEVICE)})

    if path == "public-em":
        def run():
            for i in range(HOST_CALLS):
                ks.em(x, s, *C, seed=7, step=i)
            sync()
    elif path == "plan-em":
        def run():
            for i in range(HOST_CALLS):
                plan.em(x, s, "em", i, True)
            sync()
    else:
        def run():
            sample(lambda x_, t: s, tuple(x.shape), HOST_CALLS, sampler="euler_maruyama", seed=0, device=DEVICE,
                   backend="triton")
            sync()

    run()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    record_rates(benchmark, calls=HOST_CALLS, path=path, numel=HOST_NUMEL)
