"""Drawing samples from trained networks for the cells of a table (ALGORITHMS §2).

Every cell of a table draws its samples from the same prior draws and noise seeds (`draw(seed=...)`),
so cells can be compared in pairs.
"""
from __future__ import annotations

from wgfcore.sample import eps_to_score, sample, tweedie_proj_fn

from ..engine.config import Config
from ..engine.loop import autocast


def score_and_proj(eps_net, proj_net, sde, cfg: Config, d):
    """Wrap the EMA networks as score / projection functions (bf16 network on GPU, fp32 update)."""
    eps_score = eps_to_score(eps_net, sde)

    def score_fn(x, t):
        with autocast(d, cfg):
            return eps_score(x, t).float() if d.device.type == "cuda" else eps_score(x, t)

    def proj_fn(x, t):
        with autocast(d, cfg):
            return proj_net(x, t).float()

    return score_fn, proj_fn


def draw(eps_net, proj_net, sde, sampler, steps, n, cfg: Config, d, *, seed, backend, delta_p=None, progress=False,
         tweedie=False):
    """n image samples with `sampler` for `steps` steps; returns (x, network calls per sample). With
    `tweedie`, Predict-Project's T is the training-free Tweedie projection built from the score."""
    score_fn, proj_fn = score_and_proj(eps_net, proj_net, sde, cfg, d)
    if tweedie:
        proj_fn = tweedie_proj_fn(score_fn, steps)
    return sample(score_fn, (n, *cfg.image_shape), steps, sampler=sampler,
                  proj_fn=proj_fn if sampler == "predict_project" else None, delta_p=delta_p, seed=seed,
                  device=d.device, backend=backend, progress=progress, return_nfe=True, sde=sde)


__all__ = ["draw", "score_and_proj"]
