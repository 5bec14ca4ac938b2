"""Fused sampler-step kernels (kernels/sampler_step.py) against their oracle, wgfcore.ops.

On CPU the kernels run in the Triton interpreter (no bfloat16 there): shapes stay small and
hypothesis examples are capped. The bfloat16 cases run only where a GPU compiles the kernels.
"""
import inspect
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import triton
import triton.language as tl

import kernels
from kernels import sampler_step as ks
from kernels.optable import OPS as STEP_OPS
from wgfcore import ops
from wgfcore.metrics import gaussian_fit, w2_gaussian
from wgfcore.sample import TorchSteps, make_steps, sample
from wgfcore.scores import gaussian

from step_backend_checks import check_finite_flag

DEVICE = "cpu" if kernels.INTERPRETED else "cuda"
needs_gpu = pytest.mark.skipif(kernels.INTERPRETED, reason="the Triton interpreter has no bfloat16")
cuda_only = pytest.mark.skipif(kernels.INTERPRETED, reason="needs CUDA: 2^24 draws are minutes in the interpreter")
DTYPES_LOW = [torch.float16, pytest.param(torch.bfloat16, marks=needs_gpu)]


# --- inputs -------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 5), st.lists(st.integers(1, 9), min_size=0, max_size=3)).map(
    lambda t: (t[0], *t[1]))
coef_kinds = st.sampled_from(["float", "scalar", "per_sample", "per_sample_f64"])


def make_coef(kind, B, rng):
    v = rng.uniform(-3.0, 3.0, size=B)
    if kind == "float":
        return float(v[0])
    if kind == "scalar":
        return torch.tensor(float(v[0]), device=DEVICE)
    if kind == "per_sample":
        return torch.tensor(v, dtype=torch.float32, device=DEVICE)
    return torch.tensor(v, dtype=torch.float64, device=DEVICE)


def coef64(c, x):
    """A coefficient in float64, broadcastable against x (the exact reference)."""
    if not torch.is_tensor(c):
        return float(c)
    c = c.to(torch.float64)
    return c if c.ndim == 0 else c.view(-1, *([1] * (x.ndim - 1)))


# Each case: an update of kernels.optable, with or without its noise term.
CASES = {(name if noisy or not spec.noise else f"{name}_quiet"): (spec, noisy)
         for name, spec in STEP_OPS.items() for noisy in ((False, True) if spec.noise else (False,))}


def terms_of(spec, T, C, z):
    """[(coefficient, tensor)] of the update's sum, constants (project's 1 for x_pred) included."""
    by = dict(zip(spec.columns, C))
    terms = [(by[a] if isinstance(a, str) else a, t) for a, t in zip(spec.scales, T)]
    return terms + ([(by[spec.noise], z)] if z is not None else [])


def run_case(name, T, C, z):
    """(kernel output, oracle output, [(coef, tensor)] terms of the sum) for case `name`.

    C holds one value per table column (None for the noise column of a quiet case); z is the
    explicit noise of a noisy case, else None. Both calls follow kernels.optable's argument order.
    """
    spec, noisy = CASES[name]
    kern, oracle = getattr(ks, spec.name), getattr(ops, spec.oracle)
    got = kern(*T, *C, z=z) if noisy else kern(*T, *(c for c in C if c is not None))
    want = oracle(*T, *([z] if spec.noise else []), *C)
    return got, want, terms_of(spec, T, C, z)


def draw_case(data, dtype):
    name = data.draw(st.sampled_from(sorted(CASES)), label="op")
    shape = data.draw(shapes, label="shape")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    spec, noisy = CASES[name]
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    T = [torch.randn(shape, generator=g).to(dtype=dtype, device=DEVICE) for _ in range(spec.nt)]
    C = [None if col == spec.noise and not noisy else make_coef(data.draw(coef_kinds, label=col), shape[0], rng)
         for col in spec.columns]
    z = torch.randn(shape, generator=g).to(dtype=dtype, device=DEVICE) if noisy else None
    return name, T, C, z


# --- explicit-noise mode equals wgfcore.ops -----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=20)
@given(data=st.data())
def test_fp32_equals_ops(dtype, data):
    # float64 storage is computed in fp32 by both (wgfcore.ops' rule), so the same bound holds.
    name, T, C, z = draw_case(data, dtype)
    out, ref, terms = run_case(name, T, C, z)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    # rtol 1e-6 of the terms' magnitude: a few fp32 ulps, whatever cancellation there is in the sum
    # (the GPU may contract a*b + c into one FMA; the interpreter agrees bit for bit).
    scale = sum(abs(coef64(c, t)) * t.double().abs() for c, t in terms)
    err = (out.double() - ref.double()).abs()
    assert bool((err <= 1e-6 * scale).all()), f"{name}: max err {float(err.max()):.3g}"


