"""The sampling core (ALGORITHMS §2, §3, §4): the sampler and backend registries, the arithmetic of the torch
path against a hand-written loop, the guard, the Tweedie projection at no extra cost, and API errors."""
import math
import warnings

import pytest
import torch

import wgfcore.backends as Bk
import wgfcore.loop as L
from wgfcore import ops
from wgfcore.adapters import ddpm_betas, from_diffusers
from wgfcore.metrics import w2_gaussian
from wgfcore.sample import SAMPLERS, NFE_PER_STEP, nfe, register_sampler, sample, tweedie_proj_fn
from wgfcore.scores import gaussian
from wgfcore.sde import VPSDE, tweedie

SDE = VPSDE()


def neg(x, t):
    return -x


# --- one place per sampler ------------------------------------------------------------------------

@pytest.fixture
def registry(monkeypatch):
    """Registrations made in a test are undone after it."""
    monkeypatch.setattr(L, "SPECS", dict(L.SPECS))
    yield


def test_a_new_sampler_is_one_registration(registry):
    # The whole sampler: Euler on dx/dtau = -s (a toy), one network call per step, counted.
    @register_sampler("toy_euler", nfe_per_step=1, options={"a": 2.0},
                      tables=lambda sde, ts, a: {"em": torch.stack([torch.ones(len(ts) - 1), -a * (ts[:-1] - ts[1:]),
                                                                   torch.zeros(len(ts) - 1)], 1)})
    def toy_euler(r, x):
        """x <- x - a dtau s."""
        for i in r.steps():
            x = r.B.em(x, r.score(x, r.t[i]), "em", i, r.noisy[i])
        return x

    calls = []

    def score(x, t):
        calls.append(float(t[0]))
        return torch.ones_like(x)

    x, n = sample(score, (3, 2), 4, sampler="toy_euler", seed=0, return_nfe=True)
    x0 = torch.randn((3, 2), generator=torch.Generator().manual_seed(0))
    assert n == 4 == len(calls) == nfe("toy_euler", 4) and NFE_PER_STEP["toy_euler"] == 1
    assert torch.allclose(x, x0 - 2.0 * 0.999, atol=1e-6)  # sum of a dtau over the grid
    assert calls == pytest.approx(ops.time_grid(4)[:-1].tolist())
    x2 = sample(score, (3, 2), 4, sampler="toy_euler", a=0.5, seed=0)
    assert torch.allclose(x2, x0 - 0.5 * 0.999, atol=1e-6)
    with pytest.raises(ValueError, match="toy_euler takes no delta_p"):
        sample(score, (3, 2), 4, sampler="toy_euler", delta_p=1.0)
    assert SAMPLERS["toy_euler"] is toy_euler and toy_euler.__doc__ == "x <- x - a dtau s."
    assert torch.equal(toy_euler(score, x0, ops.time_grid(4)), x)


def test_registration_is_checked(registry):
    with pytest.raises(ValueError, match="options must be among"):
        register_sampler("x", nfe_per_step=1, tables=dict, options={"beta": 1.0})
    with pytest.raises(ValueError, match="nfe_per_step"):
        register_sampler("x", nfe_per_step=0, tables=dict)


# --- one place per backend ------------------------------------------------------------------------

def test_a_new_backend_is_one_registration(monkeypatch):
    monkeypatch.setattr(Bk, "BACKENDS", dict(Bk.BACKENDS))
    built = []

    class Recording(ops.TorchSteps):
        name = "recording"

    def build(device, generator):
        built.append(device)
        return Recording(generator)

    monkeypatch.setattr(Bk, "_passed_over", set())
    Bk.register_backend("recording", build, keyed=False, auto={"cpu": 50})  # above every built-in one
    a = sample(neg, (4, 2), 5, sampler="euler_maruyama", seed=1)  # "auto" now picks it on CPU
    assert built == [torch.device("cpu")]
    assert torch.equal(a, sample(neg, (4, 2), 5, sampler="euler_maruyama", seed=1, backend="torch"))
    Bk.register_backend("nowhere", build, keyed=False, unavailable=lambda d: "it runs nowhere", auto={"cpu": 90})
    with pytest.warns(UserWarning, match="'auto' uses 'recording' on cpu: 'nowhere' is not available "
                                         r"\(it runs nowhere\)"):
        assert Bk.resolve_backend("auto", "cpu") == "recording"  # the unavailable one is passed over
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not once per call
        assert Bk.resolve_backend("auto", "cpu") == "recording"
    with pytest.raises(ImportError, match="backend='nowhere' cannot run on cpu: it runs nowhere"):
        sample(neg, (4, 2), 5, sampler="euler_maruyama", backend="nowhere")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        sample(neg, (4, 2), 5, sampler="euler_maruyama", backend="cuda")


