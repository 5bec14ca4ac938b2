"""The report of a run: results.csv and results.md in the layout of Ghimire et al. Table 1, the
bootstrap statistics behind every ± in them, and the paired comparisons between cells.

ALGORITHMS §7. Cells of a table share their prior draws and noise seeds sample by sample, so two
cells are compared by resampling their pairs together; a difference is called only when its paired
interval excludes zero, and "within noise" otherwise.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from .fid import Stats, frechet_distance
from .generate import ROWS

FIELDS = ["row", "label", "sampler", "N", "steps", "nfe", "delta_p", "metric", "value", "se", "n_samples", "seconds"]


def bootstrap_se(f: torch.Tensor, ref: tuple, n_boot: int, seed: int = 0) -> float:
    """Standard deviation of the Fréchet distance over `n_boot` resamples (with replacement) of the
    generated features `f` (n, d), the reference held fixed: the sampling noise of one cell's value."""
    g = torch.Generator().manual_seed(seed)
    n = f.shape[0]
    vals = [frechet_distance(*Stats(f.shape[1]).add(f[torch.randint(0, n, (n,), generator=g)]).mu_sigma(), *ref)
            for _ in range(n_boot)]
    return float(torch.tensor(vals, dtype=torch.float64).std())


def paired_difference(f_a: torch.Tensor, f_b: torch.Tensor, ref: tuple, n_boot: int, seed: int = 0):
    """FD(a) - FD(b) and its bootstrap standard deviation, resampling the pairs (a_i, b_i) together.

    Cells share their prior draws and noise seeds sample by sample, so this paired error is much
    smaller than the two cells' own errors combined."""
    if f_a.shape != f_b.shape:
        raise ValueError(f"paired cells need equal sample counts, got {tuple(f_a.shape)} and {tuple(f_b.shape)}")
    dims, n = f_a.shape[1], f_a.shape[0]

    def fd(f):
        return frechet_distance(*Stats(dims).add(f).mu_sigma(), *ref)

    g = torch.Generator().manual_seed(seed + 1)
    vals = []
    for _ in range(n_boot):
        i = torch.randint(0, n, (n,), generator=g)
        vals.append(fd(f_a[i]) - fd(f_b[i]))
    return fd(f_a) - fd(f_b), float(torch.tensor(vals, dtype=torch.float64).std())


def write_results(results, out_dir: Path, prefix: str, cfg: dict, ecfg: dict, metric: str) -> None:
    """<prefix>results.csv and .md, the metric-vs-NFE plot and the sample overview of an image run."""
    from .plots import grid_scale, overview_figure, plot_metric

    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(results, out_dir / f"{prefix}results.csv")
    (out_dir / f"{prefix}results.md").write_text(results_markdown(results, ecfg, metric))
    name = metric.lower().replace("-", "_")
    plot_metric(results, out_dir / (f"{prefix}vs_nfe.png" if prefix.startswith(name) else
                                    f"{prefix}{name}_vs_nfe.png"), metric)
    overview_figure(out_dir, [r for r in results if r["row"] in ROWS], ecfg, out_dir / f"{prefix}samples_overview.png",
                    resolution=cfg["resolution"], scale=grid_scale(cfg), prefix=prefix)


def write_csv(results, path: Path, extra_fields=()) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, [*FIELDS, *extra_fields], extrasaction="ignore")
        w.writeheader()
        w.writerows(results)


def _cell(r, fmt: str) -> str:
    se = f" ± {r['se']:.1f}" if r.get("se") not in (None, "") else ""
    return f"{r['value']:{fmt}}{se} (NFE {r['nfe']})"


