"""Chen et al.'s geometry with the exact empirical score: the memorising optimal denoiser (ALGORITHMS §5).

Chen et al., *A Geometric Perspective on Diffusion Models*. The same statistics on a *trained* U-Net:
`train/run.py chen` (train/experiments/chen_trajectories.py).

EDM Heun over a Karras sigma grid, driven by the empirical optimal denoiser D* (mean shift, no training),
on two small datasets: the scikit-learn digits (8x8, [-1, 1], no download) and samples of Kwon et al.'s
2-D mixture. Records both trajectories of every sample and their statistics: relative deviation from the
chord x_0 -> x_N, turning angle per step, distance of x_i and of D(x_i; sigma_i) to the nearest training
sample (memorisation).

    python train/run.py chen-optimal --out runs/geometry --figures docs/figures

Writes geometry.csv and geometry_stats.png, geometry_2d.png, geometry_digits.png into --out (and the
PNGs also into --figures when given).
"""
from __future__ import annotations

import argparse
import csv
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from wgfcore.denoisers import optimal_denoiser
from wgfcore.edm import trajectories
from wgfcore.geometry import deviation, nn_distance_trajectory, turning_angle, typical_spacing
from wgfcore.scores import kwon_mixture
from wgfcore.sde import karras_sigmas

from ..data.datasets import load_digits_tensor
from ..engine.cli import path, pos_int, seed as seed_arg, threads
from ..engine.errors import UsageError
from ..evaluation.plots import band, pyplot

FIGURES = ("geometry_stats.png", "geometry_2d.png", "geometry_digits.png")


def add_karras_args(p: argparse.ArgumentParser) -> None:
    """The EDM sampling grid of both Chen et al. studies: N Karras steps from sigma_max to sigma_min."""
    p.add_argument("--steps", type=int, default=18, help="Karras steps N (full sample: NFE = 2N - 1 with Heun)")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--rho", type=float, default=7.0)


def check_karras_args(args) -> None:
    """A UsageError naming what is wrong with the grid arguments."""
    if args.steps < 2:
        raise UsageError(f"--steps must be >= 2, got {args.steps}")
    if not 0 < args.sigma_min < args.sigma_max < float("inf") or not 0 < args.rho < float("inf"):
        raise UsageError("need 0 < --sigma-min < --sigma-max and --rho > 0, all finite")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", type=path, default=Path("runs/geometry"), help="output folder")
    p.add_argument("--figures", type=path, default=None, help="also copy the PNGs here (e.g. docs/figures)")
    p.add_argument("--seed", type=seed_arg, default=0)
    add_karras_args(p)
    p.add_argument("--n-digits", type=pos_int, default=128, help="trajectories on the digits")
    p.add_argument("--n-2d-data", type=pos_int, default=256, help="size of the 2-D training set (mixture samples)")
    p.add_argument("--n-2d", type=pos_int, default=128, help="trajectories in 2-D (16 are drawn)")
    p.add_argument("--threads", type=threads, default=1)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def load_digits_data() -> torch.Tensor:
    """(1797, 8, 8) float64 in [-1, 1], the digits as the trainer sees them (train.data.datasets)."""
    return load_digits_tensor(8)[0][:, 0].to(torch.float64)


def paths(name, data, n, sigmas, g, progress):
    """n trajectories of EDM Heun driven by D* over `data`, and their statistics."""
    x0 = float(sigmas[0]) * torch.randn(n, *data.shape[1:], generator=g, dtype=torch.float64)
    tr = trajectories(lambda x, s: optimal_denoiser(x, s, data), x0, sigmas, sampler="heun", progress=progress)
    X, Dn = tr["x"], tr["denoised"]
    chord = (X[-1] - X[0]).flatten(1).norm(dim=1)
    stats = {
        "traj": tr,
        "rel_dev": (deviation(X) / chord).numpy(),  # (N+1, B)
        "angle": (turning_angle(X) * 180 / math.pi).numpy(),  # (N-1, B)
        "nn_x": nn_distance_trajectory(X, data).numpy(),  # (N+1, B)
        "nn_d": nn_distance_trajectory(Dn, data).numpy(),  # (N, B)
        "spacing": float(typical_spacing(data).median()),
    }
    final = stats["nn_x"][-1]
    print(f"[{name}] M={len(data)} B={n} N={len(sigmas) - 1}: max relative deviation "
          f"{stats['rel_dev'].max():.4f} (mean of per-path max {stats['rel_dev'].max(0).mean():.4f}); "
          f"final NN distance max {final.max():.2e}, median {np.median(final):.2e} vs median data spacing "
          f"{stats['spacing']:.3g}; max turning angle {stats['angle'].max():.1f} deg")
    return stats


def run(args) -> int:
    study(args)
    return 0