# --- the torch path computes exactly the hand-written loop's arithmetic ---------------------------

def hand_loop(kind, shape, N, seed, dtype=torch.float32, delta_p=None, proj=None):
    """The loop a user would write: python-float coefficients, one expression per update."""
    ts = ops.time_grid(N)
    B = shape[0]
    C = {"em": ops.reverse_coefficients(SDE, ts, 1.0), "ode": ops.reverse_coefficients(SDE, ts, 0.0),
         "pp": ops.reverse_coefficients(SDE, ts, 1.0), "langevin": ops.langevin_coefficients(SDE, ts)}[kind]
    cx, cs, cz = C["c_x"].tolist(), C["c_s"].tolist(), C["c_z"].tolist()
    cT = ops.project_coefficients(SDE, ts, delta_p).tolist() if kind == "pp" else None
    t = ts.float()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    for i in range(N):
        s = -x
        xf = x.float()
        if kind == "pp":
            x_pred = (cx[i] * xf + cs[i] * (-xf)).to(dtype)
            x = x_pred.float() + cT[i] * proj(x_pred, t[i + 1].expand(B)).float()
        else:
            x = cx[i] * xf + cs[i] * s.float()
        if kind != "ode" and i < N - 1:
            x = x + cz[i] * torch.randn(shape, generator=g, dtype=dtype).float()
        x = x.to(dtype)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("kind, kw", [("em", dict(sampler="euler_maruyama")), ("ode", dict(sampler="reverse_sde", a=0.0)),
                                      ("langevin", dict(sampler="langevin")),
                                      ("pp", dict(sampler="predict_project", delta_p=0.7))])
def test_torch_path_is_the_hand_loop_bit_for_bit(kind, kw, dtype):
    def proj(x, t):
        return 0.3 * x - t.view(-1, *[1] * (x.ndim - 1)).to(x.dtype)

    if kind == "pp":
        kw = dict(kw, proj_fn=proj)
    for shape, N in (((64, 2), 30), ((2, 3, 5, 5), 7), ((4, 3, 64, 64), 4)):  # the last uses the scratch buffers
        got = sample(neg, shape, N, seed=4, dtype=dtype, backend="torch", **kw)
        assert torch.equal(got, hand_loop(kind, shape, N, 4, dtype, kw.get("delta_p"), proj)), (shape, N)


def test_heun_fused_corrector_is_as_accurate_as_the_unfused_sum():
    # ops._heun rounds each c t once (fused multiply-add) where the 4-term sum rounds twice: against
    # the same update in float64 its error is no larger (flash-attention rule: at most 2x torch's own).
    g = torch.Generator().manual_seed(0)
    x, s, xp, sp = (torch.randn(4096, generator=g) for _ in range(4))
    c = ops.heun_coefficients(SDE, ops.time_grid(20))
    for i in (0, 10, 19):
        cf = [torch.tensor(float(c[k][i]), dtype=torch.float32) for k in ("c_x", "c_s", "c_xp", "c_sp")]
        exact = sum(ci.double() * v.double() for ci, v in zip(cf, (x, s, xp, sp)))
        fused = ops.heun_correct(x, s, xp, sp, *cf)
        plain = cf[0] * x + cf[1] * s + cf[2] * xp + cf[3] * sp
        e_fused, e_plain = (fused.double() - exact).abs().max(), (plain.double() - exact).abs().max()
        assert e_fused <= 2 * e_plain and e_fused <= 4 * torch.finfo(torch.float32).eps * exact.abs().max()


# --- the guard: one check per run, the first bad step found on the failure path -----------------

def test_guard_names_a_state_that_overflows_with_finite_networks():
    with pytest.raises(FloatingPointError, match=r"state became NaN or inf at step \d+ .* overflowed torch.float16"):
        sample(lambda x, t: 1e4 * torch.ones_like(x), (4, 2), 20, sampler="reverse_sde", a=0.0, seed=0,
               dtype=torch.float16)


def test_guard_accepts_a_finite_state_whose_sum_overflows(registry):
    # The final check sums x first (a finite sum proves every entry finite); an fp16 sum of large
    # finite entries overflows, and must fall through to the exact check, not to an error.
    @register_sampler("to_big", nfe_per_step=1, tables=lambda sde, ts: {"em": torch.zeros(len(ts) - 1, 3)})
    def to_big(r, x):
        for i in r.steps():
            x = r.B.em(x, r.score(x, r.t[i]), "em", i, r.noisy[i]) + 6e4
        return x

    x = sample(neg, (64, 2), 2, sampler="to_big", dtype=torch.float16, seed=0)
    assert torch.isfinite(x).all() and not torch.isfinite(x.sum())