@pytest.mark.parametrize("dtype", DTYPES_LOW)
@settings(max_examples=15)
@given(data=st.data())
def test_low_precision_no_worse_than_torch(dtype, data):
    name, T, C, z = draw_case(data, dtype)
    out, ref, terms = run_case(name, T, C, z)
    assert out.dtype == dtype
    exact = sum(coef64(c, t) * t.double() for c, t in terms)
    err_kernel = float((out.double() - exact).abs().max())
    err_torch = float((ref.double() - exact).abs().max())
    # Flash-attention rule: the kernel's error vs an fp64 reference is at most 2x torch's own.
    assert err_kernel <= 2.0 * err_torch, f"{name}: kernel {err_kernel:.3g} vs torch {err_torch:.3g}"


def test_out_may_alias_the_state():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 700, generator=g).to(DEVICE)
    s = torch.randn(3, 700, generator=g).to(DEVICE)
    c = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
    expected = ks.em(x, s, c, -0.25, 0.3, seed=3, step=4)
    ks.em(x, s, c, -0.25, 0.3, seed=3, step=4, out=x)
    assert torch.equal(x, expected)


def test_empty_tensor():
    x = torch.empty(0, 3, device=DEVICE)
    assert ks.em(x, x.clone(), 1.0, 2.0, 0.5, seed=1, step=0).shape == (0, 3)


# --- in-kernel noise ----------------------------------------------------------------------------
# Two transforms (kernels/noise.py): fp32/fp64 states keep Triton's randn4x, 16-bit states take
# box_muller16. Each statistical check runs on both: fp32 storage, and fp16 storage for the 16-bit
# one (the interpreter has no bfloat16; bf16 storage draws the same z, checked on a GPU below).
NOISE_DTYPES = [torch.float32, torch.float16]


def noise(shape, seed, step, c_z=1.0, dtype=torch.float32):
    """The in-kernel z itself: em with x = s = 0 and c_z = 1 returns exactly c_z z (rounded to dtype)."""
    zeros = torch.zeros(shape, dtype=dtype, device=DEVICE)
    return ks.em(zeros, zeros, 0.0, 0.0, c_z, seed=seed, step=step)


# Sample sizes. Under independence, a sample mean has sd 1/sqrt(n), a sample variance sqrt(2/n)
# and a sample correlation ~1/sqrt(n). Bounds of 6 sd have a two-sided false-failure probability
# of 2e-9 per check; KS is required to have p > 1e-6. With ~40 checks the suite's chance of a
# false failure for a correct generator (over the choice of seeds) is below 1e-4. Ones that a
# broken key or layout would produce (identical streams, corr 1; shared Box-Muller radius;
# a 10% variance error) are many times these bounds. Rounding to fp16 moves the empirical CDF by
# at most pdf x half an ulp (< 3e-4), far below the KS statistic's spread at these sizes (4e-3).
N_BIG = 4 * ks.NOISE_R * 16      # 65536: 6/sqrt(n) = 0.023
N_PAIR = 4 * ks.NOISE_R * 4 - 5  # 16379, with a ragged tail: 6/sqrt(n) = 0.047


@pytest.fixture(scope="module", params=NOISE_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def big_noise(request):
    return noise((16, N_BIG // 16), seed=1234, step=7, dtype=request.param).flatten().double().cpu()


def test_noise_moments_and_ks(big_noise):
    z, n = big_noise, big_noise.numel()
    assert abs(float(z.mean())) <= 6 / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) <= 6 * math.sqrt(2.0 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-6


def corr(a, b):
    a, b = a.flatten().double().cpu(), b.flatten().double().cpu()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_noise_neighbours_uncorrelated(big_noise):
    z, n, R = big_noise, big_noise.numel(), ks.NOISE_R
    bound = 6 / math.sqrt(n)
    # lag 1: neighbouring elements; lag R: two outputs of one Box-Muller pair (same Philox counter,
    # same radius, so also check the squares); lag 2R: the other Box-Muller pair of that counter.
    for lag in (1, R, 2 * R, 3 * R):
        assert abs(corr(z[:-lag], z[lag:])) <= bound, f"lag {lag}"
        assert abs(corr(z[:-lag] ** 2, z[lag:] ** 2)) <= bound, f"lag {lag}, squares"


@pytest.mark.parametrize("dtype", NOISE_DTYPES)
def test_noise_same_key_identical_and_keys_independent(dtype):
    base = noise(N_PAIR, seed=5, step=3, dtype=dtype)
    assert torch.equal(base, noise(N_PAIR, seed=5, step=3, dtype=dtype))
    bound = 6 / math.sqrt(N_PAIR)
    # Other step, other seed, and the swaps that a naive seed + step (or seed * k + step) would alias.
    for seed, step in [(5, 4), (6, 3), (3, 5), (4, 4), (6, 2), (5 + 2**16, 3)]:
        other = noise(N_PAIR, seed=seed, step=step, dtype=dtype)
        assert abs(corr(base, other)) <= bound, (seed, step)


def noise_tolerance(ref, dtype):
    """How far the kernel's stored z may sit from kernels.noise's float32 z, elementwise.

    Half an ulp of the storage dtype (the kernel rounds once), plus the float32 functions' own
    error: the interpreter's numpy log/sin/cos and torch's differ by an ulp or two, 2^-20 max(1, |z|).
    On a GPU the 16-bit transform uses the hardware's log2/sin/cos (about 2^-21 absolute each):
    r times 2^-21 for the angle (<= 3e-6), and ln2 2^-22 / r for the radius, which is below 4e-6
    where |z| >= 0.05 and at most sqrt(2 ln2 2^-22) = 6e-4 where r (hence |z|) is tiny.
    """
    ref = ref.double()
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(torch.finfo(dtype).tiny))))
    tol = 0.5 * ulp + 2.0**-20 * ref.abs().clamp_min(1.0)
    if not kernels.INTERPRETED and dtype in (torch.float16, torch.bfloat16):
        tol = tol + torch.where(ref.abs() >= 0.05, 7e-6, 6e-4)
    return tol


