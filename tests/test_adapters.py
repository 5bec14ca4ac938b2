"""The diffusers adapter and DDPM schedules as VP processes, checked against diffusers' own conversions."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wgfcore.adapters import KWON_SCHEDULE, DiscreteVP, alpha_bar_at, ddpm_betas, from_diffusers, timestep_from_alpha2
from wgfcore.scores import gaussian
from wgfcore.sde import VPSDE

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test extra: pip install 'wgfcore[test]'")

SDE = VPSDE()


class FakeEps(torch.nn.Module):
    """diffusers' UNet2DModel call convention, forward(sample, timestep) -> obj.sample, returning the
    *exact* epsilon of data N(0, v I) under the schedule it was 'trained' on, at integer timesteps only:
    eps*(x, i) = sqrt(1 - ab_i) x / (ab_i v + 1 - ab_i). A fractional timestep is interpolated
    linearly in i between the two neighbours, as a network would see a continuous input."""

    def __init__(self, alphas_cumprod, v):
        super().__init__()
        self.ab, self.v, self.seen = torch.as_tensor(alphas_cumprod, dtype=torch.float64), v, None

    def eps_at(self, x, i):
        ab = self.ab[i].view(-1, *([1] * (x.ndim - 1)))
        return torch.sqrt(1 - ab) * x.double() / (ab * self.v + 1 - ab)

    def forward(self, sample, timestep):
        self.seen = timestep
        lo = timestep.double().floor().long().clamp(0, len(self.ab) - 2)
        w = (timestep.double() - lo).view(-1, *([1] * (sample.ndim - 1)))
        out = (1 - w) * self.eps_at(sample, lo) + w * self.eps_at(sample, lo + 1)
        return SimpleNamespace(sample=out.to(sample.dtype))


@pytest.mark.parametrize("schedule,start,end,n", [("linear", 1e-4, 0.02, 1000), ("scaled_linear", 8.5e-4, 0.012, 1000),
                                                  ("sigmoid", 1e-5, 5e-3, 10), ("squaredcos_cap_v2", 1e-4, 0.02, 1000)])
def test_betas_match_diffusers(schedule, start, end, n):
    ref = diffusers.DDPMScheduler(num_train_timesteps=n, beta_start=start, beta_end=end, beta_schedule=schedule)
    ours = ddpm_betas(n, schedule, start, end)
    # diffusers builds its betas in float32: agreement to float32 rounding of values <= 0.999
    assert torch.allclose(ours, ref.betas.double(), rtol=2e-6, atol=1e-7)


def test_fractional_timestep_is_diffusers_sigma_to_t():
    ddpm = diffusers.DDPMScheduler()  # linear 1e-4 .. 0.02 over 1000 steps
    ab = ddpm.alphas_cumprod
    euler = diffusers.EulerDiscreteScheduler()
    log_sigmas = np.log(((1 - ab.double().numpy()) / ab.double().numpy()) ** 0.5)
    t = torch.cat([torch.tensor([1e-3, 2e-3, 1e-2]),
                   torch.rand(64, generator=torch.Generator().manual_seed(0))]).double()
    tau = timestep_from_alpha2(ab, SDE.alpha(t) ** 2)
    ref = euler._sigma_to_t(SDE.ve_sigma(t).numpy(), log_sigmas)
    np.testing.assert_allclose(tau.numpy(), ref, rtol=0, atol=1e-9)
    # the numbers: t = 0.001 sits near timestep 0.12, not at 0 (the old i = 1000 t - 1)
    assert abs(float(tau[0]) - 0.12) < 0.005
    # at integer timesteps the interpolation reproduces the table itself
    i = torch.arange(0, 1000, 37)
    assert torch.allclose(timestep_from_alpha2(ab, ab.double()[i]), i.double(), atol=1e-6)
    assert torch.allclose(alpha_bar_at(ab, i.double()), ab.double()[i], rtol=1e-12)
    # and round-trips: alpha_bar(tau(a2)) = a2 inside the table's range
    a2 = SDE.alpha(t) ** 2
    assert torch.allclose(alpha_bar_at(ab, tau), a2, rtol=1e-10)


def test_score_uses_the_models_own_noise_level():
    ab = diffusers.DDPMScheduler().alphas_cumprod
    v = 0.3
    unet = FakeEps(ab, v)
    score = from_diffusers(unet, diffusers.DDPMScheduler())
    # at the VP times whose alpha_t^2 equals a table entry the fake model is exact, so the adapter must
    # return the analytic score of N(0, v I) at that VP time (float64 input: no float32 rounding)
    i = torch.tensor([0, 1, 5, 100, 500, 990])
    t = SDE.t_from_ve_sigma(torch.sqrt((1 - ab.double()[i]) / ab.double()[i]))
    x = torch.randn(len(i), 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = score(x, t)
    assert torch.allclose(unet.seen.double(), i.double(), atol=1e-6)
    data = gaussian(torch.zeros(48), v * torch.eye(48, dtype=torch.float64))
    exact = data.score(x.reshape(len(i), -1), t, SDE).reshape(x.shape)
    assert torch.allclose(s, exact, rtol=1e-9, atol=1e-12)
    # the previous mapping (i = 1000 t - 1, divide by the continuous sigma_t) is 4.6 % off at t = 1e-3
    t0 = torch.tensor([1e-3], dtype=torch.float64)
    old = -unet(x[:1], (t0 * 1000 - 1).clamp(0, 999)).sample / SDE.sigma(t0)
    new = score(x[:1], t0)
    assert (old / new - 1).abs().max() > 0.04


def test_schedule_from_config_or_table_and_refusals():
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    ab = sched.alphas_cumprod
    # any schedule works: the adapter reads alphas_cumprod, from the scheduler or from its config alone
    a = from_diffusers(FakeEps(ab, 1.0), sched)
    b = from_diffusers(FakeEps(ab, 1.0), SimpleNamespace(config=dict(sched.config)))
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0.01, 0.2, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(a(x, t), b(x, t), rtol=1e-5)
    lo, hi = a.t_range
    assert 0 < lo < 0.01 and 0.9 < hi <= 1.5
    with pytest.raises(ValueError, match="epsilon"):
        from_diffusers(FakeEps(ab, 1.0), diffusers.DDPMScheduler(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="beta_schedule"):
        from_diffusers(FakeEps(ab, 1.0), SimpleNamespace(config={"beta_schedule": "nope"}))
    with pytest.raises(ValueError, match="decreasing"):
        from_diffusers(FakeEps(ab, 1.0), alphas_cumprod=torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="returned shape"):
        from_diffusers(lambda x, t: x[:, :1])(torch.randn(2, 3, 4, 4), torch.rand(2))


def test_discrete_vp_hits_the_table():
    betas = ddpm_betas(**KWON_SCHEDULE)  # Kwon et al.'s 10-step table
    sde = DiscreteVP.from_betas(betas)
    ab = torch.cumprod(1 - betas, 0)
    t = sde.step_time(torch.arange(10))
    assert torch.allclose(sde.alpha(t) ** 2, ab, rtol=1e-13)
    # g^2 = b integrates to -log(1 - beta_i) over step i
    assert torch.allclose(2 * (sde.int_beta(t) - sde.int_beta(t - 0.1)), -torch.log1p(-betas), rtol=1e-12)
    assert torch.allclose(sde.b(t - 0.05), -10 * torch.log1p(-betas), rtol=1e-12)
    assert torch.allclose(sde.t_from_ve_sigma(sde.ve_sigma(t)), t, rtol=1e-12)
    # the DDPM forward step x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z has the marginals of perturb
    m, _ = sde.marginal(torch.ones(1, 2, dtype=torch.float64), t[-1])
    assert torch.allclose(m, torch.sqrt(ab[-1]) * torch.ones(1, 2, dtype=torch.float64))


def test_kwon_schedule_is_the_notebooks():
    # Kwon et al.'s notebook: 10 steps, sigmoid from 1e-5 to 1e-2, so alpha_bar_T = 0.951 (the tutorial's
    # 5e-3 would give 0.975)
    assert KWON_SCHEDULE == {"num_train_timesteps": 10, "beta_schedule": "sigmoid", "beta_start": 1e-5,
                             "beta_end": 1e-2}
    betas = ddpm_betas(**KWON_SCHEDULE)
    top = 1e-5 + (1e-2 - 1e-5) * float(torch.sigmoid(torch.tensor(6.0, dtype=torch.float64)))
    assert float(betas[-1]) == pytest.approx(top, rel=1e-12)
    assert abs(float(torch.prod(1 - betas)) - 0.9510) < 1e-4