def test_guard_says_when_the_rerun_does_not_reproduce():
    calls = [0]

    def flaky(x, t):  # NaN on its 3rd call only: a re-run sees finite outputs
        calls[0] += 1
        return torch.full_like(x, float("nan")) if calls[0] == 3 else -x

    with pytest.raises(FloatingPointError, match="not deterministic"):  # the torch path's re-run (no flag)
        sample(flaky, (4, 2), 5, sampler="euler_maruyama", seed=0, backend="torch")


def test_guard_reports_the_first_bad_step_with_noise_and_a_given_generator():
    def score(x, t):
        return torch.where(t[:, None] < 0.7, torch.full_like(x, float("inf")), -x)

    g = torch.Generator().manual_seed(9)
    with pytest.raises(FloatingPointError, match=r"score_fn produced NaN or inf at step 4 \(t = 0.6926\)"):
        sample(score, (4, 2), 13, sampler="euler_maruyama", generator=g, backend="torch")  # its re-run
    with pytest.raises(FloatingPointError, match=r"(score_fn|a network) produced NaN or inf at step 4 \(t = 0.6926\)"):
        sample(score, (4, 2), 13, sampler="euler_maruyama", generator=g)  # auto: the cpp backend's flag, if built


# --- the Tweedie projection at no extra cost (issue 20 item 4; ours) -------------------------------

def test_tweedie_free_step_is_predict_then_project_with_the_steps_own_score():
    # One step in float64, written out literally: predict, Tweedie from s(x, t_i), T, project, noise.
    g = gaussian([1.0, -0.5], [[0.6, 0.2], [0.2, 1.5]])
    score = g.score_fn(SDE)
    N, dp = 10, 3.0
    ts = ops.time_grid(N)
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    C, cT = ops.reverse_coefficients(SDE, ts, 1.0), ops.project_coefficients(SDE, ts, dp)
    T_coef = ops.tweedie_project_coefficients(SDE, ts, dp)
    for i in (0, 4, 9):
        t_i = ts[i].expand(256)
        s = score(x, t_i)
        x_pred = C["c_x"][i] * x + C["c_s"][i] * s
        kappa = math.sqrt(float(SDE.beta(ts[i]))) / 2
        T = (float(SDE.alpha(ts[i + 1])) * tweedie(x, s, t_i, SDE) - x_pred) / (1 + kappa)
        literal = x_pred + cT[i] * T
        fused = T_coef["c_x"][i] * x + T_coef["c_s"][i] * s
        assert torch.allclose(fused, literal, rtol=1e-12, atol=1e-12), i
        assert float(T_coef["c_z"][i]) == float(C["c_z"][i])


def test_tweedie_free_sampler_costs_one_nfe_per_step_and_is_em_at_zero_delta_p():
    g = gaussian([1.0, -0.5], [[0.6, 0.2], [0.2, 1.5]])
    x, n = sample(g.score_fn(SDE), (64, 2), 20, sampler="predict_project_tweedie", seed=2, return_nfe=True)
    assert n == 20 == nfe("predict_project_tweedie", 20) and torch.isfinite(x).all()
    em = sample(g.score_fn(SDE), (64, 2), 20, sampler="euler_maruyama", seed=2)
    assert torch.equal(sample(g.score_fn(SDE), (64, 2), 20, sampler="predict_project_tweedie", delta_p=0.0, seed=2), em)
    assert not torch.equal(x, em)
    with pytest.raises(ValueError, match="predict_project_tweedie takes no proj_fn"):
        sample(g.score_fn(SDE), (4, 2), 5, sampler="predict_project_tweedie", proj_fn=neg)


# --- API errors (issue 19 item 6) ------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["heun_ode", "euler_maruyama", "langevin", "reverse_sde"])
def test_a_projection_given_to_a_sampler_without_one_is_an_error(sampler):
    with pytest.raises(ValueError, match=f"{sampler} takes no proj_fn"):
        sample(neg, (4, 2), 3, sampler=sampler, proj_fn=neg)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampler="euler_maruyama", delta_p=0.5), "euler_maruyama takes no delta_p"),
    (dict(sampler="heun_ode", a=1.0), "heun_ode takes no a"),
    (dict(sampler="predict_project", proj_fn=neg, t_target=0.5), "predict_project takes no t_target"),
    (dict(sampler="langevin", t_target=1.5), r"t_target must lie in \(0, 1\]"),
    (dict(sampler="predict_project", proj_fn="T"), "proj_fn must be callable"),
])
def test_other_unused_or_bad_options_are_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sample(neg, (4, 2), 3, **kwargs)