@pytest.mark.parametrize("dtype", NOISE_DTYPES + [torch.float64, pytest.param(torch.bfloat16, marks=needs_gpu)])
@pytest.mark.parametrize("seed,step", [(0, 0), (1234, 7), (2**32 - 1, 2**32 - 1)])
def test_noise_matches_its_reference(dtype, seed, step):
    """kernels/noise.py is the specification another backend (C++) reproduces: the kernels match it."""
    from kernels.noise import normal

    n = 2 * 4 * ks.NOISE_R + 77  # two groups and a ragged third
    got = noise((n,), seed=seed, step=step, dtype=dtype).double().cpu()
    ref = normal(seed, step, n, dtype)
    err = (got - ref.double()).abs()
    assert bool((err <= noise_tolerance(ref, dtype)).all()), f"max err {float(err.max()):.3g}"


@triton.jit
def _philox_words(out, seed, step, N: tl.constexpr):
    c = tl.arange(0, N)
    key = seed.to(tl.uint32).to(tl.uint64) | (step.to(tl.uint32).to(tl.uint64) << 32)
    w0, w1, w2, w3 = tl.randint4x(key, c)
    tl.store(out + c, w0.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out + N + c, w1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out + 2 * N + c, w2.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out + 3 * N + c, w3.to(tl.int64) & 0xFFFFFFFF)


def test_noise_reference_philox_is_triton_randint4x():
    """The reference's Philox words are Triton's randint4x under the kernels' key, exactly."""
    from kernels.noise import philox4x32

    out = torch.empty(4, 64, dtype=torch.int64, device=DEVICE)
    _philox_words[(1,)](out, 3000000000, 17, N=64)
    assert torch.equal(out.cpu(), torch.stack(philox4x32(torch.arange(64), 3000000000, 17)))


@pytest.mark.parametrize("config", [(2, 4), (1, 8), (3, 8)])
@pytest.mark.parametrize("dtype", NOISE_DTYPES)
def test_noise_depends_only_on_key_and_offset(monkeypatch, config, dtype):
    z = noise((3, 3000), seed=9, step=2, dtype=dtype)
    if dtype == torch.float32:
        # fp64 storage draws the fp32 transform and holds its z exactly.
        assert torch.equal(noise((3, 3000), seed=9, step=2, dtype=torch.float64), z.double())
    # Shape: the same 9000 offsets give the same values whatever the (B, ...) split.
    assert torch.equal(noise((9000,), seed=9, step=2, dtype=dtype), z.flatten())
    # Launch configuration (groups per program, warps): never part of the noise.
    monkeypatch.setattr(ks, "_launch_config", lambda numel, itemsize: config)
    assert torch.equal(noise((3, 3000), seed=9, step=2, dtype=dtype), z)
    # The sampling loop's kernel (seed read from the device) draws the very same noise.
    x = torch.zeros(3, 3000, device=DEVICE, dtype=dtype)
    plan = ks.TritonSteps(torch.tensor(9, device=DEVICE)).plan(x, {"em": torch.tensor([[0.0, 0.0, 1.0]] * 3,
                                                                                       device=DEVICE)})
    assert torch.equal(plan.em(x, x, "em", 2, True), z)


@needs_gpu
def test_bf16_states_draw_the_fp16_states_noise():
    """Both 16-bit dtypes take box_muller16: their outputs are one z rounded two ways."""
    z16 = noise((3, 3000), seed=9, step=2, dtype=torch.float16).double()
    zb = noise((3, 3000), seed=9, step=2, dtype=torch.bfloat16).double()
    half_ulps = 0.5 * (torch.finfo(torch.bfloat16).eps + torch.finfo(torch.float16).eps) * z16.abs().clamp_min(1e-4)
    assert bool(((zb - z16).abs() <= 2 * half_ulps).all())


