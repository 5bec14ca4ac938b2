"""The table an evaluation fills: its rows (samplers) and columns (N), and the cells they make.

ALGORITHMS §2: the rows of Ghimire et al. Table 1 (EM and Predict-Project) plus EM at 2N steps and
Heun on the PF-ODE at equal NFE, and the training-free Tweedie projection; columns N. Every cell
records its sampler, step count, network calls (NFE), delta_p and sample count.
"""
from __future__ import annotations

from wgfcore import ops
from wgfcore.sample import nfe

#: Table 1 rows: key -> (label, sampler, steps per column N)
ROWS = {
    "em": ("Score-based (EM)", "euler_maruyama", 1),
    "pp": ("Predict-Project", "predict_project", 1),
    "em2n": ("Score-based (EM, 2N steps)", "euler_maruyama", 2),
    "heun": ("Heun PF-ODE", "heun_ode", 1),
    "pp_tweedie": ("Predict-Project (Tweedie T, ours)", "predict_project", 1),
}


def delta_p_for(ecfg, N: int) -> float:
    """Predict-Project's delta_p at N: eval.delta_p (one value, or {"N": value}), else the paper's."""
    dp = ecfg.delta_p
    if isinstance(dp, dict):
        dp = dp.get(str(N))
    return ops.default_delta_p(int(N)) if dp is None else float(dp)


def samples_at(ecfg, N: int) -> int:
    """Samples per cell in column N: ecfg.samples, or ecfg.samples_at[str(N)] where given."""
    return int(ecfg.samples_at.get(str(N), ecfg.samples))


def cells(ecfg):
    """(row key, column N) cells of an `EvalConfig` in table order, each with its sampler, step count,
    NFE, delta_p and sample count; cells listed in ecfg.skip as "row@N" are left out (budget)."""
    out = []
    skip = set(ecfg.skip)
    for key in ecfg.rows:
        label, sampler, mult = ROWS[key]
        for N in ecfg.steps:
            if f"{key}@{N}" in skip:
                continue
            steps = int(N) * mult
            dp = delta_p_for(ecfg, N) if sampler == "predict_project" else None
            out.append({"row": key, "label": label, "sampler": sampler, "N": int(N), "steps": steps,
                        "nfe": nfe(sampler, steps), "delta_p": dp, "n": samples_at(ecfg, int(N))})
    return out


def check_nfe(cell: dict, calls: int) -> None:
    """The network calls a sampler made must be the cell's NFE (the table's cost column)."""
    if calls != cell["nfe"]:
        raise RuntimeError(f"{cell['sampler']} made {calls} network calls for {cell['steps']} steps, "
                           f"expected {cell['nfe']}")


__all__ = ["ROWS", "cells", "samples_at", "delta_p_for", "check_nfe"]
