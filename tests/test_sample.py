"""The public sampling API (ALGORITHMS §2, §4): samplers, NFE accounting, determinism, errors."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import wgfcore.sample as S
from wgfcore import ops
from wgfcore.sample import eps_to_score, sample
from wgfcore.scores import gaussian
from wgfcore.sde import VPSDE

SDE = VPSDE()


def iso_score(d, var=0.25, mean=0.5):
    """Analytic score of N(mean, var I) in R^d, at every VP time, for inputs of any shape (B, ...)."""
    return gaussian(torch.full((d,), mean), var * torch.eye(d)).score_fn(SDE)


def zero_proj(x, t):
    return torch.zeros_like(x)


def test_import_surface():
    import wgfcore.sample as mod
    assert callable(mod.sample) and set(mod.SAMPLERS) == {
        "euler_maruyama", "predict_project", "reverse_sde", "heun_ode", "langevin"}


@settings(max_examples=15)
@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=4), sampler=st.sampled_from(sorted(S.SAMPLERS)),
       steps=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_every_sampler_runs_on_any_shape(shape, sampler, steps, dtype):
    d = math.prod(shape[1:]) if len(shape) > 1 else 1
    shape = tuple(shape) if len(shape) > 1 else (shape[0], 1)
    x, n = sample(iso_score(d), shape, steps, sampler=sampler, proj_fn=iso_score(d), seed=0, dtype=dtype,
                  return_nfe=True)
    assert x.shape == shape and x.dtype == dtype and torch.isfinite(x).all()
    assert n == S.nfe(sampler, steps)


def test_nfe_is_counted_not_assumed():
    calls = []

    def score(x, t):
        calls.append("s")
        return -x

    def proj(x, t):
        calls.append("T")
        return torch.zeros_like(x)

    _, n = sample(score, (4, 2), 20, proj_fn=proj, seed=0, return_nfe=True)
    assert n == 40 == len(calls) and calls[:4] == ["s", "T", "s", "T"]
    _, n = sample(score, (4, 2), 20, sampler="heun_ode", seed=0, return_nfe=True)
    assert n == 40


def test_zero_projection_is_euler_maruyama_bit_for_bit():
    score = iso_score(3)
    for denoise_last in (True, False):
        a = sample(score, (64, 3), 25, sampler="predict_project", proj_fn=zero_proj, seed=7,
                   denoise_last=denoise_last)
        b = sample(score, (64, 3), 25, sampler="euler_maruyama", seed=7, denoise_last=denoise_last)
        assert torch.equal(a, b)
    # and a non-zero projection does change the result (the comparison above can fail)
    c = sample(score, (64, 3), 25, sampler="predict_project", proj_fn=lambda x, t: -x, seed=7)
    assert not torch.equal(a, c)


def test_euler_maruyama_is_reverse_sde_with_a_1_and_seeded():
    score = iso_score(2)
    a = sample(score, (16, 2), 10, sampler="euler_maruyama", seed=3)
    b = sample(score, (16, 2), 10, sampler="reverse_sde", a=1.0, seed=3)
    c = sample(score, (16, 2), 10, sampler="reverse_sde", a=1.0, seed=4)
    g = torch.Generator().manual_seed(3)
    d = sample(score, (16, 2), 10, sampler="euler_maruyama", generator=g)
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)


def test_em_weak_error_shrinks_with_steps():
    # N(1, 0.25) in 1-D with its exact score: the error of the sample mean is EM's weak error
    # (order 1, so ~halving per doubling of N); the sampling error, sqrt(0.25 / 1e5) = 1.6e-3, is
    # far below the measured gaps (0.06 -> 0.03 -> 0.015).
    g = gaussian([1.0], [[0.25]])
    m_true = float(SDE.gaussian_marginal(g.means[0], g.covs[0], 1e-3)[0][0])
    errs = []
    for N in (10, 20, 40):
        x = sample(g.score_fn(SDE), (100_000, 1), N, sampler="euler_maruyama", seed=0, dtype=torch.float64)
        errs.append(abs(float(x.mean()) - m_true))
    assert errs[0] > errs[1] > errs[2]
    assert 1.4 < errs[0] / errs[1] < 2.8 and 1.4 < errs[1] / errs[2] < 2.8


def test_pf_ode_is_deterministic_given_the_prior_draw():
    score = iso_score(2)
    a = sample(score, (8, 2), 10, sampler="reverse_sde", a=0.0, seed=1)
    b = sample(score, (8, 2), 10, sampler="heun_ode", seed=1)
    # Heun (2nd order) and Euler (1st) agree only roughly at N=10 but are both smooth maps of x_1
    assert torch.allclose(a, b, atol=0.2)


def test_langevin_targets_the_fixed_law():
    g = gaussian([1.0, -1.0], 0.25 * torch.eye(2))
    x = sample(g.score_fn(SDE), (5_000, 2), 100, sampler="langevin", seed=0, dtype=torch.float64)
    # 5-sigma sampling bounds for n = 5000: mean sqrt(.25/n) -> 0.035, variance .25 sqrt(2/n) -> 0.025;
    # the last Langevin steps are tiny (beta(eps) dtau = 5e-4), so the step-size bias is negligible.
    assert torch.allclose(x.mean(0), torch.tensor([1.0, -1.0], dtype=torch.float64), atol=0.035)
    assert torch.allclose(x.var(0), torch.full((2,), 0.25, dtype=torch.float64), atol=0.025)


def test_callback_receives_the_trajectory():
    seen = []
    score = iso_score(2)
    x = sample(score, (5, 2), 6, proj_fn=zero_proj, seed=0, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    assert torch.equal(seen[-1]["x"], x)
    assert {"t", "t_next", "x_prev", "score", "denoised", "x_pred", "proj"} <= set(seen[0])
    assert seen[0]["t"] == 1.0 and seen[-1]["t_next"] == pytest.approx(1e-3)


def test_fp16_storage_runs():
    x = sample(iso_score(4), (8, 4), 10, proj_fn=zero_proj, seed=0, dtype=torch.float16)
    assert x.dtype == torch.float16 and torch.isfinite(x).all()


def test_default_delta_p_matches_the_paper():
    assert ops.default_delta_p(20) == 1.0
    assert ops.default_delta_p(40) == pytest.approx(0.4)
    assert ops.default_delta_p(100) == pytest.approx(0.1)
    assert 0.1 < ops.default_delta_p(60) < 0.4 and ops.default_delta_p(1000) < 0.01
    assert ops.default_delta_p(10) == 1.0


def test_eps_adapter():
    sde = VPSDE()
    t = torch.full((3,), 0.4)
    x = torch.randn(3, 2)
    score = eps_to_score(lambda x, t: 2 * x, sde)
    assert torch.allclose(score(x, t), -2 * x / sde.sigma(t).float()[:, None])


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.5), ValueError, "steps"),
    (dict(delta_p=-0.1), ValueError, "delta_p"),
    (dict(proj_fn=None), ValueError, "proj_fn"),
    (dict(sampler="ddim"), ValueError, "unknown sampler"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(a=-1.0, sampler="reverse_sde"), ValueError, "a must be"),
    (dict(shape=(0, 2)), ValueError, "shape"),
])
def test_bad_arguments(kwargs, exc, match):
    args = dict(score_fn=iso_score(2), shape=(4, 2), steps=5, proj_fn=zero_proj, seed=0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sample(**args)


def test_wrong_score_shape():
    with pytest.raises(ValueError, match=r"score_fn returned shape \(4, 3\), expected \(4, 2\)"):
        sample(lambda x, t: torch.zeros(4, 3), (4, 2), 5, sampler="euler_maruyama", seed=0)
    with pytest.raises(ValueError, match="proj_fn returned shape"):
        sample(iso_score(2), (4, 2), 5, proj_fn=lambda x, t: x[:, :1], seed=0)


def test_nan_from_score_fn_is_reported_with_its_step():
    def score(x, t):
        return torch.where(t[:, None] < 0.45, torch.full_like(x, float("nan")), -x)

    with pytest.raises(FloatingPointError, match=r"NaN or inf at step 6 \(t = 0.4006"):
        sample(score, (4, 2), 10, sampler="euler_maruyama", seed=0)  # t_6 = 1 - 6 * 0.999 / 10
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        sample(iso_score(2), (4, 2), 5, proj_fn=lambda x, t: x / 0.0 * 0.0, seed=0)


def test_seed_and_generator_together_is_an_error():
    with pytest.raises(ValueError, match="seed or generator"):
        sample(iso_score(2), (4, 2), 5, proj_fn=zero_proj, seed=0, generator=torch.Generator())