def test_langevin_t_target_reaches_the_network_from_sample():
    seen = []
    sample(lambda x, t: seen.append(float(t[0])) or -x, (2, 2), 3, sampler="langevin", t_target=0.25, seed=0)
    assert seen == [0.25] * 3


@pytest.mark.parametrize("shape", [(2.7, 2), (2, 2.0), (True, 2), (), "ab", (2, -1), None])
def test_shape_must_be_positive_integers(shape):
    with pytest.raises(ValueError, match="shape must be"):
        sample(neg, shape, 3, sampler="euler_maruyama")


@pytest.mark.parametrize("steps, eps", [(0, 1e-3), (2.5, 1e-3), (True, 1e-3), (10, 0.0), (10, 1.0)])
def test_tweedie_proj_fn_checks_its_arguments(steps, eps):
    with pytest.raises(ValueError, match="steps must be|eps must lie"):
        tweedie_proj_fn(neg, steps, eps=eps)


@pytest.mark.parametrize("start, end, schedule", [(-1e-4, 0.02, "linear"), (1e-4, float("nan"), "linear"),
                                                  (1e-4, 1.5, "scaled_linear"), (0.0, 0.5, "sigmoid"),
                                                  (1e-4, 1.0, "linear"), ("1e-4", 0.02, "linear")])
def test_ddpm_betas_must_lie_in_the_unit_interval(start, end, schedule):
    with pytest.raises(ValueError, match=r"must be a number in \(0, 1\)"):
        ddpm_betas(10, schedule, start, end)


def test_w2_gaussian_refuses_what_is_not_a_covariance():
    m = torch.zeros(2)
    good = torch.eye(2)
    assert w2_gaussian(m, good, m, good) == 0.0
    with pytest.raises(ValueError, match="S2 is not positive semi-definite"):
        w2_gaussian(m, good, m, torch.tensor([[1.0, 0.0], [0.0, -0.5]]))
    with pytest.raises(ValueError, match="S1 is not symmetric"):
        w2_gaussian(m, torch.tensor([[1.0, 0.5], [0.0, 1.0]]), m, good)
    with pytest.raises(ValueError, match="NaN"):
        w2_gaussian(m, torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), m, good)


@pytest.mark.parametrize("ret", [None, (), "eps", [None]])
def test_from_diffusers_says_what_the_model_should_return(ret):
    score = from_diffusers(lambda x, t: ret)
    with pytest.raises(TypeError, match="the diffusers model returned .*expected a tensor"):
        score(torch.randn(2, 3), torch.full((2,), 0.5))


def test_options_value_errors_come_before_unused_ones():
    # what both backends raise first for a bad number, whichever sampler (tests/test_sample.py parity)
    with pytest.raises(ValueError, match="a must be a finite number"):
        sample(neg, (4, 2), 3, sampler="heun_ode", a=float("inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is silently dropped any more: no warning either
        sample(neg, (4, 2), 3, sampler="reverse_sde", a=0.5, seed=0)


# --- peer cross-check: the VP Euler-Maruyama step is diffusers' ScoreSdeVpScheduler step ----------

def test_em_step_matches_diffusers_score_sde_vp_to_fp32_rounding():
    pytest.importorskip("diffusers")
    # deprecated in diffusers and gated behind `transformers` in its package init: import the module itself
    from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

    sched = ScoreSdeVpScheduler(sampling_eps=1e-3)
    N = 50
    sched.set_timesteps(N)
    g = gaussian([1.0, -0.5], [[0.6, 0.2], [0.2, 1.5]])
    x = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps[[0, 17, -1]]:
        tb = t.expand(512)
        s = g.score(x, tb, SDE).float()
        # the model output the scheduler expects, with sigma_t as it computes it (in fp32: near t = eps
        # its 1 - exp(...) cancels, so SDE.sigma would differ from it by ~1e-4 relative)
        lm = -0.25 * tb**2 * (sched.config.beta_max - sched.config.beta_min) - 0.5 * tb * sched.config.beta_min
        eps = -torch.sqrt(1.0 - torch.exp(2.0 * lm))[:, None] * s
        theirs, _ = sched.step_pred(eps, x, tb, generator=torch.Generator().manual_seed(1))
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        beta, dtau = float(SDE.beta(t.double())), 1.0 / N  # diffusers' dt is 1/N
        ours = ops.em_step(x, s, z, 1 + beta * dtau, 2 * beta * dtau, math.sqrt(2 * beta * dtau))
        scale = x.abs() + 2 * beta * dtau * s.abs() + math.sqrt(2 * beta * dtau) * z.abs()
        assert bool(((ours - theirs).abs() <= 8 * torch.finfo(torch.float32).eps * scale).all()), float(t)
