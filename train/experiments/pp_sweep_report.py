"""The grid of issue 20's sweep and its report (docs/pp_sweep.md; ALGORITHMS §3, §7): per-seed paired
differences against EM at equal cost, their mean over the training seeds with a Student-t interval (which
holds the between-seed spread), the verdicts, Table 1 across seeds with its variance split, the figure.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from wgfcore import ops
from wgfcore.sde import VPSDE

from ..evaluation.fid import Stats, frechet_distance
from ..evaluation.report import bootstrap_se, paired_difference
from .pp_sweep_cost import LABEL, PROJ, cost_function, timing_lines
from .pp_sweep_doc import DOC_MARK, cells_lines, plot, rewrite_doc, sweep_lines

#: the pre-registered delta_p grid: from the paper's value up to the first value whose largest per-step
#: fraction sqrt(beta) dp dtau / (1 + sqrt(beta)/2) exceeds 1; half-decade steps, decade steps at N = 100
#: (docs/pp_sweep.md, second amendment: budget)
GRID = {20: (1.0, 3.0, 10.0, 30.0), 40: (0.4, 1.0, 3.0, 10.0, 30.0, 100.0), 100: (0.1, 1.0, 10.0, 100.0)}
#: the step counts at which the two Tweedie projections are drawn (the same amendment)
TWEEDIE_STEPS = (20, 40)
#: sizes (pre-registered; --small shrinks them): samples per sweep cell, per Table 1 cell, per figure point
S = {"samples": 200, "table1_samples": 400, "fig_n": 200, "batch": 200, "n_boot": 200, "timing_steps": 10,
     "timing_rounds": 7}
#: the comparisons whose per-seed paired bootstrap sd (the sampling noise of d_s) is computed: the projection's
#: own effect and the main cost measure (~3 s per seed and comparison on one thread)
BOOT_COMPARISONS = ("same_n", "flops")


def paper_dp(N: int) -> float:
    return ops.default_delta_p(N)


def fraction_range(N: int, dp: float) -> tuple[float, float, int]:
    """(min, max, steps above 1) of the per-step fraction on N's time grid."""
    sde, ts = VPSDE(), ops.time_grid(N)
    f = ops.project_coefficients(sde, ts, dp) / (1 + torch.sqrt(sde.beta(ts[:-1])) / 2)
    return float(f.min()), float(f.max()), int((f > 1).sum())


def cell_name(kind: str, steps: int, dp=None, width: str | None = None) -> str:
    """em_26, heun_20, pp_w0.5_20_dp3, tweedie_40_dp0.4, tweedie_free_20_dp1."""
    if kind in ("em", "heun"):
        return f"{kind}_{steps}"
    return f"{kind}{f'_w{width}' if kind == 'pp' else ''}_{steps}_dp{dp:g}"


def cell_file(out: Path, key) -> Path:
    seed, sha, name = key
    return Path(out) / "cells" / f"s{seed}-{sha}" / f"{name}.pt"


def load_features(out: Path, key, n: int):
    """The first n cached features of a cell (sample i is the same whatever n), or None."""
    f = cell_file(out, key)
    if not f.is_file():
        return None
    x = torch.load(f, weights_only=True)["features"]
    return x[:n] if x.shape[0] >= n else None


def t_interval(x) -> tuple[float, float, float]:
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return float(x.mean()), float(x.mean()) - half, float(x.mean()) + half


def verdict(lo: float, hi: float) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "one seed"
    return "pays" if hi < 0 else ("loses" if lo > 0 else "within noise")


def spread(values, boot_sds) -> dict:
    """Mean over seeds with its t-interval, and the split of the spread: sampling = the mean bootstrap
    variance of one cell, training = the variance over seeds minus that (floored at 0)."""
    mean, lo, hi = t_interval(values)
    total = float(np.var(values, ddof=1)) if len(values) > 1 else math.nan
    samp = float(np.mean(np.square(boot_sds)))
    return {"mean": mean, "lo": lo, "hi": hi, "values": [float(v) for v in values], "sd_total": math.sqrt(total),
            "sd_sampling": math.sqrt(samp), "sd_training": math.sqrt(max(total - samp, 0.0))}


