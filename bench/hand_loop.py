"""The sampling loop a user writes by hand, the baseline of the CPU sampler rows (issues 16 and 17):
Python-float coefficients and per-step times made before the timing, plain eager expressions, the
arithmetic of wgfcore.ops (ALGORITHMS §2-3: Euler-Maruyama, the PF-ODE, Heun, Predict-Project)."""
from __future__ import annotations

import torch

from wgfcore import ops
from wgfcore.sde import VPSDE

SAMPLERS = ("euler_maruyama", "pf_ode", "heun_ode", "predict_project")


def hand_loop(sampler: str, shape, steps: int, score, proj=None, delta_p: float = 1.0, seed: int = 0):
    """run(seed=seed) -> x_N for `sampler` (one of SAMPLERS; pf_ode is reverse_sde with a = 0) from the
    prior draw of torch.Generator().manual_seed(seed), the step noise drawn from the same generator."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    sde, ts = VPSDE(), ops.time_grid(steps)
    t = list(ts.float()[:, None].expand(-1, shape[0]).unbind(0))
    if sampler == "heun_ode":
        h, b0, b1 = ts[:-1] - ts[1:], sde.beta(ts[:-1]), sde.beta(ts[1:])
        hb, hb0, hb1 = (h * b0).tolist(), (0.5 * h * b0).tolist(), (0.5 * h * b1).tolist()
    else:
        C = ops.reverse_coefficients(sde, ts, 0.0 if sampler == "pf_ode" else 1.0)
        cx, cs, cz = C["c_x"].tolist(), C["c_s"].tolist(), C["c_z"].tolist()
        cT = ops.project_coefficients(sde, ts, delta_p).tolist()

    def run(seed: int = seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g)
        for i in range(steps):
            s = score(x, t[i])
            if sampler == "heun_ode":  # u = x + s reused: 8 tensor ops per step
                u = x + s
                x_p = x + hb[i] * u
                x = x + hb0[i] * u + hb1[i] * (x_p + score(x_p, t[i + 1]))
                continue
            x_next = cx[i] * x + cs[i] * s
            if sampler == "predict_project":
                x_next = x_next + cT[i] * proj(x_next, t[i + 1])
            if sampler != "pf_ode" and i < steps - 1:
                x_next = x_next + cz[i] * torch.randn(shape, generator=g)
            x = x_next
        return x

    return run
