"""Figures of a run and of the experiments: sample grids, training curves, metric against NFE, the
per-cell sample overview, the toy's scatter plots, and median-and-band curves. ALGORITHMS §7 (what is
plotted is what the tables report). `pyplot()` is the one place that picks matplotlib's backend.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from .table import ROWS


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display is needed or used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def band(ax, x, Y, label, color, ls="-", alpha=0.2):
    """The median over axis 1 of Y (one column per path) as a line, and its 10-90% band."""
    ax.plot(x, np.median(Y, 1), ls, color=color, label=label, lw=1.4)
    ax.fill_between(x, np.quantile(Y, 0.1, 1), np.quantile(Y, 0.9, 1), color=color, alpha=alpha, lw=0)


def grid_scale(cfg) -> int:
    return max(1, 64 // cfg.resolution)


def save_grid(x: torch.Tensor, path: Path, nrow: int = 8, scale: int = 1) -> None:
    from torchvision.utils import save_image

    x = (x.float().clamp(-1, 1) + 1) / 2
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(x, str(path), nrow=nrow, padding=2, pad_value=1.0)


def plot_metric(results, path: Path, metric: str) -> None:
    """The metric against NFE, a line per sampler row (error bars where the cells have a ±), reference
    rows as dotted lines; `results` is a list of rows, or {panel title: rows} for panels side by side."""
    plt = pyplot()

    panels = results if isinstance(results, dict) else {"": results}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), dpi=110, sharey=True, squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels.items()):
        _metric_axes(ax, rows, metric, title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _metric_axes(ax, results, metric: str, title: str) -> None:
    for key, (label, _, _) in ROWS.items():
        rs = sorted((r for r in results if r["row"] == key), key=lambda r: r["nfe"])
        if rs:
            se = [r.get("se") for r in rs]
            ax.errorbar([r["nfe"] for r in rs], [r["value"] for r in rs], marker="o", label=label, capsize=3,
                        yerr=None if any(v is None for v in se) else se)
    for r in results:
        if r["sampler"] == "data":
            ax.axhline(r["value"], color="gray", ls=":", lw=1, label=r["label"])
    ax.set_xscale("log")
    ax.set_xlabel("NFE per sample (log scale)")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)


def plot_losses(csv_path: Path, path: Path) -> None:
    """Training curves from losses.csv: L_dsm and L_proj against the step (log y)."""
    plt = pyplot()

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    step = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    ax.plot(step, [float(r["dsm"]) for r in rows], label="L_dsm (score, eps-prediction)")
    ax.plot(step, [float(r["proj"]) for r in rows], label="L_proj (projection)")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss per sample (mean over the log interval)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def overview_figure(run_dir: Path, results, ecfg, path: Path, k: int = 4, resolution: int = 16,
                    scale: int = 1, prefix: str = "") -> None:
    """One figure of the first k x k samples of every evaluated cell (rows: samplers, columns: N),
    cut from the per-cell grids in run_dir/samples (tiles of resolution*scale px, 2 px padding)."""
    plt = pyplot()
    from PIL import Image

    rows = [key for key in ecfg.rows if any(r["row"] == key for r in results)]
    Ns = list(ecfg.steps)
    tile = resolution * scale + 2
    fig, axes = plt.subplots(len(rows), len(Ns), figsize=(1.9 * len(Ns) + 1.2, 1.9 * len(rows) + 0.3), dpi=100,
                             squeeze=False)
    for i, key in enumerate(rows):
        for j, N in enumerate(Ns):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            r = next((r for r in results if r["row"] == key and r["N"] == N), None)
            f = Path(run_dir) / "samples" / f"{prefix}{key}_N{N}.png"
            if r is not None and f.is_file():
                with Image.open(f) as im:
                    ax.imshow(im.convert("L").crop((0, 0, 2 + k * tile, 2 + k * tile)), cmap="gray", vmin=0,
                              vmax=255, interpolation="nearest")
                ax.set_title(f"N={N}, NFE {r['nfe']}: {r['value']:.1f}", fontsize=7)
            else:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            if j == 0:
                ax.set_ylabel(ROWS[key][0].replace(" (", "\n("), fontsize=7)
    metric = results[0]["metric"] if results else ""
    fig.suptitle(f"First {k * k} samples per cell (same prior draws); titles: {metric}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def toy_scatter(samples, ref, steps, path, title):
    plt = pyplot()

    names = list(dict.fromkeys(k[0] for k in samples))
    fig, axes = plt.subplots(len(names), len(steps) + 1, figsize=(2.3 * (len(steps) + 1), 2.3 * len(names)),
                             squeeze=False)
    for r, nm in enumerate(names):
        ax = axes[r][0]
        ax.scatter(ref[:, 0], ref[:, 1], s=1, c="k", alpha=0.3)
        ax.set_ylabel(nm.replace(" (", "\n("), fontsize=7)
        if r == 0:
            ax.set_title("data", fontsize=8)
        for c, n in enumerate(steps):
            ax = axes[r][c + 1]
            x = samples[(nm, n)]
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3)
            if r == 0:
                ax.set_title(f"N={n}", fontsize=8)
    for ax in axes.flat:
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["pyplot", "band", "grid_scale", "save_grid", "plot_metric", "plot_losses", "overview_figure", "toy_scatter"]