def config_rows(configs, value, fig_n, boot_sd=None) -> list:
    """One row per configuration (projection, width, N, dp): its mean value over the seeds and, for each
    comparison, the per-seed paired differences with their mean and t-interval over the seeds. value(key, n)
    is a cell's metric on its first n samples (None: not drawn); boot_sd(a, b, n, seed), when given, the
    bootstrap sd of one seed's paired difference (its sampling noise)."""
    groups = {}
    for c in configs:
        groups.setdefault((PROJ.index(c["proj"]), -float(c["width"].replace("-", "0")), c["N"], c["dp"]), []).append(c)
    rows = []
    for _, cs in sorted(groups.items()):
        c0 = cs[0]
        row = {"proj": c0["proj"], "width": c0["width"], "N": c0["N"], "dp": c0["dp"], "n": c0["n"], "K": c0["K"],
               "seeds": [c["seed"] for c in cs], "fraction": fraction_range(c0["N"], c0["dp"])}
        vals = [value(c["cell"], c["n"]) for c in cs]
        if any(v is None for v in vals):
            rows.append(dict(row, missing=True))
            continue
        row["value"], row["fig"] = float(np.mean(vals)), float(np.mean([value(c["cell"], fig_n) for c in cs]))
        for m in ("same_n", "nfe", "flops", "wall"):
            other = [value(c["comp"][m], c["n"]) for c in cs]
            if any(v is None for v in other):
                continue
            d = [a - b for a, b in zip(vals, other)]
            mean, lo, hi = t_interval(d)
            row[m] = {"diff": mean, "lo": lo, "hi": hi, "per_seed": d, "verdict": verdict(lo, hi)}
            if boot_sd is not None and m in BOOT_COMPARISONS:
                row[m]["boot_sd"] = [boot_sd(c["cell"], c["comp"][m], c["n"], c["seed"]) for c in cs]
        rows.append(row)
    return rows


def em_curve(configs, value, fig_n) -> dict:
    """{("em", K): {(seed, net): value}} at the step counts every seed drew (the figure's EM curve)."""
    curves, seeds = {}, {c["seed"] for c in configs}
    for c in configs:
        for key in c["comp"].values():
            v = value(key, fig_n)
            if v is not None:
                curves.setdefault(("em", int(key[2].split("_")[1])), {})[key[:2]] = v
    return {k: v for k, v in curves.items() if {s for s, _ in v} == seeds}


def _paired_bootstrap(out: str, a, b, n: int, ref, n_boot: int) -> list:
    """[FD(a) - FD(b), its paired bootstrap sd] of two cached cells (a worker process's job)."""
    import torch as _torch

    _torch.set_num_threads(1)
    return list(paired_difference(load_features(Path(out), a, n), load_features(Path(out), b, n), ref, n_boot, a[0]))