@pytest.mark.parametrize("dtype", NOISE_DTYPES)
def test_noise_per_sample_coefficient(dtype):
    c = torch.tensor([0.5, -2.0, 3.0], device=DEVICE)
    z = noise((3, 900), seed=1, step=0)
    ref = (c[:, None] * (z if dtype == torch.float32 else noise((3, 900), seed=1, step=0, dtype=dtype).float()))
    got = noise((3, 900), seed=1, step=0, c_z=c, dtype=dtype)
    if dtype == torch.float32:
        assert torch.equal(got, ref)
    else:  # c z rounded once against z rounded, then scaled: within one ulp of the 16-bit dtype
        assert torch.allclose(got.float(), ref, rtol=2 * torch.finfo(dtype).eps, atol=0)


# --- TritonSteps as a sampler backend -----------------------------------------------------------

def test_tritonsteps_mirrors_torchsteps():
    assert ks.TritonSteps.name == "triton"
    for m in ("plan", "accept", "predict", "em", "project", "heun"):
        params = [inspect.signature(getattr(cls, m)).parameters for cls in (ks.TritonSteps, TorchSteps)]
        assert list(params[0].values()) == list(params[1].values()), m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert isinstance(make_steps("triton", DEVICE, seed=3), ks.TritonSteps)


# --- the sampling loop's path: validate once (plan), then pre-bound launches ---------------------

@settings(max_examples=15)
@given(case=st.sampled_from(sorted(CASES)), shape=shapes, n=st.integers(1, 4), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]), data=st.data())
def test_plan_path_equals_public_kernels_bitwise(case, shape, n, seed, dtype, data):
    """TritonSteps (table kernel, seed on the device) and the public launchers share `_tile`: same bits."""
    spec, noisy = CASES[case]
    g = torch.Generator().manual_seed(seed % 2**31)
    T = [torch.randn(shape, generator=g).to(dtype=dtype, device=DEVICE) for _ in range(spec.nt)]
    table = torch.randn(n, spec.ncol, generator=g, dtype=torch.float64).to(DEVICE)
    i = data.draw(st.integers(0, n - 1), label="step")
    plan = ks.TritonSteps(seed).plan(T[0], {spec.name: table})
    c = [None if col == spec.noise and not noisy else v
         for col, v in zip(spec.columns, table[i].to(torch.float32).unbind())]
    key = dict(seed=seed, step=i) if noisy else {}
    step_args = (spec.name, i, noisy) if spec.noise else (spec.name, i)
    got = getattr(plan, spec.name)(*T, *step_args)
    want = getattr(ks, spec.name)(*T, *(v for v in c if v is not None), **key)
    assert got.dtype == dtype and torch.equal(got, want)


def test_op_table_matches_the_launchers_and_the_oracle():
    """kernels.optable names each launcher's and oracle's arguments in their real order."""
    for spec in STEP_OPS.values():
        kern = list(inspect.signature(getattr(ks, spec.name)).parameters)
        assert kern[:spec.nt + spec.ncol] == [*spec.tensors, *spec.columns], spec.name
        oracle = list(inspect.signature(getattr(ops, spec.oracle)).parameters)
        assert oracle == [*spec.tensors, *(["z"] if spec.noise else []), *spec.columns], spec.name
        assert callable(getattr(ks.TritonSteps, spec.name)), spec.name
    assert STEP_OPS["project"].kernel_row((0.5, 0.25)) == (1.0, 0.5, 0.25)
    assert STEP_OPS["predict"].kernel_row((2.0, 3.0)) == (2.0, 3.0, 0.0)
    assert [s.bytes_per_element() for s in STEP_OPS.values()] == [3, 3, 3, 5]
    assert STEP_OPS["em"].bytes_per_element(explicit_z=True) == 4


def test_plan_accepts_network_outputs_of_other_dtypes_and_layouts():
    x = torch.randn(4, 6, device=DEVICE)
    table = torch.tensor([[1.1, -0.3]], device=DEVICE)
    plan = ks.TritonSteps(1).plan(x, {"predict": table})
    s = torch.randn(6, 4, device=DEVICE).t()  # non-contiguous, as a transposing network might return
    for out in (s, s.double(), s.half()):
        got = plan.predict(x, plan.accept(out), "predict", 0)
        assert got.dtype == x.dtype and torch.equal(got, ops.predict(x, out, *table[0].unbind()))


