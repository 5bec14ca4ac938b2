"""Chen et al.'s statistics on the trained digits U-Net (ALGORITHMS §5; issue 10 item 5).

The digits main job (`python train/run.py`) trains a VP epsilon-prediction U-Net. Through Tweedie
(`wgfcore.sample.eps_to_score`, `wgfcore.edm.vp_denoiser_from_score`) it is an EDM denoiser
D_theta(x; sigma), and EDM Heun on a Karras grid gives its sampling trajectory x_i and denoising
trajectory D_theta(x_i; sigma_i). From the same initial noise the empirical optimal denoiser D*
(mean shift over the 1797 training digits, `wgfcore.denoisers`) gives the memorising reference.
This command measures, for both:

(a) the trajectory statistics of `wgfcore.geometry`: deviation from the chord x_0 -> x_N, turning
    angle, and the distance of x_i and of D(x_i; sigma_i) to the final sample x_N;
(b) the score deviation |D_theta - D*| and |s_theta - s*| / |s*| along both trajectories;
(c) the quality of ODE-jump outputs D(x_k; sigma_k) against the step k at which one jumps (digits-FD,
    the classifier features of train/digits_classifier.py, against all 1797 digits), with the
    bootstrap standard error of every point and a paired bootstrap interval of its difference to
    the full sample. Jumping at k costs 2k + 1 network calls (NFE; k Heun steps, then one D).
    The denoising trajectory *is* the set of jump outputs (`wgfcore.edm.ode_jump`), so one run
    gives every k.

    python train/chen_trajectories.py --run runs/digits-default --figures docs/figures \\
        --markdown docs/chen_results.md

Writes chen.csv, chen_results.md, chen_summary.json and the figures chen_trajectories.png,
chen_score_deviation.png, chen_jump_fd.png, chen_denoising_digits.png into --out (the PNGs also into
--figures, the markdown also to --markdown). The memorising-only study (and the 2-D mixture) is
train/chen_optimal.py.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from wgfcore.denoisers import optimal_denoiser  # noqa: E402
from wgfcore.edm import trajectories, vp_denoiser_from_score  # noqa: E402
from wgfcore.geometry import (deviation, nearest_neighbour, nn_distance_trajectory, score_deviation,  # noqa: E402
                              turning_angle, typical_spacing)
from wgfcore.metrics import frechet_distance, gaussian_fit  # noqa: E402
from wgfcore.sample import eps_to_score  # noqa: E402
from wgfcore.sde import VPSDE, karras_sigmas  # noqa: E402

from train.chen_optimal import add_karras_args, karras_args_error  # noqa: E402

FIGURES = ("chen_trajectories.png", "chen_score_deviation.png", "chen_jump_fd.png", "chen_denoising_digits.png")
PROG = "chen_trajectories"


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see --help)")


def parse(argv=None):
    p = _Parser(prog="train/chen_trajectories.py", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a finished run folder of train/run.py (digits)")
    p.add_argument("--out", type=Path, default=Path("runs/chen"), help="output folder (default runs/chen)")
    p.add_argument("--figures", type=Path, default=None, help="also copy the PNGs here (e.g. docs/figures)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--samples", type=int, default=1000, help="trajectories B (digits-FD needs several hundred)")
    add_karras_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of the bootstrap")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for each digits-FD point")
    p.add_argument("--floor-draws", type=int, default=20, help="subsets of real digits for the FD floor")
    p.add_argument("--batch", type=int, default=500, help="network batch (memory only)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="the digits classifier cache, shared with train/run.py (default <run>/../.cache)")
    p.add_argument("--classifier-epochs", type=int, default=None, help="default: the run's eval.classifier_epochs")
    p.add_argument("--allow-unfinished", action="store_true", help="use the newest checkpoint of a running job")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    bad = karras_args_error(args)
    if bad:
        raise UsageError(bad)
    if args.samples < 2 or args.bootstrap < 2 or args.floor_draws < 2 or args.batch < 1:
        raise UsageError("--samples, --bootstrap and --floor-draws must be >= 2 and --batch >= 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    return args


# --- the trained model ------------------------------------------------------------------------------

def load_run(run_dir, allow_unfinished: bool = False):
    """(config, EMA epsilon U-Net in eval mode, step) of a run folder of train/run.py.

    Reads run_dir/config.json (keys preset, net, resolution, channels, iterations) and the EMA score
    weights 'ema_eps' of run_dir/checkpoints/last.pt (train.checkpoint format). Raises UsageError
    with one readable line for anything that is not a finished run (unless allow_unfinished).
    """
    from train.checkpoint import CheckpointError, load
    from wgfcore.nets import UNet

    run_dir = Path(run_dir)
    where = f"--run {run_dir}"
    if not run_dir.is_dir():
        raise UsageError(f"{where}: no such folder")
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{where}: not a run folder of train/run.py (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{where}: cannot read config.json ({type(e).__name__}: {e})") from None
    missing = [k for k in ("preset", "resolution", "channels", "iterations") if k not in cfg]
    if missing:
        raise UsageError(f"{where}: config.json lacks {', '.join(missing)}")
    try:
        state = load(run_dir / "checkpoints" / "last.pt")
    except CheckpointError as e:
        raise UsageError(f"{where}: {e} (has training started?)") from None
    if "ema_eps" not in state or "step" not in state:
        raise UsageError(f"{where}: checkpoints/last.pt has no 'ema_eps' weights or 'step'")
    step, total = int(state["step"]), int(cfg["iterations"])
    if step < total and not allow_unfinished:
        raise UsageError(f"{where}: not finished (checkpoint at step {step} of {total}); wait for train/run.py "
                         "or pass --allow-unfinished")
    kw = dict(cfg.get("net") or {}, img_resolution=cfg["resolution"], in_channels=cfg["channels"])
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}  # JSON has no tuples
    try:
        net = UNet.from_preset(cfg["preset"], **kw)
        net.load_state_dict(state["ema_eps"])
    except (ValueError, TypeError, RuntimeError) as e:
        msg = str(e).splitlines()[0]
        raise UsageError(f"{where}: the checkpoint does not fit config.json's network ({msg})") from None
    return cfg, net.eval(), step


def unet_denoiser(net, sde: VPSDE | None = None, batch: int = 500):
    """The EDM denoiser D(x_VE; sigma) of a VP epsilon network: Tweedie through wgfcore's single homes
    (eps -> score: `eps_to_score`; VP score -> VE denoiser: `vp_denoiser_from_score`). The network runs
    in its own dtype (float32) in chunks of `batch`; the output has x's dtype."""
    sde = sde or VPSDE()
    dtype = next(net.parameters()).dtype
    D = vp_denoiser_from_score(eps_to_score(net, sde), sde)

    @torch.no_grad()
    def denoiser(x, sigma):
        xs, ss = x.to(dtype), sigma.to(dtype)
        out = [D(xs[i:i + batch], ss[i:i + batch]) for i in range(0, x.shape[0], batch)]
        return torch.cat(out).to(x.dtype)

    return denoiser