def analyse(out: Path, configs, runs, ref, jobs: int = 1):
    fd = {}
    boot_file = out / "bootstrap.json"  # a bootstrap of 200 resamples costs ~10 s; a re-render reuses it
    try:
        boot = json.loads(boot_file.read_text())
    except (OSError, ValueError):
        boot = {}

    def cached(what, keys, n, seed, fn):
        k = f"{what}|{'|'.join(map(str, keys))}|{n}|{S['n_boot']}|{seed}"
        if k not in boot:
            boot[k] = fn()
            tmp = boot_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(boot, indent=0))
            os.replace(tmp, boot_file)
        return boot[k]

    def value(key, n):
        if (key, n) not in fd:
            f = load_features(out, key, n)
            fd[(key, n)] = None if f is None else frechet_distance(*Stats(f.shape[1]).add(f).mu_sigma(), *ref)
        return fd[(key, n)]

    def pair_key(a, b, n):
        return f"pair|{a[1]}|{a[2]}|{b[2]}|{n}|{S['n_boot']}|{a[0]}"

    todo = {}
    for c in configs:
        for m in BOOT_COMPARISONS:
            a, b = c["cell"], c["comp"][m]
            if pair_key(a, b, c["n"]) not in boot and value(a, c["n"]) is not None and value(b, c["n"]) is not None:
                todo[pair_key(a, b, c["n"])] = (str(out), a, b, c["n"], ref, S["n_boot"])
    if todo:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            for k, res in zip(todo, ex.map(_paired_bootstrap, *zip(*todo.values()))):
                boot[k] = res
        tmp = boot_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(boot, indent=0))
        os.replace(tmp, boot_file)
    rows = config_rows(configs, value, S["fig_n"], lambda a, b, n, seed: boot.get(pair_key(a, b, n), [0, math.nan])[1])
    # Table 1 over the width-1 runs, with the variance split
    table1, w1 = [], [r for r in runs if r.width == "1"]
    for N in GRID:
        dp0, n = paper_dp(N), S["table1_samples"]
        names = {"em": ("em", N, None), "pp": ("pp", N, dp0), "em2n": ("em", 2 * N, None), "heun": ("heun", N, None)}
        feats = {k: [load_features(out, (r.seed, r.eps_sha, cell_name(*v, "1")), n) for r in w1] for k, v in names.items()}
        if not w1 or any(f is None for fs in feats.values() for f in fs):
            continue
        e = {"N": N, "dp": dp0, "seeds": [r.seed for r in w1]}
        for k, fs in feats.items():
            e[k] = spread([value((r.seed, r.eps_sha, cell_name(*names[k], "1")), n) for r in w1],
                          [cached("se", [r.eps_sha, cell_name(*names[k], "1")], n, r.seed,
                                  lambda f=f, r=r: bootstrap_se(f, ref, S["n_boot"], r.seed)) for f, r in zip(fs, w1)])
        for a, b in (("pp", "em"), ("pp", "em2n"), ("em2n", "em")):
            p = [cached("pair", [r.eps_sha, cell_name(*names[a], "1"), cell_name(*names[b], "1")], n, r.seed,
                        lambda fa=fa, fb=fb, r=r: list(paired_difference(fa, fb, ref, S["n_boot"], r.seed)))
                 for fa, fb, r in zip(feats[a], feats[b], w1)]
            e[f"{a}-{b}"] = spread([x[0] for x in p], [x[1] for x in p])
        table1.append(e)
    curves = em_curve(configs, value, S["fig_n"])
    return rows, table1, curves, value


def noise_lines(rows) -> list:
    """Per configuration: the spread of d_s over the seeds (total), its sampling part (the mean over seeds of
    the paired bootstrap variance) and the rest, attributed to training (floored at 0)."""
    L = [f"The spread over training seeds of each paired difference d_s (sd, digits-FD), split as in Table 1 into "
         f"sampling (the paired bootstrap sd of one seed's d_s, {S['n_boot']} resamples, root mean square over the "
         "seeds) and training (√(total² − sampling²), 0 when negative).", "",
         "| T | N | δp | vs EM at N: total / sampling / training | vs EM at equal FLOPs: total / sampling / training |",
         "|---|---:|---:|---|---|"]
    for r in rows:
        if r.get("missing") or any(m not in r or "boot_sd" not in r[m] for m in BOOT_COMPARISONS):
            continue
        cols = []
        for m in BOOT_COMPARISONS:
            sp = spread(r[m]["per_seed"], r[m]["boot_sd"])
            cols.append(f"{sp['sd_total']:.2f} / {sp['sd_sampling']:.2f} / {sp['sd_training']:.2f}")
        T = f"learned, width {r['width']}" if r["proj"] == "pp" else LABEL[r["proj"]]
        L.append(f"| {T} | {r['N']} | {r['dp']:g} | {cols[0]} | {cols[1]} |")
    return L


