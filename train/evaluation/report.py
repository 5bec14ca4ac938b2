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
from scipy import stats

from ..engine.config import Config
from .fid import Stats, frechet_distance
from .plots import grid_scale, overview_figure, plot_metric
from .table import ROWS

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


def write_results(results, out_dir: Path, prefix: str, cfg: Config, metric: str, verdicts: bool = True) -> None:
    """<prefix>results.csv and .md, the metric-vs-NFE plot and the sample overview of an image run."""
    ecfg = cfg.eval
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(results, out_dir / f"{prefix}results.csv")
    (out_dir / f"{prefix}results.md").write_text(results_markdown(results, ecfg, metric, verdicts))
    name = metric.lower().replace("-", "_")
    plot_metric(results, out_dir / (f"{prefix}vs_nfe.png" if prefix.startswith(name) else
                                    f"{prefix}{name}_vs_nfe.png"), metric)
    overview_figure(out_dir, [r for r in results if r["row"] in ROWS], ecfg, out_dir / f"{prefix}samples_overview.png",
                    resolution=cfg.resolution, scale=grid_scale(cfg), prefix=prefix)


def write_csv(results, path: Path, extra_fields=()) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, [*FIELDS, *extra_fields], extrasaction="ignore")
        w.writeheader()
        w.writerows(results)


def _cell(r, fmt: str) -> str:
    se = f" ± {r['se']:.1f}" if r.get("se") not in (None, "") else ""
    return f"{r['value']:{fmt}}{se} (NFE {r['nfe']})"


def table_markdown(results, ecfg, fmt: str = ".2f") -> str:
    """Table 1 layout: a row per sampler, a column per N, each cell 'value (NFE k)'; then the paired
    row and reference rows (e.g. the estimator's floor) where present."""
    Ns = list(ecfg.steps)
    grid = [r for r in results if r["row"] in ROWS]
    extra = [r for r in results if r["row"] not in ROWS]
    head = "| Sampler | " + " | ".join(f"N={N}" for N in Ns) + " |\n|---|" + "---:|" * len(Ns) + "\n"
    lines = []
    for key in ecfg.rows:
        cellv = {r["N"]: r for r in grid if r["row"] == key}
        if not cellv:
            continue
        vals = [_cell(cellv[N], fmt) if N in cellv else "not run" for N in Ns]
        lines.append(f"| {ROWS[key][0]} | " + " | ".join(vals) + " |")
    for key in dict.fromkeys(r["row"] for r in extra if r["sampler"] == "difference"):
        pairs = {r["N"]: r for r in extra if r["row"] == key}
        label = next(iter(pairs.values()))["label"].replace(" (paired)", ", paired")
        lines.append(f"| {label} | " + " | ".join(
            f"{pairs[N]['value']:+{fmt}} ± {pairs[N]['se']:{fmt}}" if N in pairs else "" for N in Ns) + " |")
    extra = [r for r in extra if r["sampler"] != "difference"]
    for r in extra:  # reference rows (e.g. the estimator's floor at each sample count)
        lines.append(f"| {r['label']} | " + " | ".join(
            f"{r['value']:{fmt}}" if r["n_samples"] in {c["n_samples"] for c in grid if c["N"] == N} else ""
            for N in Ns) + " |")
    return head + "\n".join(lines) + "\n"


def results_markdown(results, ecfg, metric: str, verdicts: bool = True) -> str:
    """The table of an image run (`EvalConfig` ecfg) and the note that says how to read it."""
    Ns = list(ecfg.steps)
    grid = [r for r in results if r["row"] in ROWS]
    per_col = ", ".join(f"N={N}: {sorted({r['n_samples'] for r in grid if r['N'] == N})[0]}"
                        for N in Ns if any(r["N"] == N for r in grid))
    dps = ", ".join(f"N={r['N']}: {r['delta_p']:.3g}" for r in grid if r["row"] == "pp")
    note = (f"\n{metric}, lower is better. Samples per cell: {per_col}. NFE = network evaluations per sample "
            f"(Predict-Project and Heun call a network twice per step).")
    if dps:
        note += f" Predict-Project delta_p: {dps}."
    if any(r.get("se") is not None for r in grid):
        note += (f" ± is the bootstrap standard deviation ({ecfg.bootstrap} resamples of the generated "
                 f"samples, reference fixed). Paired rows (a minus b) resample the two cells' samples together "
                 f"(sample i of every cell starts from the same prior draw and noise seed); negative favours a. "
                 f"The noise is that of sampling from this one trained model; training-seed variance is not "
                 f"measured.")
    diffs = [r for r in results if r["sampler"] == "difference"]
    if not verdicts:
        note += ("\n\nNo verdicts: a --quick table (barely trained networks, or `eval --quick`'s few samples per "
                 "cell) is a pipeline check, so its differences say nothing about the samplers.")
    elif diffs:
        note += "\n\n" + "\n".join(bootstrap_verdicts(diffs))
    return table_markdown(results, ecfg) + note + "\n"