def data_denoiser(data: torch.Tensor):
    """D* over the training set, in float64 (`wgfcore.denoisers.optimal_denoiser`)."""
    data = data.to(torch.float64)
    return lambda x, sigma: optimal_denoiser(x.to(torch.float64), sigma, data).to(x.dtype)


# --- statistics ---------------------------------------------------------------------------------------

def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| / sqrt(d) per state of (T, B, ...) stacks, float64 (T, B): distances in pixel units."""
    d = (a - b).reshape(a.shape[0], a.shape[1], -1).to(torch.float64)
    return d.norm(dim=-1) / math.sqrt(d.shape[-1])


def path_statistics(tr: dict, data: torch.Tensor, spacing: float | None = None) -> dict:
    """Chen et al.'s statistics of one run of `wgfcore.edm.trajectories` (numpy arrays):

    rel_dev (N+1, B): deviation from the chord / |x_N - x_0|; angle (N-1, B): turning angle, degrees;
    x_to_end (N+1, B) and d_to_end (N, B): rms distance of x_i and of D(x_i; sigma_i) to the final
    sample x_N; nn_end (B,): distance of x_N to the nearest training sample / median data spacing
    (`spacing`; computed from data when None).
    """
    X, Dn = tr["x"], tr["denoised"]
    chord = (X[-1] - X[0]).flatten(1).to(torch.float64).norm(dim=1)
    end = X[-1:]
    spacing = float(typical_spacing(data).median()) if spacing is None else float(spacing)
    return {
        "rel_dev": (deviation(X) / chord).numpy(),
        "angle": (turning_angle(X) * 180 / math.pi).numpy(),
        "x_to_end": rms(X, end.expand_as(X)).numpy(),
        "d_to_end": rms(Dn, end.expand_as(Dn)).numpy(),
        "nn_end": (nn_distance_trajectory(end, data)[0] / spacing).numpy(),
        "spacing": spacing,
    }


def denoise_along(tr: dict, denoiser) -> torch.Tensor:
    """denoiser(x_i; sigma_i) at the states x_0..x_{N-1} of a trajectory `tr`, stacked (N, B, ...) in x's dtype."""
    X, sig = tr["x"][:-1], tr["sigmas"]
    return torch.stack([denoiser(X[i], torch.full((X.shape[1],), float(sig[i]), dtype=X.dtype))
                        for i in range(X.shape[0])])