def test_plan_validates_once_with_clear_errors():
    x = torch.zeros(2, 8, device=DEVICE)
    ok = torch.zeros(3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="unknown coefficient table 'euler'"):
        ks.TritonSteps(1).plan(x, {"euler": ok})
    with pytest.raises(ValueError, match=r"table 'em' must be a floating \(N, 3\) tensor with columns \(c_x, c_s, c_z\)"):
        ks.TritonSteps(1).plan(x, {"em": torch.zeros(3, 2, device=DEVICE)})
    with pytest.raises(ValueError, match="table 'em' is on meta"):
        ks.TritonSteps(1).plan(x, {"em": torch.zeros(3, 3, device="meta")})
    with pytest.raises(ValueError, match="must be contiguous"):
        ks.TritonSteps(1).plan(torch.zeros(8, 2, device=DEVICE).t(), {"em": ok})
    with pytest.raises(TypeError, match="dtype must be one of"):
        ks.TritonSteps(1).plan(x.int(), {"em": ok})
    with pytest.raises(TypeError, match="seed tensor must be 0-d int64"):
        ks.TritonSteps(torch.zeros(1, dtype=torch.int64))
    plan = ks.TritonSteps(1).plan(x, {"em": ok})
    with pytest.raises(IndexError, match="step 3 outside the planned table 'em' of 3 rows"):
        plan.em(x, x, "em", 3, True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf - inf, interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_plan_kernels_flag_nonfinite_network_outputs(bad):
    """The table kernel checks the network output it reads (s, T, s') into finite_flag: the first bad step."""
    from wgfcore.sample import FLAG_CLEAR
    assert ks.FLAG_CLEAR == FLAG_CLEAR
    check_finite_flag(ks.TritonSteps(1), bad, device=DEVICE)


# --- compilations: one per kernel variant, never one per step or seed ---------------------------

class _Recorder:
    """Stands in for `_table_kernel`: records every normal launch (args, kwargs), then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.arg_names = kernel, [], kernel.arg_names

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def launch(*args, **kw):
            self.launches.append((args, kw))
            return run(*args, **kw)
        return launch


def _triton_cache_keys(launches, kern=None):
    """The cache key Triton's JITFunction.run looks each launch's compiled kernel up by, and compiles
    on a miss (specialisation of every argument, constexprs, options), built as for an sm_90 GPU.
    Also the specialisation of `numel` of each launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    kern = kern or ks._table_kernel
    jit = kern if isinstance(kern, JITFunction) else JITFunction(kern.fn, **kern.kwargs)
    binder = create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))
    keys, numel = [], []
    for args, kw in launches:
        _, spec, options = binder(*args, **kw)
        keys.append(compute_cache_key({}, spec, options))
        numel.append(spec[jit.arg_names.index("numel")])
    return keys, numel


def _net(x, t):
    # A fresh output per call, as a network gives: new allocations must not change the variant.
    return -0.5 * x + 0.01 * t.view(-1, *([1] * (x.ndim - 1)))


@pytest.mark.parametrize("sampler", ["euler_maruyama", "predict_project", "heun_ode"])
def test_sample_compiles_once_per_variant_not_per_step_or_seed(monkeypatch, sampler):
    """Every step of sample() hits the compiled kernel of its variant: the Triton cache keys of all
    launches, over two seeds and two step counts, number exactly the (NT, NOISE, CHECK) variants used,
    and the state size (a multiple of 16) reaches the compiler as such (vectorised access)."""
    rec = _Recorder(ks._table_kernel)
    monkeypatch.setattr(ks, "_table_kernel", rec)
    kw = dict(proj_fn=_net, delta_p=1.0) if sampler == "predict_project" else {}
    cache = ks._table_kernel.kernel.device_caches[torch.cuda.current_device()][0] if DEVICE == "cuda" else None
    seen, compiled = [], []
    for seed, steps in ((1, 3), (2, 5), (3, 5)):
        start = len(rec.launches)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the interpreter warning
            sample(_net, (4, 3, 8, 8), steps, sampler=sampler, seed=seed, backend="triton", device=DEVICE, **kw)
        keys, numel = _triton_cache_keys(rec.launches[start:], rec.kernel)
        assert all(n[1] == "D" for n in numel), numel  # 768 elements: divisible by 16
        seen.append(set(keys))
        if cache is not None:
            compiled.append(len(cache))
    variants = {tuple(kw[k] for k in ("NT", "NOISE", "CHECK")) for _, kw in rec.launches}
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) == len(variants), (len(seen[0]), variants)
    if cache is not None:  # on a GPU, the compiled kernels themselves: none added after the first run
        assert compiled[0] == compiled[1] == compiled[2]


def test_table_kernel_specialises_numel_but_not_step():
    keys, numel = _triton_cache_keys([((torch.zeros(64),) * 6 + (torch.zeros((), dtype=torch.int64),) * 2 + (n, i),
                                       dict(NT=2, NOISE=2, R=ks.NOISE_R, GROUPS=1, CHECK=1, num_warps=8))
                                      for n, i in ((4096, 0), (4096, 7), (4096, 123456), (4095, 0), (4095, 9))])
    assert [n[1] for n in numel] == ["D", "D", "D", "", ""]
    assert len(set(keys[:3])) == 1 and len(set(keys[3:])) == 1 and keys[0] != keys[3]


