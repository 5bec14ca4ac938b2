"""The per-step update math of every sampler, written once in plain torch (the kernels' oracle).

ALGORITHMS §2: each sampler step is an affine combination of a few same-shaped tensors
(state, score, projection, noise) with coefficients that are scalars or per-sample (B,)
vectors. Storage may be fp32/fp16/bf16; arithmetic is fp32, exactly as in `kernels/`.
The coefficient tables for all steps are computed up front in float64 (`*_coefficients`).
`TorchSteps` is the sampling loop's backend built on these updates (the Triton one mirrors it).
"""
from __future__ import annotations

import math

import torch

from .sde import VPSDE



def coef_view(c, x: torch.Tensor):
    """A coefficient as something that broadcasts against x (B, ...) in fp32.

    Accepts a python number, a 0-d tensor or a per-sample tensor of shape (B,).
    """
    if not torch.is_tensor(c):
        return float(c)
    if c.ndim == 0:
        return c.to(device=x.device, dtype=torch.float32)
    if c.ndim == 1 and c.shape[0] == x.shape[0]:
        return c.to(device=x.device, dtype=torch.float32).view(-1, *([1] * (x.ndim - 1)))
    raise ValueError(
        f"a coefficient must be a scalar or have shape (B,) = ({x.shape[0]},), got shape {tuple(c.shape)}"
    )


def _check_same(x: torch.Tensor, **others):
    for name, y in others.items():
        if y is not None and y.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(y.shape)}, expected the state's shape {tuple(x.shape)}")


def predict(x: torch.Tensor, s: torch.Tensor, c_x, c_s) -> torch.Tensor:
    """x_pred = c_x x + c_s s  (the Euler / predict half-step, no noise)."""
    _check_same(x, s=s)
    return (coef_view(c_x, x) * x.float() + coef_view(c_s, x) * s.float()).to(x.dtype)


def em_step(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, c_x, c_s, c_z) -> torch.Tensor:
    """x <- c_x x + c_s s + c_z z  (Euler-Maruyama: predict plus noise injection in one pass).

    The sum is formed as (c_x x + c_s s) + c_z z, the same order as `project` with T = 0, so a
    Predict-Project step with a zero projection equals this step bit for bit in fp32.
    """
    _check_same(x, s=s, z=z)
    x_pred = coef_view(c_x, x) * x.float() + coef_view(c_s, x) * s.float()
    if z is not None:
        x_pred = x_pred + coef_view(c_z, x) * z.float()
    return x_pred.to(x.dtype)


def project(x_pred: torch.Tensor, T: torch.Tensor, z: torch.Tensor | None, c_T, c_z) -> torch.Tensor:
    """x <- x_pred + c_T T + c_z z  (projection update plus noise injection; Ghimire et al. Alg. 1)."""
    _check_same(x_pred, T=T, z=z)
    out = x_pred.float() + coef_view(c_T, x_pred) * T.float()
    if z is not None:
        out = out + coef_view(c_z, x_pred) * z.float()
    return out.to(x_pred.dtype)


def heun_correct(x, s, x_p, s_p, c_x, c_s, c_xp, c_sp) -> torch.Tensor:
    """Heun corrector as one affine combination: c_x x + c_s s + c_xp x' + c_sp s'."""
    _check_same(x, s=s, x_p=x_p, s_p=s_p)
    out = coef_view(c_x, x) * x.float() + coef_view(c_s, x) * s.float()
    out = out + coef_view(c_xp, x) * x_p.float() + coef_view(c_sp, x) * s_p.float()
    return out.to(x.dtype)


# --- the step backend in plain torch ------------------------------------------------------------

class TorchSteps:
    """The sampling loop's step backend in plain torch: the updates above, noise from torch.randn.

    Protocol shared with `kernels.sampler_step.TritonSteps` (ALGORITHMS §2):
    `plan(x, tables)` once per run, where `tables` maps an update name to its (N, K) coefficient
    table on x's device (predict: c_x, c_s; em: c_x, c_s, c_z; project: c_T, c_z; heun: c_x, c_s,
    c_xp, c_sp); `accept(t)` for each network output; then per step i
    `predict(x, s, table, i)`, `em(x, s, table, i, noisy)`, `project(x_pred, T, table, i, noisy)`,
    `heun(x, s, x_p, s_p, table, i)`, `table` naming the planned table to read row i of.
    """

    name = "torch"
    finite_flag = None  # no in-kernel finiteness check: the sampler's guard checks with torch

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator
        self._rows = None

    def plan(self, x: torch.Tensor, tables: dict) -> "TorchSteps":
        # Row i of each table as 0-d fp32 tensors, sliced once here rather than once per step.
        self._rows = {name: [tuple(r.unbind()) for r in tab.to(device=x.device, dtype=torch.float32)]
                      for name, tab in tables.items()}
        return self

    def accept(self, t: torch.Tensor) -> torch.Tensor:
        return t  # the updates above take any floating dtype and layout

    def _z(self, x):
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def predict(self, x, s, table: str, i: int):
        c_x, c_s = self._rows[table][i]
        return predict(x, s, c_x, c_s)

    def em(self, x, s, table: str, i: int, noisy: bool):
        c_x, c_s, c_z = self._rows[table][i]
        return em_step(x, s, self._z(x) if noisy else None, c_x, c_s, c_z)

    def project(self, x_pred, T, table: str, i: int, noisy: bool):
        c_T, c_z = self._rows[table][i]
        return project(x_pred, T, self._z(x_pred) if noisy else None, c_T, c_z)

    def heun(self, x, s, x_p, s_p, table: str, i: int):
        return heun_correct(x, s, x_p, s_p, *self._rows[table][i])