def fd_with_noise(feature_sets: dict, ref: tuple, n_boot: int, seed: int, paired_to: str) -> dict:
    """digits-FD of each feature set (n, k) against `ref` = (mu, Sigma), with its bootstrap standard error,
    and the paired difference to the set `paired_to` with a 95% percentile interval.

    Every set holds features of the same n trajectories (sample j of one set and of another come from
    the same initial noise), so one resample of trajectory indices is applied to all of them: the
    differences are paired. Returns {name: dict(fd, se, diff, lo, hi)}.
    """
    names = list(feature_sets)
    n = next(iter(feature_sets.values())).shape[0]
    point = {k: frechet_distance(*gaussian_fit(f), *ref) for k, f in feature_sets.items()}
    g = torch.Generator().manual_seed(seed)
    boots = {k: [] for k in names}
    for _ in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=g)
        for k in names:
            boots[k].append(frechet_distance(*gaussian_fit(feature_sets[k][idx]), *ref))
    B = {k: np.asarray(v) for k, v in boots.items()}
    out = {}
    for k in names:
        d = B[k] - B[paired_to]
        out[k] = {"fd": point[k], "se": float(B[k].std(ddof=1)), "diff": point[k] - point[paired_to],
                  "lo": float(np.quantile(d, 0.025)), "hi": float(np.quantile(d, 0.975))}
    return out


def data_floor(f_data: torch.Tensor, ref: tuple, n: int, draws: int, seed: int):
    """digits-FD of n real digits (random subsets, without replacement) against all of them: the value a
    perfect sampler would score with n samples. (mean, sd) over `draws` subsets; None when n >= all."""
    if n >= f_data.shape[0]:
        return None
    g = torch.Generator().manual_seed(seed + 99)
    v = [frechet_distance(*gaussian_fit(f_data[torch.randperm(f_data.shape[0], generator=g)[:n]]), *ref)
         for _ in range(draws)]
    return float(np.mean(v)), float(np.std(v, ddof=1))


def first_within_noise(q: dict, keys: list) -> int | None:
    """Index of the first key from which on every paired 95% interval of (FD - FD of the final sample)
    reaches 0 or below: jumping there is not measurably worse than sampling to the end."""
    ok = [q[k]["lo"] <= 0.0 for k in keys]
    for i in range(len(ok)):
        if all(ok[i:]):
            return i
    return None


