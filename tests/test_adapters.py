"""The diffusers adapter: time mapping, output unwrapping, schedule checks."""
from types import SimpleNamespace

import pytest
import torch

from wgfcore.adapters import from_diffusers
from wgfcore.sde import VPSDE


class FakeUNet(torch.nn.Module):
    """Mimics diffusers' UNet2DModel call convention: forward(sample, timestep) -> obj.sample."""

    def __init__(self):
        super().__init__()
        self.seen = None

    def forward(self, sample, timestep):
        self.seen = timestep
        return SimpleNamespace(sample=0.5 * sample)


def test_linear_ddpm_schedule_is_the_vp_sde():
    # log alpha_bar_i = sum_{j<=i} log(1 - beta_j) against log alpha_t^2 = -2 int_0^t beta at t = (i + 1) / 1000.
    # DDPM is a first-order discretisation, so they differ by O(1/1000) per step (~0.07 after 1000
    # steps); a mapping off by 5 indices near t = 1 would add 5 * 0.02 = 0.1, which this rejects.
    sde = VPSDE()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    gap = (torch.cumsum(torch.log1p(-betas), 0) + 2 * sde.int_beta(t)).abs()
    assert float(gap.max()) < 0.1
    shifted = (torch.cumsum(torch.log1p(-betas), 0)[5:] + 2 * sde.int_beta(t[:-5])).abs()
    assert float(shifted.max()) > 0.1


def test_adapter_maps_time_and_unwraps_output():
    unet = FakeUNet()
    score = from_diffusers(unet)
    x, t = torch.randn(3, 1, 4, 4), torch.tensor([1.0, 0.5, 1e-3])
    s = score(x, t)
    assert torch.allclose(unet.seen, torch.tensor([999.0, 499.0, 0.0]))
    assert torch.allclose(s, -0.5 * x / VPSDE().sigma(t).float().view(3, 1, 1, 1))


def test_scheduler_config_is_checked():
    cfg = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}
    with pytest.raises(ValueError, match="linear"):
        from_diffusers(FakeUNet(), SimpleNamespace(config=cfg))
    ok = {"beta_schedule": "linear", "prediction_type": "epsilon", "beta_start": 1e-4, "beta_end": 0.02,
          "num_train_timesteps": 1000}
    assert callable(from_diffusers(FakeUNet(), SimpleNamespace(config=ok)))


def test_wrong_output_shape():
    score = from_diffusers(lambda x, t: x[:, :1])
    with pytest.raises(ValueError, match="returned shape"):
        score(torch.randn(2, 3, 4, 4), torch.rand(2))
