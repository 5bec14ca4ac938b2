"""Drawing samples from trained networks, and the grid of sampler cells a table is made of.

ALGORITHMS §2: the rows of Ghimire et al. Table 1 (EM and Predict-Project) plus EM at 2N steps and
Heun on the PF-ODE at equal NFE; columns N. Every cell of a table draws its samples from the same
prior draws and noise seeds (`draw(seed=...)`), so cells can be compared in pairs.
"""
from __future__ import annotations

from wgfcore import ops
from wgfcore.sample import eps_to_score, nfe, sample, tweedie_proj_fn

#: Table 1 rows: key -> (label, sampler, steps per column N)
ROWS = {
    "em": ("Score-based (EM)", "euler_maruyama", 1),
    "pp": ("Predict-Project", "predict_project", 1),
    "em2n": ("Score-based (EM, 2N steps)", "euler_maruyama", 2),
    "heun": ("Heun PF-ODE", "heun_ode", 1),
    "pp_tweedie": ("Predict-Project (Tweedie T, ours)", "predict_project", 1),
}


def score_and_proj(eps_net, proj_net, sde, cfg, d):
    """Wrap the EMA networks as score / projection functions (bf16 network on GPU, fp32 update)."""
    from .training_loop import autocast

    eps_score = eps_to_score(eps_net, sde)

    def score_fn(x, t):
        with autocast(d, cfg):
            return eps_score(x, t).float() if d.device.type == "cuda" else eps_score(x, t)

    def proj_fn(x, t):
        with autocast(d, cfg):
            return proj_net(x, t).float()

    return score_fn, proj_fn


def draw(eps_net, proj_net, sde, sampler, steps, n, cfg, d, *, seed, backend, delta_p=None, progress=False,
         tweedie=False):
    """n image samples with `sampler` for `steps` steps; returns (x, network calls per sample). With
    `tweedie`, Predict-Project's T is the training-free Tweedie projection built from the score."""
    score_fn, proj_fn = score_and_proj(eps_net, proj_net, sde, cfg, d)
    if tweedie:
        proj_fn = tweedie_proj_fn(score_fn, steps)
    shape = (n, cfg["channels"], cfg["resolution"], cfg["resolution"])
    return sample(score_fn, shape, steps, sampler=sampler, proj_fn=proj_fn if sampler == "predict_project" else None,
                  delta_p=delta_p, seed=seed, device=d.device, backend=backend, progress=progress,
                  return_nfe=True, sde=sde)


def delta_p_for(ecfg: dict, N: int) -> float:
    """Predict-Project's delta_p at N: eval.delta_p (one value, or {"N": value}), else the paper's."""
    dp = ecfg.get("delta_p")
    if isinstance(dp, dict):
        dp = dp.get(str(N))
    return ops.default_delta_p(int(N)) if dp is None else float(dp)


def samples_at(ecfg: dict, N: int) -> int:
    """Samples per cell in column N: ecfg['samples'], or ecfg['samples_at'][str(N)] where given."""
    return int((ecfg.get("samples_at") or {}).get(str(N), ecfg["samples"]))


def cells(ecfg: dict):
    """(row key, column N) cells in table order, each with its sampler, step count, NFE, delta_p and
    sample count; cells listed in ecfg['skip'] as "row@N" are left out (budget)."""
    out = []
    skip = set(ecfg.get("skip") or [])
    for key in ecfg["rows"]:
        label, sampler, mult = ROWS[key]
        for N in ecfg["steps"]:
            if f"{key}@{N}" in skip:
                continue
            steps = int(N) * mult
            dp = delta_p_for(ecfg, N) if sampler == "predict_project" else None
            out.append({"row": key, "label": label, "sampler": sampler, "N": int(N), "steps": steps,
                        "nfe": nfe(sampler, steps), "delta_p": dp, "n": samples_at(ecfg, int(N))})
    return out


__all__ = ["ROWS", "draw", "score_and_proj", "cells", "samples_at", "delta_p_for"]