# --- figures and tables ------------------------------------------------------------------------------

def _band(ax, x, Y, label, color, ls="-"):
    ax.plot(x, np.median(Y, 1), ls, color=color, label=label, lw=1.4)
    ax.fill_between(x, np.quantile(Y, 0.1, 1), np.quantile(Y, 0.9, 1), color=color, alpha=0.18, lw=0)


def _fmt(v, digits=3):
    return "" if v is None else f"{v:.{digits}g}"


def write_outputs(args, cfg, step, sig, S, dev, q, floor, acc, seconds, firsts):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N, B = len(sig) - 1, args.samples
    out = args.out
    first_k, first_x = firsts
    ks = np.arange(N + 1)
    colors = {"theta": "tab:blue", "opt": "tab:orange"}
    labels = {"theta": "trained U-Net D_θ", "opt": "optimal D* (memorises)"}

    # (a) trajectory statistics ------------------------------------------------------------------
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.6), dpi=90)
    for m in ("theta", "opt"):
        s, c = S[m], colors[m]
        _band(axs[0], ks, s["rel_dev"], labels[m], c)
        # the last denoising output *is* x_N (distance 0): drawn at 1e-6 so the log axis keeps it
        _band(axs[1], ks[:-1], np.maximum(s["x_to_end"][:-1], 1e-6), f"{labels[m]}: x_i", c, "--")
        _band(axs[1], ks[:-1], np.maximum(s["d_to_end"], 1e-6), f"{labels[m]}: D(x_i; σ_i)", c)
        _band(axs[2], ks[1:-1], s["angle"], labels[m], c)
    axs[0].set(xlabel="step i", ylabel="deviation / |x_N − x_0|", title="(a) distance of x_i from the chord x_0 → x_N")
    axs[1].set(xlabel="step i", ylabel="rms distance to x_N (pixels in [−1, 1])", yscale="log",
               title="sampling (dashed) vs denoising (solid) trajectory:\ndistance to the final sample (< 1e-6 drawn at 1e-6)")
    axs[2].set(xlabel="step i (at x_i)", ylabel="degrees", title="turning angle between successive steps")
    for ax in axs:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"digits, EDM Heun N={N} (σ {args.sigma_max:g} → {args.sigma_min:g}), B={B} paths from the same "
                 f"x_0 for both denoisers; median and 10–90% band", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / FIGURES[0])
    plt.close(fig)

    # (b) score deviation --------------------------------------------------------------------------
    fig, axs = plt.subplots(1, 2, figsize=(10.5, 3.8), dpi=90)
    for m, txt in (("theta", "on D_θ's trajectories"), ("opt", "on D*'s trajectories")):
        r, rel = dev[m]
        _band(axs[0], sig[:-1], r, txt, colors[m])
        _band(axs[1], sig[:-1], rel, txt, colors[m])
    axs[0].set(xscale="log", yscale="log", xlabel="σ_i", ylabel="rms |D_θ − D*| (pixels)",
               title="(b) learned vs optimal denoiser output")
    axs[1].set(xscale="log", yscale="log", xlabel="σ_i", ylabel="|s_θ − s*| / |s*|",
               title="relative score deviation (σ cancels)")
    for ax in axs:
        ax.invert_xaxis()
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("score deviation |D_θ − D*| = σ² |s_θ − s*| along the sampling trajectories "
                 "(median, 10–90% band)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / FIGURES[1])
    plt.close(fig)

    # (c) ODE-jump quality -----------------------------------------------------------------------------
    fig, ax = plt.subplots(figsize=(7.5, 4.4), dpi=90)
    jk = np.arange(N)
    for m, key, ls in (("theta", "jump", "o-"), ("theta", "x", "s--"), ("opt", "jump", "^-")):
        lab = {"jump": f"{labels[m]}: jump output D(x_k; σ_k)", "x": f"{labels[m]}: x_k itself (clamped)"}[key]
        rng = jk if key == "jump" else ks
        ys = np.array([q[f"{m}_{key}_{k}"]["fd"] for k in rng])
        es = np.array([q[f"{m}_{key}_{k}"]["se"] for k in rng])
        ax.errorbar(rng, ys, yerr=2 * es, fmt=ls, ms=3, lw=1, capsize=2, color=colors[m],
                    alpha=1.0 if key == "jump" else 0.6, label=lab)
    fin = q["theta_x_" + str(N)]
    ax.axhspan(fin["fd"] - 2 * fin["se"], fin["fd"] + 2 * fin["se"], color=colors["theta"], alpha=0.12,
               label=f"D_θ full sample x_N (NFE {2 * N - 1}) ± 2 se")
    if floor is not None:
        ax.axhspan(max(floor[0] - 2 * floor[1], 1e-3), floor[0] + 2 * floor[1], color="gray", alpha=0.25,
                   label=f"floor: {B} real digits vs all (mean ± 2 sd)")
    if first_k is not None:
        ax.axvline(first_k, color="k", lw=0.8, ls=":", label=f"D_θ jumps within noise of x_N from k={first_k}")
    ax.set(yscale="log", xlabel="jump step k (NFE of the jump = 2k + 1)", ylabel="digits-FD (lower is better)",
           title=f"(c) quality of ODE-jump outputs vs the step of the jump (B={B}, error bars ± 2 bootstrap se)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / FIGURES[2])
    plt.close(fig)

    # images: x_i, D_theta(x_i), D*(x_i) on the same (trained) trajectory --------------------------------
    tr = S["theta"]["traj"]
    cols = sorted(set(np.linspace(0, N - 1, 8).round().astype(int)))
    rows = S["theta"]["dstar_imgs"]
    n_show = min(4, B)
    fig, axs = plt.subplots(3 * n_show, len(cols) + 1, figsize=(0.9 * (len(cols) + 1), 0.9 * 3 * n_show), dpi=90,
                            squeeze=False)
    for r in range(n_show):
        for j, i in enumerate(list(cols) + [N]):
            trio = ((tr["x"][i, r], "x_i"), (tr["denoised"][i, r] if i < N else None, "D_θ"),
                    (rows[i, r] if i < N else S["theta"]["nn_img"][r], "D*" if i < N else "NN"))
            for k, (img, lab) in enumerate(trio):
                ax = axs[3 * r + k, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if img is None:
                    ax.axis("off")
                    continue
                v = img[0].numpy()
                if k == 0:  # x_i is ~sigma_i noise: shown at its own scale
                    v = v / max(1.0, float(np.abs(v).max()))
                ax.imshow(v, cmap="gray", vmin=-1, vmax=1)
                if r == 0 and k == 0:
                    ax.set_title(f"σ={sig[i]:.3g}" if i < N else "x_N", fontsize=7)
                if j == 0:
                    ax.set_ylabel(lab, fontsize=7)
                if i == N and k == 2:
                    ax.set_ylabel("nearest\ndigit", fontsize=6)
                    ax.yaxis.set_label_position("right")
    fig.suptitle("trained U-Net: sampling x_i, its denoising output D_θ(x_i), and D*(x_i) at the same state", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / FIGURES[3])
    plt.close(fig)

    # CSV -------------------------------------------------------------------------------------------------
    with open(out / "chen.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k", "sigma", "jump_nfe", "fd_jump", "fd_jump_se", "fd_jump_minus_final", "diff_lo95", "diff_hi95",
                    "fd_xk", "fd_xk_se", "fd_xk_minus_final", "xk_diff_lo95", "xk_diff_hi95", "fd_opt_jump", "fd_opt_jump_se", "rel_dev_median", "opt_rel_dev_median",
                    "dtheta_dstar_rms_median", "rel_score_dev_median", "rel_score_dev_on_opt_median"])
        for k in range(N + 1):
            j = q.get(f"theta_jump_{k}")
            o = q.get(f"opt_jump_{k}")
            xk = q[f"theta_x_{k}"]
            w.writerow([k, sig[k], 2 * k + 1 if k < N else 2 * N - 1,
                        *(("", "", "", "", "") if j is None else (j["fd"], j["se"], j["diff"], j["lo"], j["hi"])),
                        xk["fd"], xk["se"], xk["diff"], xk["lo"], xk["hi"], *(("", "") if o is None else (o["fd"], o["se"])),
                        np.median(S["theta"]["rel_dev"][k]), np.median(S["opt"]["rel_dev"][k]),
                        *((np.median(dev["theta"][0][k]), np.median(dev["theta"][1][k]), np.median(dev["opt"][1][k]))
                          if k < N else ("", "", ""))])

    # markdown ------------------------------------------------------------------------------------------
    argv = " ".join(["python train/chen_trajectories.py", "--run", str(args.run)] + args._extra)
    L = [f"# Chen et al.'s statistics on the trained digits U-Net",
         "",
         f"Made by `{argv}` ({seconds:.0f} s on {torch.get_num_threads()} CPU thread(s)). Run `{args.run}`, "
         f"EMA score network at step {step} of {cfg['iterations']}. EDM Heun on the Karras grid N={N} "
         f"(σ {args.sigma_max:g} → {args.sigma_min:g}, ρ={args.rho:g}), B={B} trajectories from one seed ({args.seed}); "
         f"the optimal denoiser D* (mean shift over the 1797 training digits) starts from the same x_0.",
         "",
         f"digits-FD: Fréchet distance of the digits classifier's 32-d features (held-out accuracy {acc:.3f}) "
         f"against all 1797 digits; ± is one bootstrap standard error over the B trajectories ({args.bootstrap} "
         "resamples); Δ is the paired difference to the full sample x_N of the same trajectories with its 95% "
         "bootstrap interval. Jumping at step k outputs D(x_k; σ_k) and costs NFE 2k + 1; the last jump "
         f"(k={N - 1}) is the full sample (NFE {2 * N - 1}).",
         ""]
    if floor is not None:
        L += [f"Floor: {B} real digits vs all 1797 score {floor[0]:.2f} ± {floor[1]:.2f} (mean ± sd over "
              f"{args.floor_draws} subsets).", ""]
    L += ["| k | σ_k | NFE | FD jump D_θ(x_k) | Δ vs x_N [95%] | FD x_k | Δ vs x_N [95%] | FD jump D*(x_k) "
          "| rel. dev. D_θ | rel. dev. D* | rms D_θ−D* | ‖s_θ−s*‖/‖s*‖ |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in range(N + 1):
        j, o, xk = q.get(f"theta_jump_{k}"), q.get(f"opt_jump_{k}"), q[f"theta_x_{k}"]
        cells = [str(k), f"{sig[k]:.3g}", str(2 * k + 1 if k < N else 2 * N - 1),
                 "" if j is None else f"{j['fd']:.3g} ± {j['se']:.2g}",
                 "" if j is None else f"{j['diff']:+.3g} [{j['lo']:+.2g}, {j['hi']:+.2g}]",
                 f"{xk['fd']:.3g} ± {xk['se']:.2g}", f"{xk['diff']:+.3g} [{xk['lo']:+.2g}, {xk['hi']:+.2g}]",
                 "" if o is None else f"{o['fd']:.3g} ± {o['se']:.2g}",
                 f"{np.median(S['theta']['rel_dev'][k]):.3g}", f"{np.median(S['opt']['rel_dev'][k]):.3g}",
                 "" if k == N else f"{np.median(dev['theta'][0][k]):.3g}",
                 "" if k == N else f"{np.median(dev['theta'][1][k]):.3g}"]
        L.append("| " + " | ".join(cells) + " |")
    L += ["", "Columns: rel. dev. = median over paths of the distance of x_k from the chord x_0 → x_N divided by "
          "|x_N − x_0|; rms D_θ−D* and ‖s_θ−s*‖/‖s*‖ = median score deviation at the states of D_θ's own trajectories "
          "(`wgfcore.geometry.score_deviation`).", ""]
    mx = {m: float(np.median(S[m]["rel_dev"].max(0))) for m in S}
    L += ["Summary (numbers from this run):", "",
          f"- Largest deviation from the chord, median over paths of each path's maximum: D_θ {mx['theta']:.4f}, "
          f"D* {mx['opt']:.4f} of |x_N − x_0|.",
          f"- Final samples: nearest training digit at {np.median(S['theta']['nn_end']):.3g} (median) data spacings "
          f"for D_θ, {np.median(S['opt']['nn_end']):.2g} for D* (0 = a copy of a training digit).",
          f"- Full sample x_N of D_θ: digits-FD {fin['fd']:.3g} ± {fin['se']:.2g}; "
          + ("the jump outputs are within noise of it (paired 95% interval reaches 0) from "
             f"k = {first_k} on (NFE {2 * first_k + 1} instead of {2 * N - 1})." if first_k is not None and first_k < N - 1
             else "no earlier jump is within noise of it.")
          + (f" The sampling trajectory x_k itself gets there from k = {first_x} on." if first_x is not None else ""),
          f"- D*'s full sample (training digits, memorised): digits-FD {q['opt_x_final']['fd']:.3g} ± "
          f"{q['opt_x_final']['se']:.2g}; minus D_θ's: {q['opt_x_final']['diff']:+.3g} "
          f"[{q['opt_x_final']['lo']:+.2g}, {q['opt_x_final']['hi']:+.2g}] (paired 95%).",
          ""]
    md = "\n".join(L)
    (out / "chen_results.md").write_text(md)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md)
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        for name in FIGURES:
            shutil.copyfile(out / name, args.figures / name)


# --- main -----------------------------------------------------------------------------------------------

def compute(args, cfg, net, data, feats):
    """Everything measured, without I/O: (sigmas, stats per denoiser, score deviations, FD table)."""
    sigmas = karras_sigmas(args.steps, args.sigma_min, args.sigma_max, args.rho)
    sig = sigmas.numpy()
    N = args.steps
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.samples, cfg["channels"], cfg["resolution"], cfg["resolution"])
    x0 = args.sigma_max * torch.randn(shape, generator=g)  # float32, the network's dtype
    D_theta = unet_denoiser(net, batch=args.batch)
    D_star = data_denoiser(data)
    tr = {"theta": trajectories(D_theta, x0, sigmas, sampler="heun", progress=args.progress),
          "opt": trajectories(D_star, x0.to(torch.float64), sigmas, sampler="heun", progress=args.progress)}
    spacing = float(typical_spacing(data).median())
    S = {m: {**path_statistics(t, data, spacing), "traj": t} for m, t in tr.items()}
    # score deviation, always against the optimal score s*: at D_theta's states and at D*'s states
    star_on_theta = denoise_along(tr["theta"], D_star)
    theta_on_opt = denoise_along(tr["opt"], D_theta)
    dev = {"theta": score_deviation(tr["theta"]["denoised"], star_on_theta, tr["theta"]["x"][:-1], batch_dims=2),
           "opt": score_deviation(theta_on_opt, tr["opt"]["denoised"], tr["opt"]["x"][:-1], batch_dims=2)}
    dev = {m: tuple(v.numpy() for v in d) for m, d in dev.items()}
    S["theta"]["dstar_imgs"] = star_on_theta[:, :4].float()
    _, nn_idx = nearest_neighbour(tr["theta"]["x"][-1, :4], data)
    S["theta"]["nn_img"] = data[nn_idx].float()

    sets = {}
    for m in ("theta", "opt"):
        for k in range(N):
            sets[f"{m}_jump_{k}"] = feats(tr[m]["denoised"][k].float())
    for k in range(N + 1):
        sets[f"theta_x_{k}"] = feats(tr["theta"]["x"][k].float())
    sets["opt_x_final"] = feats(tr["opt"]["x"][-1].float())
    f_data = feats(data.float())
    ref = gaussian_fit(f_data)
    q = fd_with_noise(sets, ref, args.bootstrap, args.seed, paired_to=f"theta_x_{N}")
    floor = data_floor(f_data, ref, args.samples, args.floor_draws, args.seed)
    first_k = first_within_noise(q, [f"theta_jump_{k}" for k in range(N)])
    first_x = first_within_noise(q, [f"theta_x_{k}" for k in range(N + 1)])
    return sig, S, dev, q, floor, (first_k, first_x)


def main(argv=None) -> int:
    t0 = time.time()
    try:
        args = parse(argv)
        args._extra = [a for a in (sys.argv[1:] if argv is None else list(argv))]
        # the command line without --run (it is printed first in the markdown)
        if "--run" in args._extra:
            i = args._extra.index("--run")
            del args._extra[i:i + 2]
        args._extra = [a for a in args._extra if not a.startswith("--run=")]
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg, net, step = load_run(args.run, args.allow_unfinished)
        if cfg["channels"] != 1 or cfg["resolution"] != 16 or cfg.get("dataset", "digits") != "digits":
            raise UsageError(f"--run {args.run}: digits-FD is defined for the 1x16x16 digits; this run has dataset "
                             f"{cfg.get('dataset')!r}, {cfg['channels']}x{cfg['resolution']}x{cfg['resolution']}")
        epochs = args.classifier_epochs or int((cfg.get("eval") or {}).get("classifier_epochs", 12))
        cache = args.cache_dir or args.run.parent / ".cache"
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    from train.datasets import load_digits_tensor
    from train.digits_classifier import DigitsFeatures, get_classifier

    args.out.mkdir(parents=True, exist_ok=True)
    clf, acc = get_classifier(cache, resolution=cfg["resolution"], epochs=epochs, progress=args.progress)
    feats = DigitsFeatures(clf)
    data = load_digits_tensor(cfg["resolution"])[0]
    sig, S, dev, q, floor, (first_k, first_x) = compute(args, cfg, net, data, feats)
    seconds = time.time() - t0
    write_outputs(args, cfg, step, sig, S, dev, q, floor, acc, seconds, (first_k, first_x))
    N = args.steps
    summary = {"run": str(args.run), "step": step, "samples": args.samples, "steps": N, "seed": args.seed,
               "classifier_test_accuracy": acc, "seconds": round(seconds, 1),
               "fd_full_sample": q[f"theta_x_{N}"], "fd_optimal_full_sample": q["opt_x_final"],
               "floor_mean_sd": floor, "first_jump_within_noise": first_k, "first_xk_within_noise": first_x,
               "max_rel_deviation_median": {m: float(np.median(S[m]["rel_dev"].max(0))) for m in S},
               "nn_end_median_spacings": {m: float(np.median(S[m]["nn_end"])) for m in S}}
    (args.out / "chen_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[chen] D_theta: max rel. deviation (median) {summary['max_rel_deviation_median']['theta']:.4f}, "
          f"D*: {summary['max_rel_deviation_median']['opt']:.4f}; digits-FD full sample "
          f"{q[f'theta_x_{N}']['fd']:.3g} ± {q[f'theta_x_{N}']['se']:.2g}, jumps within noise from k={first_k}")
    print(f"wrote {args.out}/chen.csv, chen_results.md, chen_summary.json and {', '.join(FIGURES)} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