def table_markdown(results, ecfg: dict, fmt: str = ".2f") -> str:
    """Table 1 layout: a row per sampler, a column per N, each cell 'value (NFE k)'; then the paired
    row and reference rows (e.g. the estimator's floor) where present."""
    Ns = list(ecfg["steps"])
    grid = [r for r in results if r["row"] in ROWS]
    extra = [r for r in results if r["row"] not in ROWS]
    head = "| Sampler | " + " | ".join(f"N={N}" for N in Ns) + " |\n|---|" + "---:|" * len(Ns) + "\n"
    lines = []
    for key in ecfg["rows"]:
        cellv = {r["N"]: r for r in grid if r["row"] == key}
        if not cellv:
            continue
        vals = [_cell(cellv[N], fmt) if N in cellv else "not run" for N in Ns]
        lines.append(f"| {ROWS[key][0]} | " + " | ".join(vals) + " |")
    pairs = {r["N"]: r for r in extra if r["row"] == "pp_minus_em"}
    if pairs:
        lines.append("| Predict-Project minus EM, paired | " + " | ".join(
            f"{pairs[N]['value']:+.2f} ± {pairs[N]['se']:.1f}" if N in pairs else "" for N in Ns) + " |")
    extra = [r for r in extra if r["row"] != "pp_minus_em"]
    for r in extra:  # reference rows (e.g. the estimator's floor at each sample count)
        lines.append(f"| {r['label']} | " + " | ".join(
            f"{r['value']:{fmt}}" if r["n_samples"] in {c["n_samples"] for c in grid if c["N"] == N} else ""
            for N in Ns) + " |")
    return head + "\n".join(lines) + "\n"


def results_markdown(results, ecfg: dict, metric: str) -> str:
    """The table of an image run and the note that says how to read it."""
    Ns = list(ecfg["steps"])
    grid = [r for r in results if r["row"] in ROWS]
    per_col = ", ".join(f"N={N}: {sorted({r['n_samples'] for r in grid if r['N'] == N})[0]}"
                        for N in Ns if any(r["N"] == N for r in grid))
    dps = ", ".join(f"N={r['N']}: {r['delta_p']:.3g}" for r in grid if r["row"] == "pp")
    note = (f"\n{metric}, lower is better. Samples per cell: {per_col}. NFE = network evaluations per sample "
            f"(Predict-Project and Heun call a network twice per step).")
    if dps:
        note += f" Predict-Project delta_p: {dps}."
    if any(r.get("se") is not None for r in grid):
        note += (f" ± is the bootstrap standard deviation ({ecfg.get('bootstrap')} resamples of the generated "
                 f"samples, reference fixed). The paired row resamples EM and Predict-Project samples together "
                 f"(sample i of both starts from the same prior draw and noise seed); negative favours "
                 f"Predict-Project, and only a difference beyond about twice its ± is a finding.")
    return table_markdown(results, ecfg) + note + "\n"


def toy_markdown(rows_learned, rows_analytic, floor: dict, cfg: dict) -> str:
    """results.md of the gmm job: the table for the learned and for the analytic score, the floor of
    the W2 estimator, and the verdicts."""
    ecfg, n = cfg["eval"], cfg["eval"]["samples"]
    return (f"W2 (POT, exact OT, {n} samples each) to Kwon et al.'s 4-Gaussian mixture; NFE in brackets.\n\n"
            f"### Learned score (MLP 3x{cfg['hidden']}, {cfg['iterations']} joint iterations)\n\n"
            f"{table_markdown(rows_learned + [floor], ecfg, '.4f')}\n"
            f"### Analytic score (T trained against it)\n\n{table_markdown(rows_analytic + [floor], ecfg, '.4f')}\n"
            f"The floor is the W2 between {n} fresh samples of the true mixture and the reference set (mean of 3 "
            f"draws, sd {floor['se']:.4f}): no sampler can be told apart from the truth below it, and differences "
            f"under ~2 sd are noise.\n\n"
            + toy_verdict(rows_learned, "learned", ecfg["steps"], floor["se"]) + "\n"
            + toy_verdict(rows_analytic, "analytic", ecfg["steps"], floor["se"]) + "\n")


def toy_verdict(rows, label, steps, noise):
    """Predict-Project at N against EM at 2N steps (equal NFE), cell by cell, from the measured rows."""
    parts = []
    for n in steps:
        pp = next((r["value"] for r in rows if r["row"] == "pp" and r["N"] == n), None)
        em = next((r["value"] for r in rows if r["row"] == "em2n" and r["N"] == n), None)
        if pp is None or em is None:
            continue
        word = "within noise of" if abs(pp - em) < 2 * noise else ("better than" if pp < em else "worse than")
        parts.append(f"N={n}: PP {pp:.4f} {word} EM {em:.4f}")
    return f"- {label} score, Predict-Project vs EM at equal NFE: " + "; ".join(parts) + "."
