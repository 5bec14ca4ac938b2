"""The cost side of issue 20's sweep (docs/pp_sweep.md, "Cost, three ways"; ALGORITHMS §2): wall time per
step measured in interleaved sessions (a ratio to EM is taken within one session), the cost of a cell in
NFE, counted FLOPs or wall time, and the EM step count that matches a configuration's cost.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

PROJ = ("pp", "tweedie", "tweedie_free")
LABEL = {"pp": "learned T", "tweedie": "Tweedie T (ours, +1 score call)",
         "tweedie_free": "Tweedie T, no extra call (ours)", "em": "EM", "heun": "Heun PF-ODE"}


def timing_key(proj: str, width: str) -> str:
    return f"pp:{width}" if proj == "pp" else proj


def comparators(N: int, proj: str, width: str, flops: tuple, timing: dict) -> dict:
    """EM step counts K whose cost is at least the configuration's, under NFE, FLOPs and wall time."""
    f, nfe = {"tweedie_free": (0.0, N), "tweedie": (1.0, 2 * N)}.get(proj, (flops[1] / flops[0], 2 * N))
    r = timing["ratio_to_em"][timing_key(proj, width)]["median"]
    # 1e-9: float noise must not push an exact integer up by one
    return {"nfe": nfe, "flops": math.ceil(N * (1 + f) - 1e-9), "wall": math.ceil(N * r - 1e-9)}


def interleaved(run_one, keys: list, rounds: int, steps: int, batch: int, log) -> dict:
    """One timing session: `rounds` rounds, each calling run_one(key) once per key in the same order (so
    the machine's load drifts into every sampler alike); seconds per step of each, and its ratio to "em"
    round by round."""
    per, loads = {k: [] for k in keys}, [os.getloadavg()[0]]
    for r in range(rounds):
        for key in keys:
            t0 = time.perf_counter()
            run_one(key)
            per[key].append((time.perf_counter() - t0) / steps)
        loads.append(os.getloadavg()[0])
        log(f"timing round {r + 1}/{rounds} (load {loads[-1]:.1f})")
    em = np.array(per["em"])
    return {"steps": steps, "batch": batch, "rounds": rounds, "threads": 1, "load_1min": [round(v, 2) for v in loads],
            "per_step_seconds": per,
            "ratio_to_em": {k: {"median": float(np.median(np.array(v) / em)), "min": float(min(np.array(v) / em)),
                                "max": float(max(np.array(v) / em))} for k, v in per.items()}}


def timing_for(path: Path, keys: list, measure) -> dict:
    """timing.json with every key in `keys`: the sessions recorded so far, plus one new session (EM and the
    missing keys, interleaved; measure(keys) runs it) when some are missing. A ratio is always taken
    within one session, against that session's EM."""
    t = json.loads(path.read_text()) if path.is_file() else {"sessions": [], "ratio_to_em": {}}
    missing = [k for k in keys if k not in t["ratio_to_em"]]
    if missing:
        sess = measure(["em"] + [k for k in missing if k != "em"])
        t["sessions"].append(sess)
        for k in missing:
            t["ratio_to_em"][k] = dict(sess["ratio_to_em"][k], session=len(t["sessions"]) - 1)
        path.write_text(json.dumps(t, indent=1))
    return t


def timing_lines(timing: dict, flops_of) -> list:
    """The interleaved timing as a table; flops_of(kind, width) gives FLOPs per sample-step."""
    L = ["### Wall time per step (interleaved)", ""]
    for i, ss in enumerate(timing["sessions"]):
        L.append(f"Session {i}: {ss['rounds']} rounds of {', '.join(ss['per_step_seconds'])} ({ss['steps']} steps, "
                 f"batch {ss['batch']}, one thread), in the same order each round; 1-minute load "
                 f"{min(ss['load_1min']):.1f}–{max(ss['load_1min']):.1f}.")
    L += ["", "The 2-core machine was shared with other jobs, so only the ratios to EM, each taken within its own "
          "session, mean something.", "",
          "| sampler | session | s per step (median) | ratio to EM: median [min, max] over rounds | FLOPs per sample-step |",
          "|---|---:|---:|---|---:|"]
    for key, rr in timing["ratio_to_em"].items():
        kind, _, w = key.partition(":")
        per = timing["sessions"][rr["session"]]["per_step_seconds"][key]
        name = LABEL[kind] if kind != "pp" else f"PP, learned T width {w}"
        fl = flops_of(kind, w)  # None: a T width that no run of this report has
        L.append(f"| {name} | {rr['session']} | {np.median(per):.4f} | {rr['median']:.3f} [{rr['min']:.3f}, "
                 f"{rr['max']:.3f}] | {'—' if fl is None else format(fl, ',.0f')} |")
    return L


def cost_function(flops: dict, timing: dict):
    """cost(kind, steps, width, measure) per sample: NFE, FLOPs (flops: {width: (F_score, F_T)}) or wall
    time (the median seconds per step of the timing table, over its batch)."""
    Fs = next(iter(flops.values()))[0]
    s0 = timing["sessions"][0]
    em = float(np.median(s0["per_step_seconds"]["em"])) / s0["batch"]  # session 0's EM, scaled by each ratio
    per = {k: em * r["median"] for k, r in timing["ratio_to_em"].items()}

    def cost(kind, steps, width, m):
        two = kind in ("pp", "tweedie", "heun")
        if m == "nfe":
            return steps * (2 if two else 1)
        if m == "flops":
            return steps * (Fs + (flops.get(width, (0, 0))[1] if kind == "pp" else (Fs if two else 0)))
        return steps * per[timing_key(kind, width) if kind in PROJ else kind]
    return cost



__all__ = ["PROJ", "LABEL", "timing_key", "comparators", "interleaved", "timing_for", "timing_lines",
           "cost_function"]
