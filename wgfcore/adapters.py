"""Use models trained elsewhere as a wgfcore `score_fn` (ALGORITHMS §1: s = -eps / sigma_t).

A diffusers epsilon-prediction model trained with the linear DDPM schedule (beta from 1e-4 to 0.02
over 1000 steps) is the discretisation of our VP-SDE with b_min = 0.1, b_max = 20: its index i
corresponds to continuous time t = (i + 1) / 1000. The adapter maps our (B,) forward time to that
index and turns epsilon into a score, so diffusers models run under every wgfcore sampler.
"""
from __future__ import annotations

import torch

from .sde import VPSDE, _bcast


def _config_value(scheduler, name, default=None):
    cfg = getattr(scheduler, "config", scheduler)
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def from_diffusers(unet, scheduler=None, num_train_timesteps: int = 1000, sde: VPSDE | None = None):
    """A `score_fn(x, t)` from a diffusers-style epsilon model `unet(x, timestep)`.

    The model's output may be a tensor, a tuple whose first entry is the tensor, or an object with
    `.sample` (diffusers' `UNet2DOutput`). If `scheduler` is given, its config is checked: only the
    linear beta schedule with epsilon prediction matches the VP-SDE; anything else is refused.
    """
    if scheduler is not None:
        sched = _config_value(scheduler, "beta_schedule", "linear")
        pred = _config_value(scheduler, "prediction_type", "epsilon")
        b0 = float(_config_value(scheduler, "beta_start", 1e-4))
        b1 = float(_config_value(scheduler, "beta_end", 0.02))
        num_train_timesteps = int(_config_value(scheduler, "num_train_timesteps", num_train_timesteps))
        if sched != "linear" or pred != "epsilon":
            raise ValueError(f"from_diffusers supports beta_schedule='linear' with prediction_type='epsilon', "
                             f"got {sched!r} / {pred!r}")
        sde = sde or VPSDE(b_min=b0 * num_train_timesteps, b_max=b1 * num_train_timesteps)
    sde = sde or VPSDE()
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        timestep = (t * num_train_timesteps - 1).clamp(0, num_train_timesteps - 1)
        out = unet(x, timestep)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if out.shape != x.shape:
            raise ValueError(f"the diffusers model returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        return -out / _bcast(sde.sigma(t), x)

    return score_fn


__all__ = ["from_diffusers"]