def test_gpu_warps_give_16_byte_accesses_to_the_narrowest_tensor(monkeypatch):
    """On a GPU a thread holds R / (32 warps) elements of each quarter-tile: 8 warps for 4-byte
    tensors, 4 for 2-byte ones, so each access is 16 bytes; a 16-bit network output next to an fp32
    state sets the warps of its launch (kernels/_build_check.py checks the widths in the builds)."""
    monkeypatch.setattr(ks, "INTERPRETED", False)
    assert [ks.NOISE_R // (32 * ks._launch_config(1 << 20, size)[1]) * size for size in (4, 2)] == [16, 16]
    assert ks._launch_config(1 << 20, 8) == (1, 4)  # fp64: 32-byte accesses, no spill (see there)
    rec = _Recorder(ks._table_kernel)
    monkeypatch.setattr(ks, "_table_kernel", rec)
    x = torch.zeros(2, 64, device=DEVICE)
    plan = ks.TritonSteps(1).plan(x, {"predict": torch.ones(2, 2, device=DEVICE)})
    plan.predict(x, x, "predict", 0)
    plan.predict(x, x.half(), "predict", 1)
    assert [kw["num_warps"] for _, kw in rec.launches] == [8, 4]


# --- the slim launch: the compiled kernel's own launcher, checked against the normal one ---------

class _StandInCompiled:
    """Stands in for Triton's CompiledKernel, which the interpreter does not build: `run` takes the
    launcher's calling convention (grid, stream, function, metadata, launch metadata, hooks, every
    kernel argument) and runs the interpreted kernel, or misbehaves as told."""

    function, packed_metadata = "fn-handle", "packed-metadata"

    def __init__(self, kernel, fault=None):
        self.kernel, self.fault, self.calls = kernel, fault, 0

    def run(self, g0, g1, g2, stream, function, meta, launch_meta, enter, exit_, *args):
        assert (g1, g2, function, meta, launch_meta, enter, exit_) == (1, 1, "fn-handle", "packed-metadata",
                                                                        None, None, None)
        self.calls += 1
        if self.fault == "raises":
            raise TypeError("launcher() takes 12 positional arguments")
        self.kernel[(g0,)](*args)
        if self.fault == "wrong bits":
            args[0].add_(1.0)


@pytest.fixture
def stand_in(monkeypatch):
    """`_table_kernel` whose normal launch returns a stand-in compiled kernel; a fresh slim state."""
    monkeypatch.setattr(ks, "_SLIM_STATE", {"ok": True})
    real = ks._table_kernel

    class Kernel(_Recorder):
        fault = False  # None: a correct stand-in; "wrong bits"/"raises": a broken one; False: no compiled kernel
        compiled = {}  # one stand-in per compiled variant (NT, NOISE, CHECK), as Triton's cache holds

        def __getitem__(self, grid):
            launch = super().__getitem__(grid)

            def run(*args, **kw):
                launch(*args, **kw)
                if self.fault is False:
                    return None
                variant = (kw["NT"], kw["NOISE"], kw["CHECK"], args[1].dtype, args[2].dtype)
                return self.compiled.setdefault(variant, _StandInCompiled(self.kernel, self.fault))
            return run

        def slim_calls(self):
            return sum(c.calls for c in self.compiled.values())

    k = Kernel(real)
    monkeypatch.setattr(ks, "_table_kernel", k)
    return k


def _em_run(plan, x, s, steps):
    return [plan.em(x, s, "em", i, i % 2 == 0) for i in range(steps)]


def _em_setup(steps=4):
    g = torch.Generator().manual_seed(0)
    x, s = (torch.randn(3, 1000, generator=g).to(DEVICE) for _ in range(2))
    table = torch.randn(steps, 3, generator=g).to(DEVICE)
    return x, s, table


def test_slim_launch_used_after_a_bitwise_check(stand_in):
    x, s, table = _em_setup()
    want = _em_run(ks.TritonSteps(5).plan(x, {"em": table}), x, s, 4)  # interpreter: normal launches only
    assert len(stand_in.launches) == 4
    stand_in.fault = None
    stand_in.launches.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _em_run(ks.TritonSteps(5).plan(x, {"em": table}), x, s, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # One normal launch per variant (noisy, quiet); each checked by one slim launch, which then
    # serves the variant's other steps.
    assert len(stand_in.launches) == 2 and stand_in.slim_calls() == 2 + 2
    # A later run binds the same compiled variants without checking them again.
    again = _em_run(ks.TritonSteps(5).plan(x, {"em": table}), x, s, 4)
    assert all(torch.equal(a, b) for a, b in zip(again, want))
    assert len(stand_in.launches) == 4 and stand_in.slim_calls() == 4 + 2
    # A network output of another dtype is another compiled variant: the normal launch again.
    plan = ks.TritonSteps(5).plan(x, {"em": table})
    plan.em(x, s, "em", 0, True)
    n = len(stand_in.launches)
    assert torch.equal(plan.em(x, s.half(), "em", 2, True), ks.em(x, s.half().float(), *table[2].unbind(), seed=5, step=2))
    assert len(stand_in.launches) == n + 1


@pytest.mark.parametrize("fault", ["wrong bits", "raises"])
def test_slim_launch_falls_back_with_one_warning(stand_in, fault):
    x, s, table = _em_setup()
    want = _em_run(ks.TritonSteps(5).plan(x, {"em": table}), x, s, 4)
    stand_in.fault = fault
    stand_in.launches.clear()
    with pytest.warns(RuntimeWarning, match="slim launch .* is off") as record:
        got = _em_run(ks.TritonSteps(5).plan(x, {"em": table}), x, s, 4)
        got2 = _em_run(ks.TritonSteps(5).plan(x, {"em": table}), x, s, 4)  # a later run: no new attempt
    assert len(record) == 1
    assert all(torch.equal(a, b) for a, b in zip(got + got2, want + want))
    assert len(stand_in.launches) == 8 and stand_in.slim_calls() == 1


def test_interpreter_takes_the_normal_launch_silently(stand_in):
    x, s, table = _em_setup()
    plan = ks.TritonSteps(5).plan(x, {"em": table})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _em_run(plan, x, s, 4)
    assert len(stand_in.launches) == 4 and set(plan._slim.values()) == {None}


def test_numpy_integers_as_seed_and_step():
    x, s = _xs()
    a = ks.em(x, s, 1.0, 1.0, 0.5, seed=np.int64(7), step=np.uint32(2))
    assert torch.equal(a, ks.em(x, s, 1.0, 1.0, 0.5, seed=7, step=2))
    assert ks.TritonSteps(np.int32(7)).seed == 7


@cuda_only
@pytest.mark.parametrize("dtype", NOISE_DTYPES)
def test_noise_2_24_draws_on_gpu(dtype):
    """The GPU-sized check of the measurements file: 2^24 draws, bounds of 6 sd (see above)."""
    n = 1 << 24
    z = noise((n,), seed=2026, step=11, dtype=dtype).double()
    bound = 6 / math.sqrt(n)  # 1.5e-3
    assert abs(float(z.mean())) <= bound
    assert abs(float(z.var()) - 1.0) <= 6 * math.sqrt(2.0 / n)
    kurt = float(((z - z.mean()) ** 4).mean() / z.var() ** 2)
    assert abs(kurt - 3.0) <= 6 * math.sqrt(24.0 / n)
    sub = z[: 1 << 20].cpu().numpy()  # KS on 2^20 draws: scipy's exact KS on 2^24 is slow
    assert stats.kstest(sub, "norm").pvalue > 1e-6
    R = ks.NOISE_R
    for lag in (1, R, 2 * R, 3 * R, 4 * R):
        assert abs(corr(z[:-lag], z[lag:])) <= bound, f"lag {lag}"
        assert abs(corr(z[:-lag] ** 2, z[lag:] ** 2)) <= bound, f"lag {lag}, squares"
    for seed, step in [(2026, 12), (2027, 11), (11, 2026)]:
        assert abs(corr(z, noise((n,), seed=seed, step=step, dtype=dtype).double())) <= bound, (seed, step)


TARGET = gaussian([1.0, -0.5], [[0.6, 0.2], [0.2, 1.5]])
N_SAMPLES, N_STEPS = 2000, 20


def run_sampler(sampler, backend, seed, n=N_SAMPLES):
    sf = TARGET.score_fn()
    # Any analytic field serves as the projection T for this comparison; the marginal score at
    # t_{i+1} keeps every update affine in Gaussians, so the output law is exactly Gaussian.
    kw = dict(proj_fn=sf, delta_p=1.0) if sampler == "predict_project" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the interpreter warning
        return sample(sf, (n, 2), N_STEPS, sampler=sampler, seed=seed, backend=backend,
                      device=DEVICE, **kw)


def fits_w2(x, y):
    return w2_gaussian(*gaussian_fit(x), *gaussian_fit(y))


@pytest.mark.parametrize("sampler", ["euler_maruyama", "predict_project"])
def test_sampler_matches_torch_in_distribution(sampler):
    x_tri = run_sampler(sampler, "triton", seed=11)
    x_tor = run_sampler(sampler, "torch", seed=12)
    assert torch.isfinite(x_tri).all()
    m_t, S_t = TARGET.mean(), TARGET.cov()
    w_tri = w2_gaussian(*gaussian_fit(x_tri), m_t, S_t)
    w_tor = w2_gaussian(*gaussian_fit(x_tor), m_t, S_t)
    # Sampling error of these estimators at this n, by parametric bootstrap from the torch run's
    # fitted law (exact here: the output is Gaussian). Independent runs: sd of the difference is
    # sqrt(2) sd; 6 of those bound a false failure by ~2e-9 under normality of the estimator.
    m, S = gaussian_fit(x_tor)
    L = np.linalg.cholesky(S)
    rng = np.random.default_rng(0)
    boot_to_target, boot_between = [], []
    for _ in range(200):
        a = m + rng.standard_normal((N_SAMPLES, 2)) @ L.T
        b = m + rng.standard_normal((N_SAMPLES, 2)) @ L.T
        boot_to_target.append(w2_gaussian(*gaussian_fit(a), m_t, S_t))
        boot_between.append(fits_w2(a, b))
    sd = float(np.std(boot_to_target))
    assert abs(w_tri - w_tor) <= 6 * math.sqrt(2) * sd, (w_tri, w_tor, sd)
    # And directly: the two fitted laws are no further apart than two same-law fits usually are.
    between = np.asarray(boot_between)
    assert fits_w2(x_tri, x_tor) <= between.mean() + 6 * between.std(), (fits_w2(x_tri, x_tor), between.mean())


def test_heun_ode_matches_torch_elementwise():
    # No noise: same seed, same prior draw, so the two backends agree sample for sample, up to
    # fp32 rounding accumulated over 20 steps (bit for bit in the interpreter).
    x_tri = run_sampler("heun_ode", "triton", seed=4, n=500)
    x_tor = run_sampler("heun_ode", "torch", seed=4, n=500)
    torch.testing.assert_close(x_tri, x_tor, rtol=1e-5, atol=1e-5)


def test_triton_sampler_deterministic():
    a = run_sampler("predict_project", "triton", seed=21, n=300)
    assert torch.equal(a, run_sampler("predict_project", "triton", seed=21, n=300))
    assert not torch.equal(a, run_sampler("predict_project", "triton", seed=22, n=300))


# --- bad input fails early with a clear error ---------------------------------------------------

def _xs(shape=(2, 8), dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype, device=DEVICE), torch.zeros(shape, dtype=dtype, device=DEVICE)


def test_dtype_mismatch():
    x, s = _xs()
    with pytest.raises(TypeError, match="s has dtype torch.float16 but x has torch.float32"):
        ks.predict(x, s.half(), 1.0, 1.0)
    with pytest.raises(TypeError, match="z has dtype"):
        ks.em(x, s, 1.0, 1.0, 1.0, z=s.half())


def test_unsupported_dtype():
    x, s = _xs(dtype=torch.int32)
    with pytest.raises(TypeError, match="float32, float16, bfloat16, float64, got torch.int32"):
        ks.em(x, s, 1.0, 1.0)


def test_device_mismatch():
    x, _ = _xs()
    with pytest.raises(ValueError, match="s is on meta"):
        ks.predict(x, torch.empty(2, 8, device="meta"), 1.0, 1.0)
    with pytest.raises(ValueError, match="coefficient c_s is on meta"):
        ks.predict(x, x, 1.0, torch.empty((), device="meta"))
    m = torch.empty(2, 8, device="meta")
    with pytest.raises(ValueError, match="tensors must be on CUDA"):
        ks.predict(m, m, 1.0, 1.0)


def test_bad_coefficient():
    x, s = _xs()
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\), got shape \(3,\)"):
        ks.em(x, s, torch.ones(3, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match=r"got shape \(2, 1\)"):
        ks.heun(x, s, x, s, 1.0, 1.0, torch.ones(2, 1, device=DEVICE), 1.0)
    with pytest.raises(TypeError, match="floating tensor"):
        ks.predict(x, s, torch.ones(2, dtype=torch.int64, device=DEVICE), 1.0)
    with pytest.raises(TypeError, match="python number or a tensor"):
        ks.predict(x, s, "1.0", 1.0)


def test_shape_mismatch_and_layout():
    x, _ = _xs()
    with pytest.raises(ValueError, match=r"T has shape \(2, 9\), expected x_pred's shape \(2, 8\)"):
        ks.project(x, torch.zeros(2, 9, device=DEVICE), 1.0)
    # Non-contiguous inputs are copied once (kernels._common's one layout policy), out= is written in place.
    y = torch.randn(8, 2, device=DEVICE).t()
    s = torch.randn(8, 2, device=DEVICE).t()
    assert torch.equal(ks.predict(y, s, 0.5, 2.0), ks.predict(y.contiguous(), s.contiguous(), 0.5, 2.0))
    with pytest.raises(ValueError, match="out must be contiguous"):
        ks.predict(y.contiguous(), s.contiguous(), 1.0, 1.0, out=torch.empty(8, 2, device=DEVICE).t())
    with pytest.raises(ValueError, match="0-d"):
        ks.predict(torch.zeros((), device=DEVICE), torch.zeros((), device=DEVICE), 1.0, 1.0)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ks.predict([1.0], x, 1.0, 1.0)


def test_noise_arguments():
    x, s = _xs()
    with pytest.raises(ValueError, match="pass z, or seed= and step="):
        ks.em(x, s, 1.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="c_z is None"):
        ks.project(x, s, 1.0, z=s)
    with pytest.raises(ValueError, match="not both"):
        ks.em(x, s, 1.0, 1.0, 0.5, z=s, seed=1, step=0)
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*32\)"):
        ks.em(x, s, 1.0, 1.0, 0.5, seed=-1, step=0)
    with pytest.raises(TypeError, match="step must be an integer"):
        ks.em(x, s, 1.0, 1.0, 0.5, seed=1, step=torch.tensor(0))
    with pytest.raises(ValueError, match="seed must lie"):
        ks.TritonSteps(seed=2**32, device=DEVICE)


@pytest.mark.skipif(not kernels.INTERPRETED, reason="interpreter-only restriction")
def test_interpreter_rejects_bfloat16():
    x, s = _xs(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="no bfloat16"):
        ks.predict(x, s, 1.0, 1.0)


# Compiled (not interpreted) builds of these kernels for sm_90, without a GPU: tests/test_build_check.py.
