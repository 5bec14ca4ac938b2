"""The C++ step kernels (kernels/cpu_steps.py, kernels/csrc/) against wgfcore.ops and the Triton kernels.

The updates are checked against their oracle in explicit-noise mode (the flash-attention rule, and
bit for bit: the build forbids contracting a*b + c, so the fp32 arithmetic is torch's); the noise
against the Triton kernels' draws in the interpreter and by the statistical tests their noise
passes; the errors against kernels.sampler_step's. The extension is built once per machine (the
first test that needs it pays the build); if this machine cannot build it, those tests skip with
the reason when a tool is missing and fail when the build itself broke.
"""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from kernels import cpu_steps as cs
from kernels.noise import normal, philox4x32
from wgfcore import ops
from wgfcore.sample import FLAG_CLEAR, TorchSteps, euler_maruyama, heun_ode, predict_project, sample
from wgfcore.sde import VPSDE

from step_backend_checks import check_finite_flag

try:
    import triton
    import triton.language as tl

    from kernels import sampler_step as ks
except ImportError:  # pragma: no cover - a CPU-only torch without triton
    ks = None
needs_triton = pytest.mark.skipif(ks is None, reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("cpp_steps_built")


# --- inputs -------------------------------------------------------------------------------------

# Odd sizes on purpose: groups of 4 R = 4096 elements, chunks of 256 counters, 16-wide vectors.
shapes = st.tuples(st.integers(1, 6), st.lists(st.integers(1, 40), min_size=0, max_size=3)).map(
    lambda t: (t[0], *t[1]))
coef_kinds = st.sampled_from(["float", "scalar", "per_sample", "per_sample_f64", "per_sample_bf16"])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_coef(kind, B, rng):
    v = rng.uniform(-3.0, 3.0, size=B)
    if kind == "float":
        return float(v[0])
    if kind == "scalar":
        return torch.tensor(float(v[0]))
    dtype = {"per_sample": torch.float32, "per_sample_f64": torch.float64, "per_sample_bf16": torch.bfloat16}[kind]
    return torch.tensor(v, dtype=dtype)


def coef64(c, x):
    """A coefficient as the kernels read it (fp32), in float64, broadcastable against x."""
    if not torch.is_tensor(c):
        return float(np.float32(c))
    c = c.to(torch.float32).to(torch.float64)
    return c if c.ndim == 0 else c.view(-1, *([1] * (x.ndim - 1)))


OPS = {  # name: (tensors, coefficients, noisy)
    "predict": (2, 2, False), "em": (2, 2, True), "em_no_noise": (2, 2, False),
    "project": (2, 1, True), "project_no_noise": (2, 1, False), "heun": (4, 4, False),
}


def run_case(name, T, C, z):
    """(C++ output, oracle output, [(coef, tensor)] terms of the sum)."""
    if name == "predict":
        return cs.predict(T[0], T[1], *C), ops.predict(T[0], T[1], *C), list(zip(C, T))
    if name == "em":
        return (cs.em(T[0], T[1], C[0], C[1], C[2], z=z), ops.em_step(T[0], T[1], z, *C),
                list(zip(C, [T[0], T[1], z])))
    if name == "em_no_noise":
        return cs.em(T[0], T[1], *C), ops.em_step(T[0], T[1], None, *C, None), list(zip(C, T))
    if name == "project":
        return (cs.project(T[0], T[1], C[0], C[1], z=z), ops.project(T[0], T[1], z, *C),
                list(zip([1.0, *C], [T[0], T[1], z])))
    if name == "project_no_noise":
        return cs.project(T[0], T[1], C[0]), ops.project(T[0], T[1], None, C[0], None), list(zip([1.0, *C], T))
    return cs.heun(*T, *C), ops.heun_correct(*T, *C), list(zip(C, T))


# --- explicit-noise mode against wgfcore.ops ------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=25)
@given(data=st.data())
def test_updates_match_ops(dtype, data):
    name = data.draw(st.sampled_from(sorted(OPS)), label="op")
    shape = data.draw(shapes, label="shape")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    n_t, n_c, noisy = OPS[name]
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    T = [torch.randn(shape, generator=g).to(dtype) for _ in range(n_t)]
    C = [make_coef(data.draw(coef_kinds, label=f"c{i}"), shape[0], rng) for i in range(n_c + noisy)]
    z = torch.randn(shape, generator=g).to(dtype) if noisy else None
    out, ref, terms = run_case(name, T, C, z)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    exact = sum(coef64(c, t) * t.double() for c, t in terms)
    err_cpp = float((out.double() - exact).abs().max())
    err_torch = float((ref.double() - exact).abs().max())
    # The flash-attention rule: the kernel's error against fp64 at most 2x torch's own.
    assert err_cpp <= 2.0 * err_torch, f"{name} {dtype}: C++ {err_cpp:.3g} vs torch {err_torch:.3g}"
    # And what the build delivers: the same fp32 operations in the same order as wgfcore.ops,
    # nothing fused (-ffp-contract=off), one rounding to the storage dtype: the same bits.
    assert torch.equal(out, ref), f"{name} {dtype}: not bitwise equal to wgfcore.ops"


def test_out_may_alias_an_input_and_empty_tensors():
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(3, 5000, generator=g), torch.randn(3, 5000, generator=g)
    c = torch.tensor([0.5, 1.0, 2.0])
    expected = cs.em(x, s, c, -0.25, 0.3, seed=3, step=4)
    assert cs.em(x, s, c, -0.25, 0.3, seed=3, step=4, out=x) is x
    assert torch.equal(x, expected)
    e = torch.empty(0, 3)
    assert cs.em(e, e.clone(), 1.0, 2.0, 0.5, seed=1, step=0).shape == (0, 3)


# --- the noise: Philox words, the Triton draws, statistics -----------------------------------------

def test_philox_words():
    # The reference (kernels/noise.py) against Random123's known answers (kat_vectors, philox4x32_10),
    # on the counters it takes, (c, 0, 0, 0) ...
    assert [int(w) for w in philox4x32(torch.tensor([0]), 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # ... then the extension's words, SIMD and portable paths, against the reference.
    ext = cs.require()
    for seed, step, c0 in [(0, 0, 0), (1234, 7, 5), (2**32 - 1, 2**32 - 1, 2**32 - 3000)]:
        n = 3000  # several blocks and a ragged end; c0 + n wraps past 2**32 in the last case
        want = torch.stack(philox4x32((torch.arange(n) + c0) % 2**32, seed, step), 1)
        for simd in (True, False):
            assert torch.equal(ext.philox_words(seed, step, c0, n, simd), want), (seed, step, c0, simd)


def noise(shape, seed, step, dtype=torch.float32, c_z=1.0):
    """The in-pass z itself: em with x = s = 0 and c_z = 1 returns exactly z (rounded to dtype)."""
    zeros = torch.zeros(shape, dtype=dtype)
    return cs.em(zeros, zeros, 0.0, 0.0, c_z, seed=seed, step=step)


if ks is not None:
    @triton.jit(do_not_specialize=["seed", "step"])
    def _randn4x(out_ptr, seed, step, BLOCK: tl.constexpr):
        """tl.randn4x as kernels/sampler_step.py's `_tile` keys it: key (seed, step), counter c."""
        c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        key = seed.to(tl.uint32).to(tl.uint64) | (step.to(tl.uint32).to(tl.uint64) << 32)
        n0, n1, n2, n3 = tl.randn4x(key, c)
        tl.store(out_ptr + 4 * c, n0)
        tl.store(out_ptr + 4 * c + 1, n1)
        tl.store(out_ptr + 4 * c + 2, n2)
        tl.store(out_ptr + 4 * c + 3, n3)


def triton_noise(n, seed, step):
    """n draws of the Triton stream in the interpreter, with `_tile`'s layout (counter g R + r feeds
    elements g 4R + k R + r). One big block per program: ~0.3 s for 2^20 draws, where the step
    kernel itself, one 1024-counter tile at a time, takes ~10 s; the test below checks on 2^16
    draws that the two give the same bits."""
    R = ks.NOISE_R
    G = -(-n // (4 * R))
    block = math.gcd(G * R, 1 << 16)
    out = torch.empty(G * R * 4)
    _randn4x[(G * R // block,)](out, seed, step, BLOCK=block)
    return out.view(G, R, 4).permute(0, 2, 1).reshape(-1)[:n]


@needs_triton
def test_triton_reference_is_the_step_kernels_noise():
    z = torch.zeros(1 << 16)
    assert torch.equal(triton_noise(1 << 16, 1234, 7), ks.em(z, z, 0.0, 0.0, 1.0, seed=1234, step=7))


@needs_triton
@pytest.mark.parametrize("seed,step", [(1234, 7), (2**32 - 1, 2**32 - 1)])
def test_noise_matches_triton(seed, step):
    n = 1 << 20
    want = triton_noise(n, seed, step)
    got = noise((n,), seed, step)
    # The integer part (Philox, uint -> uniform) is exact; log, sin and cos are ours and numpy's,
    # each within a few ulps, and |z| <= 5.68: a difference of a few 1e-7 at most.
    assert float((got - want).abs().max()) <= 1e-5
    # Other shapes and the ragged tail of a group draw the same stream.
    assert torch.equal(noise((7, 5003), seed, step).flatten(), got[: 7 * 5003])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_plan_noise_matches_tritonsteps(dtype):
    """CppSteps and TritonSteps with the same key tensor draw the same noise at the same step, in each
    state dtype the interpreter has (a 16-bit result may round the other way: one ulp of its dtype)."""
    x = torch.zeros(3, 3000, dtype=dtype)
    table = {"em": torch.tensor([[0.0, 0.0, 1.0]] * 5)}
    key = torch.tensor(2**32 + 77)  # only the low 32 bits are the key, for both
    want = ks.TritonSteps(key).plan(x, table).em(x, x, "em", 4, True).double()
    got = cs.CppSteps(key).plan(x, table).em(x, x, "em", 4, True).double()
    ulp = torch.finfo(dtype).eps * want.abs() if dtype == torch.float16 else 0.0
    assert bool(((got - want).abs() <= 1e-5 + ulp).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed,step", [(1, 2), (2**32 - 1, 77)])
def test_noise_matches_its_reference(dtype, seed, step):
    """kernels/noise.py's z for each storage dtype (randn4x for fp32/fp64 states, box_muller16 for
    fp16/bf16), before rounding: our log/sin/cos against torch's, a few fp32 ulps of |z| <= 5.8.
    The pass then rounds that z once to the state's dtype."""
    n = 3 * 4096 + 5
    z = cs.require().noise(seed, step, n, dtype in (torch.float16, torch.bfloat16))
    assert float((z - normal(seed, step, n, dtype)).abs().max()) <= 1e-5
    assert torch.equal(noise((n,), seed, step, dtype), z.to(dtype))


def test_noise_depends_only_on_key_and_offset():
    ext = cs.require()
    z = noise((3, 9000), seed=9, step=2)
    assert torch.equal(z.flatten(), ext.noise(9, 2, 27000, False))
    # fp64 states hold the fp32 noise exactly; other shapes of the same elements draw the same.
    assert torch.equal(noise((3, 9000), 9, 2, torch.float64), z.double())
    assert torch.equal(noise((27000,), 9, 2), z.flatten())
    c = torch.tensor([0.5, -2.0, 3.0])
    assert torch.equal(noise((3, 9000), 9, 2, c_z=c), c[:, None] * z)
    # Threads: each group's noise is its own, whoever computes it.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(noise((3, 9000), 9, 2), z)
        assert torch.equal(noise((3, 9000), 9, 2, torch.float16), ext.noise(9, 2, 27000, True).half().view(3, 9000))
    finally:
        torch.set_num_threads(threads)


# Statistics on 2^22 draws (the C++ stream is fast): a sample mean has sd 1/sqrt(n), a variance
# sqrt(2/n), a correlation ~1/sqrt(n); bounds of 6 sd fail with probability 2e-9 each, KS is held
# to p > 1e-6. A broken key or layout (repeated streams, a shared Box-Muller radius) gives
# correlations near 1, far beyond these bounds.
N_BIG = 1 << 22


@pytest.fixture(scope="module", params=["randn4x", "box_muller16"])
def big_noise(request):
    """Both transforms, unrounded (the 16-bit one as the fp32 z the pass rounds once)."""
    return cs.require().noise(2026, 11, N_BIG, request.param == "box_muller16").double()


def corr(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def test_noise_moments_and_ks(big_noise):
    z, n = big_noise, big_noise.numel()
    assert abs(float(z.mean())) <= 6 / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) <= 6 * math.sqrt(2.0 / n)
    kurt = float(((z - z.mean()) ** 4).mean() / z.var() ** 2)
    assert abs(kurt - 3.0) <= 6 * math.sqrt(24.0 / n)
    assert stats.kstest(z[: 1 << 20].numpy(), "norm").pvalue > 1e-6


def test_noise_lags_uncorrelated(big_noise):
    z, R = big_noise, cs.NOISE_R
    bound = 6 / math.sqrt(z.numel())
    # lag R: the two normals of one Box-Muller pair (same radius: check the squares too);
    # lag 2R: the other pair of the same counter; 4R: the next group.
    for lag in (1, R, 2 * R, 3 * R, 4 * R):
        assert abs(corr(z[:-lag], z[lag:])) <= bound, f"lag {lag}"
        assert abs(corr(z[:-lag] ** 2, z[lag:] ** 2)) <= bound, f"lag {lag}, squares"


@pytest.mark.parametrize("b16", [False, True])
def test_noise_keys_independent(b16):
    n = 1 << 20
    draw = cs.require().noise
    base = draw(5, 3, n, b16)
    bound = 6 / math.sqrt(n)
    # Another step or seed, and the swaps that a key seed + step (or seed * k + step) would alias.
    for seed, step in [(5, 4), (6, 3), (3, 5), (4, 4), (6, 2), (5 + 2**16, 3)]:
        assert abs(corr(base, draw(seed, step, n, b16))) <= bound, (seed, step)


# --- CppSteps: the sampling loop's backend ---------------------------------------------------------

PLAN_OPS = {"predict": (2, 2, False), "em": (2, 3, True), "em_quiet": (2, 3, False),
            "project": (2, 2, True), "project_quiet": (2, 2, False), "heun": (4, 4, False)}


@settings(max_examples=30)
@given(op=st.sampled_from(sorted(PLAN_OPS)), shape=shapes, n=st.integers(1, 4), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(DTYPES), net_dtype=st.sampled_from(DTYPES + [None]), transposed=st.booleans(),
       data=st.data())
def test_plan_path_equals_public_launchers(op, shape, n, seed, dtype, net_dtype, transposed, data):
    """A planned step is the public launcher on the same row, and a network output of any floating
    dtype or layout gives what wgfcore.ops computes from it."""
    n_t, n_c, noisy = PLAN_OPS[op]
    g = torch.Generator().manual_seed(seed % 2**31)
    T = [torch.randn(shape, generator=g).to(dtype) for _ in range(n_t)]
    net = [1, 3] if n_t == 4 else [1]
    raw = {}
    for k in net:  # what a network returns: another dtype, maybe a transposed (non-contiguous) layout
        t = torch.randn(tuple(reversed(shape)), generator=g).to(net_dtype or dtype)
        t = t.permute(*reversed(range(t.ndim)))
        raw[k] = t if transposed else t.contiguous()
    table = torch.randn(n, n_c, generator=g, dtype=torch.float64)
    i = data.draw(st.integers(0, n - 1), label="step")
    name = op.split("_")[0]
    plan = cs.CppSteps(seed).plan(T[0], {name: table})
    A = list(T)
    for k in net:
        A[k] = plan.accept(raw[k])
        assert A[k].is_contiguous() and A[k].dtype in (dtype, torch.float32)
        assert torch.equal(A[k].to(raw[k].dtype), raw[k]) or raw[k].dtype == torch.float64
    c = list(table[i].to(torch.float32).unbind())
    if name == "predict":
        got, ref = plan.predict(*A, name, i), ops.predict(T[0], raw[1], *c)
    elif name == "em":
        got = plan.em(*A, name, i, noisy)
        ref = cs.em(T[0], A[1].to(dtype), c[0], c[1], c[2], seed=seed, step=i) if noisy else \
            ops.em_step(T[0], raw[1], None, c[0], c[1], None)
    elif name == "project":
        got = plan.project(*A, name, i, noisy)
        ref = cs.project(T[0], A[1].to(dtype), c[0], c[1], seed=seed, step=i) if noisy else \
            ops.project(T[0], raw[1], None, c[0], None)
    else:
        got, ref = plan.heun(*A, name, i), ops.heun_correct(T[0], raw[1], T[2], raw[3], *c)
    assert got.dtype == dtype
    if noisy and A[1].dtype != dtype:  # the public launcher takes one dtype: compare in that case only
        return
    assert torch.equal(got, ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_plan_flags_nonfinite_network_outputs(bad):
    """The pass checks the network output it reads (s, T, s') into finite_flag: the first bad step, also in a
    network output of another dtype (taken through accept)."""
    assert cs.FLAG_CLEAR == FLAG_CLEAR
    check_finite_flag(cs.CppSteps(1), bad, last_output=lambda plan, s: plan.accept(s.half()))


def test_cppsteps_mirrors_torchsteps():
    import inspect
    assert cs.CppSteps.name == "cpp"
    for m in ("plan", "accept", "predict", "em", "project", "heun"):
        params = [inspect.signature(getattr(cls, m)).parameters for cls in (cs.CppSteps, TorchSteps)]
        assert list(params[0].values()) == list(params[1].values()), m


# --- in the samplers ----------------------------------------------------------------------------

def exact_score(x, t):
    """The score of N(0, I) data under the VP-SDE, s = -x (exact at every t)."""
    return -x


def test_heun_matches_torch_backend_bitwise():
    x0 = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = ops.time_grid(20)
    got = heun_ode(exact_score, x0, ts, step_backend=cs.CppSteps(0))
    assert torch.equal(got, heun_ode(exact_score, x0, ts, step_backend=TorchSteps()))


@needs_triton
def test_predict_project_matches_triton_backend():
    """Same key, same prior draw: the C++ and Triton samplers agree to their noise's rounding."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2048, generator=g)
    ts = ops.time_grid(10)
    kw = dict(proj_fn=lambda x, t: -0.5 * x, delta_p=1.0)
    got = predict_project(exact_score, x0, ts, step_backend=cs.CppSteps(99), **kw)
    want = predict_project(exact_score, x0, ts, step_backend=ks.TritonSteps(99), **kw)
    # With s = -x and T = -x_pred / 2 a step is x <- m_i x + c_z,i z, m_i = (c_x - c_s)(1 - c_T / 2).
    # A difference d between the runs evolves as d <- m_i d + c_z,i dz + (rounding of two fp32
    # sums), with |dz| <= 1e-5 (the noise test) and |m_i| <= 1 (checked): so |d_N| is at most
    # sum_i c_z,i 1e-5 plus a few ulps of |x| per step.
    C = ops.reverse_coefficients(VPSDE(), ts, 1.0)
    c_T = ops.project_coefficients(VPSDE(), ts, 1.0)
    m = (C["c_x"] - C["c_s"]) * (1 - c_T / 2)
    assert bool((m.abs() <= 1).all())
    scale = max(float(x0.abs().max()), float(want.abs().max()))
    bound = 1e-5 * float(C["c_z"][:-1].sum()) + len(m) * 4 * torch.finfo(torch.float32).eps * scale
    assert float((got - want).abs().max()) <= bound


def test_euler_maruyama_runs_and_flags_nan():
    x0 = torch.randn(8, 100, generator=torch.Generator().manual_seed(3))
    ts = ops.time_grid(5)
    out = euler_maruyama(exact_score, x0, ts, step_backend=cs.CppSteps(4))
    assert out.shape == x0.shape and bool(torch.isfinite(out).all())
    assert torch.equal(out, euler_maruyama(exact_score, x0, ts, step_backend=cs.CppSteps(4)))

    def bad(x, t):
        return torch.where(t[:, None] < 0.5, torch.nan, -x)

    with pytest.raises(FloatingPointError, match="NaN or inf at step 3"):
        euler_maruyama(bad, x0, ts, step_backend=cs.CppSteps(4))


def test_sample_with_the_cpp_backend():
    """sample(backend="cpp"): the seed's samples are the sampler functions' with CppSteps and the
    key drawn after the prior; a NaN from a network and an fp16 state that overflows are both named."""
    from wgfcore.backends import draw_key

    x = sample(exact_score, (16, 300), 10, sampler="euler_maruyama", seed=5, backend="cpp")
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(16, 300, generator=g)
    assert torch.equal(x, euler_maruyama(exact_score, x0, ops.time_grid(10), step_backend=cs.CppSteps(draw_key(g, "cpu"))))
    with pytest.raises(FloatingPointError, match=r"a network produced NaN or inf at step 3"):
        sample(lambda x, t: torch.where(t[:, None] < 0.5, torch.nan, -x), (4, 2), 5, sampler="euler_maruyama",
               seed=0, backend="cpp")
    with pytest.raises(FloatingPointError, match=r"state became NaN or inf at step \d+ .* overflowed torch.float16"):
        sample(lambda x, t: 1e4 * torch.ones_like(x), (4, 2), 20, sampler="reverse_sde", a=0.0, seed=0,
               dtype=torch.float16, backend="cpp")


# --- threads --------------------------------------------------------------------------------------

def test_kernels_use_torchs_thread_count():
    """at::parallel_for in the extension shares torch's OpenMP runtime: set_num_threads governs it."""
    ext = cs.require()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert ext.threads_used(1 << 20) == 1
        if os.cpu_count() >= 2:
            torch.set_num_threads(2)
            assert ext.threads_used(1 << 20) == 2
    finally:
        torch.set_num_threads(threads)


# --- bad input: the same errors as kernels.sampler_step ---------------------------------------------

def _bad_calls(m):
    """Calls that each launcher module must reject, by name; m is kernels.cpu_steps or sampler_step."""
    x, s = torch.zeros(2, 8), torch.zeros(2, 8)
    return {
        "dtype mismatch": lambda: m.predict(x, s.half(), 1.0, 1.0),
        "z dtype": lambda: m.em(x, s, 1.0, 1.0, 1.0, z=s.half()),
        "int dtype": lambda: m.em(x.int(), s.int(), 1.0, 1.0),
        "device mismatch": lambda: m.predict(x, torch.empty(2, 8, device="meta"), 1.0, 1.0),
        "coef device": lambda: m.predict(x, x, 1.0, torch.empty((), device="meta")),
        "coef shape": lambda: m.em(x, s, torch.ones(3), 1.0),
        "coef 2-d": lambda: m.heun(x, s, x, s, 1.0, 1.0, torch.ones(2, 1), 1.0),
        "coef int": lambda: m.predict(x, s, torch.ones(2, dtype=torch.int64), 1.0),
        "coef str": lambda: m.predict(x, s, "1.0", 1.0),
        "shape": lambda: m.project(x, torch.zeros(2, 9), 1.0),
        "out layout": lambda: m.predict(x, s, 1.0, 1.0, out=torch.zeros(8, 2).t()),
        "0-d": lambda: m.predict(torch.zeros(()), torch.zeros(()), 1.0, 1.0),
        "not a tensor": lambda: m.predict([1.0], x, 1.0, 1.0),
        "no key": lambda: m.em(x, s, 1.0, 1.0, 0.5),
        "z without c_z": lambda: m.project(x, s, 1.0, z=s),
        "z and seed": lambda: m.em(x, s, 1.0, 1.0, 0.5, z=s, seed=1, step=0),
        "seed range": lambda: m.em(x, s, 1.0, 1.0, 0.5, seed=-1, step=0),
        "step type": lambda: m.em(x, s, 1.0, 1.0, 0.5, seed=1, step=torch.tensor(0)),
    }


def _steps_calls(S):
    x = torch.zeros(2, 8)
    ok = torch.zeros(3, 3)
    return {
        "unknown table": lambda: S(1).plan(x, {"euler": ok}),
        "table shape": lambda: S(1).plan(x, {"em": torch.zeros(3, 2)}),
        "table device": lambda: S(1).plan(x, {"em": torch.zeros(3, 3, device="meta")}),
        "state layout": lambda: S(1).plan(torch.zeros(8, 2).t(), {"em": ok}),
        "state dtype": lambda: S(1).plan(x.int(), {"em": ok}),
        "seed tensor": lambda: S(torch.zeros(1, dtype=torch.int64)),
        "seed range": lambda: S(2**32),
        "step range": lambda: S(1).plan(x, {"em": ok}).em(x, x, "em", 3, True),
    }


def _error(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the test compares whatever is raised
        return type(e), str(e)
    raise AssertionError("no error raised")


@needs_triton
@pytest.mark.parametrize("case", sorted(_bad_calls(cs)))
def test_launcher_errors_match_triton(case):
    got, want = _error(_bad_calls(cs)[case]), _error(_bad_calls(ks)[case])
    assert got[0] is want[0], (got, want)
    if case == "device mismatch":
        return  # the one rule that differs: CPU tensors here, CUDA there (checked below)
    assert got[1] == want[1]


@needs_triton
@pytest.mark.parametrize("case", sorted(_steps_calls(cs.CppSteps)))
def test_steps_errors_match_triton(case):
    got, want = _error(_steps_calls(cs.CppSteps)[case]), _error(_steps_calls(ks.TritonSteps)[case])
    assert got[0] is want[0], (got, want)
    assert got[1] == want[1].replace("TritonSteps", "CppSteps")


def test_errors_of_the_cpu_rule():
    m = torch.empty(2, 8, device="meta")
    with pytest.raises(ValueError, match="the C\\+\\+ step kernels take CPU tensors, got meta"):
        cs.predict(m, m, 1.0, 1.0)
    with pytest.raises(ValueError, match="run on the CPU, got device=meta"):
        cs.CppSteps(1, device="meta")
    # bfloat16 is a CPU dtype like any other here (the interpreter has none).
    x = torch.ones(2, 8, dtype=torch.bfloat16)
    assert torch.equal(cs.predict(x, x, 1.0, 1.0), ops.predict(x, x, 1.0, 1.0))


# --- the build: no compiler, no triton --------------------------------------------------------------

def _python(code, env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env}, timeout=300)


def test_without_a_compiler(tmp_path):
    """No compiler: one line that says so; backend="auto" warns once and samples with torch's steps,
    backend="cpp" fails with that line; nothing is built."""
    code = """
        import warnings
        import torch
        from kernels import cpu_steps as cs
        from wgfcore.sample import sample
        print(cs.status())
        assert not cs.available()
        try:
            cs.CppSteps(1).plan(torch.zeros(2, 3), {})
        except RuntimeError as e:
            print(e)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a = sample(lambda x, t: -x, (4, 2), 5, sampler="euler_maruyama", seed=3)
            b = sample(lambda x, t: -x, (4, 2), 5, sampler="euler_maruyama", seed=3)
        print(len(w), w[0].message)
        assert torch.equal(a, sample(lambda x, t: -x, (4, 2), 5, sampler="euler_maruyama", seed=3, backend="torch"))
        try:
            sample(lambda x, t: -x, (4, 2), 5, sampler="euler_maruyama", seed=3, backend="cpp")
        except ImportError as e:
            print(e)
    """
    r = _python(code, {"CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert r.returncode == 0, r.stderr
    status, error, warned, explicit = r.stdout.strip().splitlines()
    assert status == f"no C++ compiler: '{tmp_path / 'no-such-c++'}' was not found (install g++ or clang++, or set " \
                     "CXX to one)"
    assert error == f"CppSteps needs the C++ step kernels, which are not available: {status}"
    assert warned == f"1 backend='auto' uses 'torch' on cpu: 'cpp' is not available ({status})"
    assert explicit == f"backend='cpp' cannot run on cpu: {status}"
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").rglob("*.so"))


def test_a_failing_compiler(tmp_path):
    """A compiler that fails: one line with its first diagnostic and where the full log is."""
    cxx = tmp_path / "broken-c++"
    cxx.write_text("#!/bin/sh\ncase \"$*\" in *version*) echo 12.2.0; exit 0;; esac\n"
                   "echo 'cpu_steps.cpp:1:1: error: this compiler is broken' >&2\nexit 1\n")
    cxx.chmod(0o755)
    r = _python("from kernels import cpu_steps as cs; print(cs.status())",
                {"CXX": str(cxx), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    head = "the C++ build failed (cpu_steps.cpp:1:1: error: this compiler is broken); full log: "
    assert line.startswith(head) and "\n" not in line, line
    assert "this compiler is broken" in open(line[len(head):]).read()
    assert "Traceback" not in r.stderr and "cpp_extension" not in r.stderr, r.stderr


def test_imports_without_triton():
    """kernels.cpu_steps needs only torch: with triton unimportable, the backend still works."""
    code = """
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import torch
        from kernels import cpu_steps as cs
        x = torch.zeros(2, 5000)
        p = cs.CppSteps(3).plan(x, {"em": torch.tensor([[0.0, 0.0, 1.0]])})
        print(float(p.em(x, x, "em", 0, True).std()))
    """
    r = _python(code, {})
    assert r.returncode == 0, r.stderr
    assert abs(float(r.stdout) - 1.0) < 0.1