def study(args) -> dict:
    """The whole study (statistics, CSV, figures); returns the statistics of both datasets."""
    check_karras_args(args)
    torch.set_num_threads(args.threads)
    plt = pyplot()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot create it ({e.strerror})") from None
    t0 = time.time()
    sigmas = karras_sigmas(args.steps, args.sigma_min, args.sigma_max, args.rho)
    g = torch.Generator().manual_seed(args.seed)
    digits = load_digits_data()
    pts = kwon_mixture().sample(args.n_2d_data, generator=g)
    S = {"digits": paths("digits", digits, args.n_digits, sigmas, g, args.progress),
         "2d": paths("kwon 2-D", pts, args.n_2d, sigmas, g, args.progress)}
    N = args.steps
    sig = sigmas.numpy()

    with open(args.out / "geometry.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "i", "sigma", "rel_deviation_median", "rel_deviation_max", "turning_angle_deg_median",
                    "nn_x_median", "nn_denoised_median", "nn_denoised_max", "data_spacing_median"])
        for name, s in S.items():
            for i in range(N + 1):
                ang = np.median(s["angle"][i - 1]) if 1 <= i <= N - 1 else ""  # angle at x_i needs i-1, i, i+1
                nd = (np.median(s["nn_d"][i]), s["nn_d"][i].max()) if i < N else ("", "")
                w.writerow([name, i, sig[i], np.median(s["rel_dev"][i]), s["rel_dev"][i].max(), ang,
                            np.median(s["nn_x"][i]), *nd, s["spacing"]])

    # --- statistics ---------------------------------------------------------------------------
    fig, axs = plt.subplots(1, 3, figsize=(12, 3.4), dpi=90)
    steps = np.arange(N + 1)
    for (name, s), c in zip(S.items(), ("tab:blue", "tab:orange")):
        band(axs[0], steps, s["rel_dev"], name, c)
        band(axs[1], np.arange(1, N), s["angle"], name, c)
        # exact memorisation gives ~1e-16 (float64 rounding): drawn at 1e-6 so the approach stays readable
        band(axs[2], sig[:-1], np.maximum(s["nn_d"] / s["spacing"], 1e-6), f"{name}: D(x_i; σ_i)", c)
        band(axs[2], sig[:-1], np.maximum(s["nn_x"][:-1] / s["spacing"], 1e-6), f"{name}: x_i", c, ls="--")
    axs[0].set(xlabel="step i", ylabel="deviation / |x_N − x_0|", title="distance from the chord x_0 → x_N")
    axs[1].set(xlabel="step i (at x_i)", ylabel="degrees", title="turning angle between successive steps")
    axs[2].set(xscale="log", yscale="log", xlabel="σ_i", ylabel="NN distance / median data spacing",
               title="distance to the nearest training sample\n(values < 1e-6 drawn at 1e-6)")
    axs[2].invert_xaxis()
    for ax in axs:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"EDM Heun + empirical optimal denoiser, Karras N={N}, σ {args.sigma_max:g}→{args.sigma_min:g} "
                 "(median, 10–90% band)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / FIGURES[0])
    plt.close(fig)

    # --- 2-D picture: sampling vs denoising trajectories ---------------------------------------
    tr = S["2d"]["traj"]
    X, Dn = tr["x"][:, :16].numpy(), tr["denoised"][:, :16].numpy()
    fig, axs = plt.subplots(1, 2, figsize=(9, 4.4), dpi=90)
    for ax, lim in zip(axs, (1.15 * np.abs(X[0]).max(), 0.8)):
        ax.scatter(pts[:, 0], pts[:, 1], s=4, c="lightgray", label="training samples", zorder=1)
        for b in range(X.shape[1]):
            ax.plot(X[:, b, 0], X[:, b, 1], "-o", ms=2, lw=0.8, c="tab:blue", alpha=0.8,
                    label="sampling trajectory x_i" if b == 0 else None, zorder=2)
            ax.plot(Dn[:, b, 0], Dn[:, b, 1], "-s", ms=2, lw=0.8, c="tab:red", alpha=0.8,
                    label="denoising trajectory D(x_i; σ_i)" if b == 0 else None, zorder=3)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    axs[0].set_title(f"full view (x_0 ~ N(0, {args.sigma_max:g}² I)): quasi-linear", fontsize=9)
    axs[1].set_title("zoom: D(x_i; σ_i) leaves the data mean and reaches a sample first", fontsize=9)
    axs[1].legend(fontsize=7, loc="center")
    fig.tight_layout()
    fig.savefig(args.out / FIGURES[1])
    plt.close(fig)

    # --- digits: x_i and D(x_i; sigma_i) as images at a few steps --------------------------------
    tr = S["digits"]["traj"]
    cols = sorted(set(np.linspace(0, N - 1, 8).round().astype(int)))
    rows = min(4, tr["x"].shape[1])
    fig, axs = plt.subplots(2 * rows, len(cols), figsize=(0.9 * len(cols), 0.95 * 2 * rows), dpi=90)
    for r in range(rows):
        for j, i in enumerate(cols):
            for k, (img, lab) in enumerate(((tr["x"][i, r], "x_i"), (tr["denoised"][i, r], "D"))):
                ax = axs[2 * r + k, j]
                # x_i is shown at its own scale (it is ~sigma_i noise), D in the data range [-1, 1]
                v = img.numpy() if k else img.numpy() / max(1.0, float(img.abs().max()))
                ax.imshow(v, cmap="gray", vmin=-1, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0 and k == 0:
                    ax.set_title(f"σ={sig[i]:.3g}", fontsize=7)
                if j == 0:
                    ax.set_ylabel(lab, fontsize=7)
    fig.suptitle("digits: sampling (x_i) vs denoising (D) trajectory", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / FIGURES[2])
    plt.close(fig)

    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        for name in FIGURES:
            shutil.copyfile(args.out / name, args.figures / name)
    print(f"wrote {args.out}/geometry.csv and {', '.join(FIGURES)} in {time.time() - t0:.1f} s")
    return S


__all__ = ["add_arguments", "run", "study", "add_karras_args", "check_karras_args"]