#: a difference smaller than this fraction of the compared values is reported as no practical difference,
#: however narrow its interval (e.g. Predict-Project at N = 1000, whose delta_p = 0.003 moves nothing)
MIN_EFFECT = 0.01


def verdict(diff: float, lo: float, hi: float, scale: float) -> str:
    """'within noise' when the 95% interval [lo, hi] of a - b holds 0; 'no practical difference' when it
    does not but |a - b| < MIN_EFFECT * scale; else 'a better' (negative, lower is better) or 'a worse'."""
    if lo <= 0 <= hi:
        return "within noise"
    if abs(diff) < MIN_EFFECT * abs(scale):
        return f"no practical difference (|difference| < {MIN_EFFECT:.0%} of the values)"
    return "better" if diff < 0 else "worse"


def said(a: str, v: str) -> str:
    return f"{a} is {v}" if v in ("better", "worse") else v


def bootstrap_verdicts(diffs) -> list[str]:
    """One line per paired comparison of an image table, from its bootstrap: interval diff ± 1.96 se."""
    out = []
    for r in diffs:
        lo, hi = r["value"] - 1.96 * r["se"], r["value"] + 1.96 * r["se"]
        a, b = r["label"].replace(" (paired)", "").split(" minus ")
        out.append(f"- N={r['N']}: {a} minus {b} = {r['value']:+.2f}, 95% interval [{lo:+.2f}, {hi:+.2f}]: "
                   f"{said(a, verdict(r['value'], lo, hi, r.get('scale', 0.0)))}.")
    return out


def toy_markdown(rows_learned, rows_analytic, floor: dict, cfg: Config, verdict_lines=None) -> str:
    """results.md of the gmm job: the table for the learned and for the analytic score, the floor of
    the W2 estimator, and the paired verdicts (none for --quick)."""
    ecfg, n = cfg.eval, cfg.eval.samples
    text = (f"W2 (POT, exact OT, {n} samples each) to Kwon et al.'s 4-Gaussian mixture; NFE in brackets.\n\n"
            f"### Learned score (MLP 3x{cfg.hidden}, {cfg.iterations} joint iterations)\n\n"
            f"{table_markdown(rows_learned + [floor], ecfg, '.4f')}\n"
            f"### Analytic score (T trained against it)\n\n{table_markdown(rows_analytic + [floor], ecfg, '.4f')}\n"
            f"The floor is the W2 between {n} fresh samples of the true mixture and the (stratified) reference "
            f"set: mean of 3 draws, sd {floor['se']:.4f}. No sampler can be told apart from the truth below it.\n\n")
    if not verdict_lines:
        return text + ("No verdicts: --quick trains for a few hundred steps and evaluates one seed, so its "
                       "differences say nothing about the samplers.\n")
    return text + "\n".join(verdict_lines) + "\n"


def seed_interval(diffs) -> tuple[float, float, float]:
    """(mean, lo, hi): the 95% Student-t interval of the mean of paired per-seed differences."""
    x = torch.tensor(diffs, dtype=torch.float64)
    m = float(x.mean())
    half = float(stats.t.ppf(0.975, len(diffs) - 1) * x.std() / len(diffs) ** 0.5)
    return m, m - half, m + half


def toy_verdicts(per_seed: dict, label: str, steps, seeds: int) -> list[str]:
    """Paired verdicts of the gmm job from `per_seed[(row, N)]` = W2 per seed, where seed s of every
    cell starts from the same prior draws and noise: Predict-Project against EM at equal NFE (2N
    steps) and against EM at the same N (what the projection itself changes)."""
    lines = [f"**{label.capitalize()} score**, paired over {seeds} sampling seeds (95% t-interval of the mean "
             "difference, W2; negative favours Predict-Project). The intervals hold the sampling noise of this one "
             "trained model; training-seed variance is not covered (issue 20's sweep measures it, "
             "docs/pp_sweep_toy.md):"]
    for n in steps:
        if ("pp", n) not in per_seed:
            continue
        parts = []
        same = None
        for b, what in (("em2n", "EM at 2N steps (equal NFE)"), ("em", "EM at N steps")):
            if (b, n) not in per_seed:
                continue
            d = [x - y for x, y in zip(per_seed[("pp", n)], per_seed[(b, n)])]
            m, lo, hi = seed_interval(d)
            scale = float(torch.tensor(per_seed[("pp", n)] + per_seed[(b, n)]).mean())
            v = verdict(m, lo, hi, scale)
            if b == "em":
                same = v
            parts.append(f"vs {what}: {m:+.4f} [{lo:+.4f}, {hi:+.4f}], {said('PP', v)}")
        line = f"- N={n}: " + "; ".join(parts) + "."
        if same is not None and same != "better" and same != "worse":
            line += (" Predict-Project does not differ measurably from EM at the same N here, so the equal-NFE "
                     "comparison is between EM at N and EM at 2N, not a test of the projection.")
        lines.append(line)
    return lines


__all__ = ["bootstrap_se", "paired_difference", "write_results", "write_csv", "table_markdown", "results_markdown",
           "verdict", "bootstrap_verdicts", "toy_markdown", "toy_verdicts", "seed_interval", "MIN_EFFECT"]
