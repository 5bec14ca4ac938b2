"""The per-step update math of every sampler, written once in plain torch (the kernels' oracle).

ALGORITHMS §2: each sampler step is an affine combination of a few same-shaped tensors
(state, score, projection, noise) with coefficients that are scalars or per-sample (B,)
vectors. Storage may be fp32/fp16/bf16; arithmetic is fp32, exactly as in `kernels/`.
The coefficient tables for all steps are computed up front in float64 (`*_coefficients`).
`TorchSteps` is the sampling loop's backend built on these updates (the Triton one mirrors it).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict

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
    return _predict(x, s, coef_view(c_x, x), coef_view(c_s, x))


def em_step(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, c_x, c_s, c_z) -> torch.Tensor:
    """x <- c_x x + c_s s + c_z z  (Euler-Maruyama: predict plus noise injection in one pass).

    The sum is formed as (c_x x + c_s s) + c_z z, the same order as `project` with T = 0, so a
    Predict-Project step with a zero projection equals this step bit for bit in fp32.
    """
    _check_same(x, s=s, z=z)
    return _em(x, s, z, coef_view(c_x, x), coef_view(c_s, x), coef_view(c_z, x) if z is not None else None)


def project(x_pred: torch.Tensor, T: torch.Tensor, z: torch.Tensor | None, c_T, c_z) -> torch.Tensor:
    """x <- x_pred + c_T T + c_z z  (projection update plus noise injection; Ghimire et al. Alg. 1)."""
    _check_same(x_pred, T=T, z=z)
    return _project(x_pred, T, z, coef_view(c_T, x_pred), coef_view(c_z, x_pred) if z is not None else None)


def heun_correct(x, s, x_p, s_p, c_x, c_s, c_xp, c_sp) -> torch.Tensor:
    """Heun corrector as one affine combination: c_x x + c_s s + c_xp x' + c_sp s'."""
    _check_same(x, s=s, x_p=x_p, s_p=s_p)
    return _heun(x, s, x_p, s_p, *(coef_view(c, x) for c in (c_x, c_s, c_xp, c_sp)))


# The formulas themselves, on coefficients already in broadcastable form (python floats, 0-d or
# (B, 1, ...) fp32 tensors). Each result is one fresh fp32 tensor that the later terms are added to
# in place: the same roundings as `a + b` (IEEE addition commutes exactly). With `tmp` (an fp32
# scratch tensor of x's shape, TorchSteps') the products go there and a noise z the caller owns is
# scaled in place: one allocation per update, the same bits.

def _scaled(t, c, tmp):
    return c * t.float() if tmp is None else torch.mul(t.float(), c, out=tmp)


def _noise(z, c_z, tmp):
    return z.mul_(c_z) if tmp is not None and z.dtype == torch.float32 else c_z * z.float()


def _predict(x, s, c_x, c_s, tmp=None):
    out = c_x * x.float()
    out += _scaled(s, c_s, tmp)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _em(x, s, z, c_x, c_s, c_z, tmp=None):
    out = c_x * x.float()
    out += _scaled(s, c_s, tmp)
    if z is not None:
        out += _noise(z, c_z, tmp)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _project(x_pred, T, z, c_T, c_z, tmp=None):
    out = c_T * T.float()
    out += x_pred.float()  # = x_pred + c_T T exactly
    if z is not None:
        out += _noise(z, c_z, tmp)
    return out if out.dtype == x_pred.dtype else out.to(x_pred.dtype)


def _fma_(out, t, c):
    """out += c t with one rounding per element (a fused multiply-add where the CPU/GPU kernel has one)."""
    return out.add_(t, alpha=c) if isinstance(c, float) else out.addcmul_(t, c)


def _heun(x, s, x_p, s_p, c_x, c_s, c_xp, c_sp):
    # Fused multiply-adds: 4 passes over memory instead of 7, so Heun's predict + correct reads and
    # writes less than a hand-written loop does. Each term rounds once instead of twice: within an
    # fp32 ulp of the unfused sum (the Triton kernel's order), not bitwise equal to it.
    out = c_x * x.float()
    _fma_(out, s.float(), c_s)
    _fma_(out, x_p.float(), c_xp)
    _fma_(out, s_p.float(), c_sp)
    return out if out.dtype == x.dtype else out.to(x.dtype)


# --- the step backend in plain torch ------------------------------------------------------------

_ROWS_LOCK = threading.Lock()
_ROWS: "OrderedDict[int, tuple]" = OrderedDict()  # id(table) -> (table, rows): the table is held, so its id stays its own


def _rows(tab: torch.Tensor) -> list:
    """Row i of a coefficient table as a tuple of 0-d fp32 tensors, made with one unbind.

    A 0-d tensor multiplies in half the host time of a python float (which torch wraps into a new
    tensor on every call) and rounds the coefficient to fp32 exactly as the kernels do. Making the
    N K views costs about a microsecond each, so they are kept for the last few tables (the
    sampler reuses its tables across calls with the same arguments).
    """
    with _ROWS_LOCK:
        hit = _ROWS.get(id(tab))
        if hit is not None and hit[0] is tab:
            _ROWS.move_to_end(id(tab))
            return hit[1]
    n, k = tab.shape
    flat = tab.reshape(-1).unbind()
    rows = [flat[i * k:(i + 1) * k] for i in range(n)]
    with _ROWS_LOCK:
        _ROWS[id(tab)] = (tab, rows)
        while len(_ROWS) > 32:
            _ROWS.popitem(last=False)
    return rows


class TorchSteps:
    """The sampling loop's step backend in plain torch: the updates above, noise from torch.randn.

    Protocol shared with `kernels.sampler_step.TritonSteps` (ALGORITHMS §2; written out in
    `wgfcore.backends`): `plan(x, tables)` once per run, where `tables` maps an update name to
    its (N, K) coefficient table on x's device (predict: c_x, c_s; em: c_x, c_s, c_z; project:
    c_T, c_z; heun: c_x, c_s, c_xp, c_sp); `accept(t)` for each network output; then per step i
    `predict(x, s, table, i)`, `em(x, s, table, i, noisy)`, `project(x_pred, T, table, i, noisy)`,
    `heun(x, s, x_p, s_p, table, i)`, `table` naming the planned table to read row i of; each also
    takes `out=`, a dead tensor the result may be written into (a hint a backend may ignore).
    It has no `finite_flag`, so it offers `rng_state()` / `set_rng_state(state)`: the sampler
    checks the final state once and, only if it is not finite, re-runs from the same noise to find
    the first bad step.
    """

    name = "torch"
    finite_flag = None  # no in-kernel finiteness check: see rng_state

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator
        self._rows = None
        self._device = None
        self._zbuf = self._tmp = None

    def plan(self, x: torch.Tensor, tables: dict) -> "TorchSteps":
        self._device = x.device
        self._rows = {name: _rows(tab.to(device=x.device, dtype=torch.float32)) for name, tab in tables.items()}
        # A noise buffer refilled each step (the same draws as a fresh torch.randn) and, from a size
        # where a fresh tensor costs page faults, scratch for the products: one allocation per update.
        self._zbuf = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        self._tmp = torch.empty(x.shape, dtype=torch.float32, device=x.device) if x.numel() >= 1 << 14 else None
        return self

    def accept(self, t: torch.Tensor) -> torch.Tensor:
        return t  # the updates above take any floating dtype and layout

    def rng_state(self):
        """The noise generator's state (None where it cannot be read: then no re-run is possible)."""
        if self.generator is not None:
            return self.generator.get_state()
        if self._device is not None and self._device.type == "cuda":
            return torch.cuda.get_rng_state(self._device)
        return torch.get_rng_state() if self._device is None or self._device.type == "cpu" else None

    def set_rng_state(self, state) -> None:
        if self.generator is not None:
            self.generator.set_state(state)
        elif self._device is not None and self._device.type == "cuda":
            torch.cuda.set_rng_state(state, self._device)
        else:
            torch.set_rng_state(state)

    def _z(self, x):
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype, out=self._zbuf)

    # `out` (a dead network output the loop could spare) is not used: this is the reference path.
    def predict(self, x, s, table: str, i: int, out=None):
        c_x, c_s = self._rows[table][i]
        return _predict(x, s, c_x, c_s, self._tmp)

    def em(self, x, s, table: str, i: int, noisy: bool, out=None):
        c_x, c_s, c_z = self._rows[table][i]
        return _em(x, s, self._z(x) if noisy else None, c_x, c_s, c_z, self._tmp)

    def project(self, x_pred, T, table: str, i: int, noisy: bool, out=None):
        c_T, c_z = self._rows[table][i]
        return _project(x_pred, T, self._z(x_pred) if noisy else None, c_T, c_z, self._tmp)

    def heun(self, x, s, x_p, s_p, table: str, i: int, out=None):
        return _heun(x, s, x_p, s_p, *self._rows[table][i])


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