# --- coefficient tables (float64, one row per step) -------------------------------------------

def time_grid(steps: int, eps: float = 1e-3) -> torch.Tensor:
    """Forward-time grid t_i = 1 - i (1 - eps)/N, i = 0..N (ALGORITHMS §2), float64."""
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (0.0 < eps < 1.0):
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    i = torch.arange(int(steps) + 1, dtype=torch.float64)
    return 1.0 - i * (1.0 - eps) / int(steps)


def reverse_coefficients(sde: VPSDE, ts: torch.Tensor, a: float = 1.0) -> dict[str, torch.Tensor]:
    """Euler-Maruyama coefficients of the §6.2 family for each step i (t_i -> t_{i+1}).

    x <- x + beta dtau (x + (1 + a) s) + sqrt(2 a beta dtau) z, beta at t_i, dtau = t_i - t_{i+1}.
    """
    if not (math.isfinite(a) and a >= 0):
        raise ValueError(f"the reverse family needs a finite a >= 0, got a={a}")
    # The drift and diffusion come from their one home, VPSDE.reverse_drift / reverse_diffusion; the
    # drift is linear in (x, s), so its coefficients are its values at unit x (s = 0) and unit s (x = 0).
    dtau = ts[:-1] - ts[1:]
    t = ts[:-1]
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    return {
        "c_x": 1.0 + sde.reverse_drift(one, t, zero, a) * dtau,
        "c_s": sde.reverse_drift(zero, t, one, a) * dtau,
        "c_z": sde.reverse_diffusion(t, a) * torch.sqrt(dtau),
    }


def project_coefficients(sde: VPSDE, ts: torch.Tensor, delta_p: float) -> torch.Tensor:
    """c_T = sqrt(beta(t_i)) * delta_p * dtau (Ghimire et al. Alg. 1, ALGORITHMS §2)."""
    if not (math.isfinite(delta_p) and delta_p >= 0):
        raise ValueError(f"delta_p must be a finite number >= 0, got {delta_p}")
    dtau = ts[:-1] - ts[1:]
    return torch.sqrt(sde.beta(ts[:-1])) * delta_p * dtau


def heun_coefficients(sde: VPSDE, ts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Heun on the probability-flow ODE dx/dtau = beta (x + s) (the a = 0 member).

    Predictor x' = x + h beta_i (x + s); corrector x_next = x + h/2 [beta_i (x + s) + beta_{i+1} (x' + s')].
    """
    h = ts[:-1] - ts[1:]
    b0, b1 = sde.beta(ts[:-1]), sde.beta(ts[1:])
    return {
        "p_x": 1.0 + h * b0,
        "p_s": h * b0,
        "c_x": 1.0 + 0.5 * h * b0,
        "c_s": 0.5 * h * b0,
        "c_xp": 0.5 * h * b1,
        "c_sp": 0.5 * h * b1,
    }


# The paper's delta_p per step count (Ghimire et al., §9): N=20 -> 1.0, N=40 -> 0.4, N=100 -> 0.1.
PAPER_DELTA_P = {20: 1.0, 40: 0.4, 100: 0.1}


def default_delta_p(steps: int) -> float:
    """The paper's delta_p for N, interpolated piecewise-linearly in (log N, log delta_p).

    Between the paper's points this is a power law; beyond N = 100 the last segment is extended
    (N = 1000 gives ~3e-3, i.e. negligible projection, as the paper says); below N = 20 it is
    held at 1.0 rather than extrapolated upward, to keep the projection from overshooting.
    """
    if steps <= 20:
        return 1.0
    pts = sorted(PAPER_DELTA_P.items())
    lx = [math.log(n) for n, _ in pts]
    ly = [math.log(d) for _, d in pts]
    x = math.log(steps)
    seg = 0 if x <= lx[1] else 1
    slope = (ly[seg + 1] - ly[seg]) / (lx[seg + 1] - lx[seg])
    return math.exp(ly[seg] + slope * (x - lx[seg]))


__all__ = [
    "TorchSteps", "coef_view", "predict", "em_step", "project", "heun_correct", "time_grid",
    "reverse_coefficients", "project_coefficients", "heun_coefficients",
    "PAPER_DELTA_P", "default_delta_p",
]
