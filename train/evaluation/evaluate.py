"""The Table 1 evaluation of a trained image run: every (sampler row, column N) cell drawn with the
EMA networks, featurised, and scored by the Fréchet distance to the reference statistics.

ALGORITHMS §2 (samplers) and §7 (metrics). The statistics and the written table are
train.evaluation.report's.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from wgfcore.sde import VPSDE

from ..engine import distributed as D
from ..engine.config import Config
from .draw import draw
from .fid import Stats, frechet_distance
from .plots import grid_scale, save_grid
from .report import bootstrap_se, paired_difference, write_results
from .table import ROWS, cells, check_nfe


#: paired comparisons (a minus b) at each N: the projection at equal steps, Predict-Project against EM
#: at equal NFE, and more EM steps against fewer (a check that the table is monotone beyond noise)
PAIRS = [("pp", "em"), ("pp", "em2n"), ("em2n", "em")]


@torch.no_grad()
def evaluate(cfg: Config, eps_net, proj_net, features, ref: tuple, out_dir: Path, d: D.Dist | None = None, *,
             backend: str = "auto", progress: bool = True, prefix: str = "", extra_rows: list | None = None,
             verdicts: bool = True):
    """Fill the Table 1 grid of cfg.eval: for every (row, N), draw cfg.eval.samples samples with the EMA networks,
    take `features`, and report the Fréchet distance to the reference statistics `ref` = (mu, sigma).

    Samples are drawn in batches whose seed depends only on the batch index (the same prior draws
    for every cell), and batches are dealt to ranks round-robin, so the numbers do not depend on the
    number of processes. Writes <prefix>results.csv/.md, a grid per cell and the metric-vs-NFE plot.
    With a bootstrap, the PAIRS of cells are compared sample by sample (and, with `verdicts`, the
    report says which differences are beyond noise; --quick runs are untrained and get none).
    """
    d = d or D.Dist()
    ecfg = cfg.eval
    sde = VPSDE()
    eps_net.eval().to(d.device)
    proj_net.eval().to(d.device)
    bs = int(ecfg.batch)
    n_boot = int(ecfg.bootstrap)
    kept_all, value_of = {}, {}
    todo = cells(ecfg)
    mine = {c["n"]: [b for b in range(math.ceil(c["n"] / bs)) if b % d.world == d.rank] for c in todo}
    results = []
    bar = tqdm(total=sum(len(mine[c["n"]]) for c in todo), desc=f"evaluate ({features.name})",
               disable=not (progress and d.main), dynamic_ncols=True)
    for c in todo:
        t0 = time.time()
        st = Stats(features.dims)
        kept = []  # features themselves, only when a bootstrap is asked for (small feature spaces)
        calls, n = 0, c.pop("n")
        for b in mine[n]:
            x, calls = draw(eps_net, proj_net, sde, c["sampler"], c["steps"], min(bs, n - b * bs), cfg, d,
                            seed=int(cfg.seed) * 100_003 + 12_345 + b, backend=backend, delta_p=c["delta_p"],
                            progress=progress and d.main and c["steps"] >= 200, tweedie=c["row"] == "pp_tweedie")
            f = features(x)
            st.add(f)
            if n_boot:
                kept.append(f)
            if b == 0 and d.main:
                save_grid(x[: ecfg.grid], out_dir / "samples" / f"{prefix}{c['row']}_N{c['N']}.png",
                          scale=grid_scale(cfg))
            bar.update(1)
        st = Stats.unpack(D.all_reduce_sum(d, st.packed().to(d.device)).cpu(), features.dims)
        if calls:
            check_nfe(c, calls)
        mu, sigma = st.mu_sigma()
        value = frechet_distance(mu, sigma, *ref)
        se = None
        if n_boot:
            allf = D.all_gather_cat(d, torch.cat(kept).to(d.device) if kept else
                                    torch.zeros(0, features.dims, dtype=torch.float64, device=d.device)).cpu()
            se = bootstrap_se(allf, ref, n_boot, seed=int(cfg.seed))
            kept_all[(c["row"], c["N"])] = allf
        r = dict(c, metric=features.name, value=value, se=se, n_samples=int(st.n),
                 seconds=round(time.time() - t0, 2))
        results.append(r)
        value_of[(c["row"], c["N"])] = value
        bar.set_postfix_str(f"{c['row']} N={c['N']}: {value:.3f}")
    bar.close()
    paired = []
    for N in ecfg.steps:  # sample i of every cell starts from the same prior draw: compare in pairs
        for a, b in PAIRS:
            if (a, N) in kept_all and (b, N) in kept_all:
                diff, se = paired_difference(kept_all[(a, N)], kept_all[(b, N)], ref, n_boot, int(cfg.seed))
                paired.append({"row": f"{a}_minus_{b}", "label": f"{ROWS[a][0]} minus {ROWS[b][0]} (paired)",
                               "sampler": "difference", "N": int(N), "steps": int(N), "nfe": "", "delta_p": None,
                               "metric": features.name, "value": diff, "se": se,
                               "n_samples": kept_all[(a, N)].shape[0], "seconds": 0.0,
                               "scale": (value_of[(a, N)] + value_of[(b, N)]) / 2})
    if d.main:
        write_results(results + paired + (extra_rows or []), out_dir, prefix, cfg, features.name, verdicts=verdicts)
    return results + paired


__all__ = ["evaluate", "PAIRS"]