def langevin_coefficients(sde: VPSDE, ts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Langevin toward a fixed target (ALGORITHMS §4): x <- x + beta_i dtau s + sqrt(2 beta_i dtau) z.

    The step sizes follow the reverse SDE's beta schedule, so the two can be compared step for step.
    """
    dtau = ts[:-1] - ts[1:]
    beta = sde.beta(ts[:-1])
    return {"c_x": torch.ones_like(beta), "c_s": beta * dtau, "c_z": torch.sqrt(2 * beta * dtau)}


def tweedie_project_coefficients(sde: VPSDE, ts: torch.Tensor, delta_p: float) -> dict[str, torch.Tensor]:
    """Predict-Project whose T comes from the step's own score by Tweedie (ours, not the paper's): 1 NFE per step.

    With s = s(x, t_i) and x_pred = c_x x + c_s s (the predict of ALGORITHMS §2), the projection
    optimum of §3, T* = (alpha_{t_{i+1}} E[x_0 | .] - x_pred) / (1 + kappa), kappa = sqrt(beta_i) / 2,
    takes E[x_0 | x_{t_i} = x] = (x + sigma_i^2 s) / alpha_i from the score already computed (where
    `wgfcore.sample.tweedie_proj_fn` spends a second evaluation at (x_pred, t_{i+1})). Then with
    k = c_T / (1 + kappa), c_T = sqrt(beta_i) delta_p dtau and r = alpha_{t_{i+1}} / alpha_{t_i},

        x <- x_pred + c_T T + c_z z = ((1 - k) c_x + k r) x + ((1 - k) c_s + k r sigma_i^2) s + c_z z,

    one Euler-Maruyama-shaped update. delta_p = 0 gives Euler-Maruyama's coefficients exactly.
    """
    C = reverse_coefficients(sde, ts, 1.0)
    t, t_next = ts[:-1], ts[1:]
    k = project_coefficients(sde, ts, delta_p) / (1.0 + torch.sqrt(sde.beta(t)) / 2)
    r = sde.alpha(t_next) / sde.alpha(t)
    return {"c_x": (1 - k) * C["c_x"] + k * r, "c_s": (1 - k) * C["c_s"] + k * r * sde.sigma(t) ** 2,
            "c_z": C["c_z"]}


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
    "reverse_coefficients", "project_coefficients", "heun_coefficients", "langevin_coefficients",
    "tweedie_project_coefficients",
    "PAPER_DELTA_P", "default_delta_p",
]