def markdown(args, rows, table1, runs, timing) -> str:
    fl = {r.width: r.flops for r in runs}
    Fs = next(iter(fl.values()))[0]

    def flops_of(kind, w):
        return {"em": Fs, "heun": 2 * Fs, "tweedie": 2 * Fs, "tweedie_free": Fs}.get(kind) or (
            sum(fl[w]) if w in fl else None)

    L = [DOC_MARK, "", f"Generated by `python train/run.py {' '.join(args.argv)}` from the cells cached in its --out "
         f"folder. Training seeds {sorted({r.seed for r in runs})}; T widths "
         f"{sorted({r.width for r in runs}, key=float, reverse=True)}; digits-FD, lower is better.", ""]
    L += timing_lines(timing, flops_of)
    if table1:
        L += ["", f"### Table 1 over {len(table1[0]['seeds'])} training seeds (width-1 T, the paper's δp)", "",
              f"{S['table1_samples']} samples per cell. Mean over the seeds [95% t-interval]; the spread over seeds "
              f"(sd total) split into sampling (the mean bootstrap sd of one cell, {S['n_boot']} resamples) and "
              "training (√(total² − sampling²), 0 when negative).", "",
              "| N (δp) | cell | per seed | mean [95% interval] | sd total | sd sampling | sd training |",
              "|---|---|---|---|---:|---:|---:|"]
        names = {"em": "EM", "pp": "Predict-Project", "em2n": "EM at 2N steps", "heun": "Heun PF-ODE",
                 "pp-em": "PP − EM (paired)", "pp-em2n": "PP − EM at 2N (paired)", "em2n-em": "EM 2N − EM N (paired)"}
        for e in table1:
            for k, name in names.items():
                s = e[k]
                L.append(f"| {e['N']} ({e['dp']:g}) | {name} | {', '.join(f'{v:.2f}' for v in s['values'])} | "
                         f"{s['mean']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}] | {s['sd_total']:.2f} | "
                         f"{s['sd_sampling']:.2f} | {s['sd_training']:.2f} |")
    L += ["", "### The sweep: paired differences, mean over seeds [95% t-interval]", ""]
    L += sweep_lines(rows, "digits-FD", S["samples"])
    L += ["", "### Where the sweep's noise comes from", ""] + noise_lines(rows)
    return "\n".join(L + ["", "![quality against cost](figures/pp_sweep.png)", ""]) + "\n"


def write_report(args, configs, cells, runs, timing, log) -> None:
    from ..data.datasets import load_digits_tensor
    from ..evaluation.digits_classifier import DigitsFeatures, get_classifier

    net, _ = get_classifier(args.out / ".cache", resolution=16, epochs=12)
    feats = DigitsFeatures(net)
    ref = Stats(feats.dims).add(feats(load_digits_tensor(16)[0])).mu_sigma()
    rows, table1, curves, value = analyse(args.out, configs, runs, ref, args.jobs)
    heun = {}
    for key, (_, kind, steps, _, _, _) in cells.items():
        if kind == "heun" and value(key, S["fig_n"]) is not None:
            heun.setdefault(steps, []).append(value(key, S["fig_n"]))
    heun = {N: float(np.mean(v)) for N, v in heun.items()}
    doc = args.doc or args.out / "pp_sweep.md"
    per_cell = {(k[0], k[2], n): value(k, n) for k, v in cells.items()
                for n in sorted({S["samples"], v[3]}) if n <= v[3] and value(k, n) is not None}
    cells_doc = doc.with_name(doc.stem + "_cells.md")
    rewrite_doc(doc, markdown(args, rows, table1, runs, timing) + f"\nEvery cell's digits-FD by training seed: "
                f"[{cells_doc.name}]({cells_doc.name}).\n", "# Predict-Project sweep")
    cells_doc.write_text(f"# The cells of the sweep in [{doc.name}]({doc.name}), by training seed\n\nGenerated with it "
                         f"(`python train/run.py {' '.join(args.argv)}`): digits-FD of each cell's n samples (sample i "
                         "is the same whatever n, so a subset re-derives these values).\n\n"
                         + "\n".join(cells_lines(per_cell, ".4f")) + "\n")
    cost = cost_function({r.width: r.flops for r in runs}, timing)
    for d in [args.out] + ([args.figures] if args.figures else []):
        plot(rows, curves, heun, cost, Path(d) / "pp_sweep.png", f"digits-FD (mean over seeds, {S['fig_n']} samples)")
    (args.out / "summary.json").write_text(json.dumps({"rows": rows, "table1": table1}, indent=1, default=str))
    log(f"wrote {doc} and the figure: {sum(not r.get('missing') for r in rows)} of {len(rows)} configurations drawn")


__all__ = ["GRID", "TWEEDIE_STEPS", "PROJ", "S", "cell_name", "cell_file", "load_features", "paper_dp", "config_rows",
           "em_curve", "write_report"]
