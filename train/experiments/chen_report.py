"""The outputs of `train/run.py chen` (train/experiments/chen_trajectories.py): its four figures,
chen.csv and the markdown table with its summary (ALGORITHMS §5). Every number comes from `m`, the
measurements of one run of the study.
"""
from __future__ import annotations

import csv
import shutil

import numpy as np
import torch

from functools import partial

from ..evaluation.plots import band, pyplot

FIGURES = ("chen_trajectories.png", "chen_score_deviation.png", "chen_jump_fd.png", "chen_denoising_digits.png")
COLORS = {"theta": "tab:blue", "opt": "tab:orange"}
LABELS = {"theta": "trained U-Net D_θ", "opt": "optimal D* (memorises)"}
_band = partial(band, alpha=0.18)



def figure_trajectories(args, res, plt) -> None:
    """(a) Trajectory statistics: deviation from the chord, distance to the final sample, turning angle."""
    S, N, B = res.S, len(res.sig) - 1, args.samples
    ks = np.arange(N + 1)
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.6), dpi=90)
    for m in ("theta", "opt"):
        s, c = S[m], COLORS[m]
        _band(axs[0], ks, s["rel_dev"], LABELS[m], c)
        # the last denoising output *is* x_N (distance 0): drawn at 1e-6 so the log axis keeps it
        _band(axs[1], ks[:-1], np.maximum(s["x_to_end"][:-1], 1e-6), f"{LABELS[m]}: x_i", c, "--")
        _band(axs[1], ks[:-1], np.maximum(s["d_to_end"], 1e-6), f"{LABELS[m]}: D(x_i; σ_i)", c)
        _band(axs[2], ks[1:-1], s["angle"], LABELS[m], c)
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
    fig.savefig(args.out / FIGURES[0])
    plt.close(fig)


def figure_score_deviation(args, res, plt) -> None:
    """(b) |D_theta - D*| and the relative score deviation along both denoisers' trajectories."""
    sig, dev = res.sig, res.dev
    fig, axs = plt.subplots(1, 2, figsize=(10.5, 3.8), dpi=90)
    for m, txt in (("theta", "on D_θ's trajectories"), ("opt", "on D*'s trajectories")):
        r, rel = dev[m]
        _band(axs[0], sig[:-1], r, txt, COLORS[m])
        _band(axs[1], sig[:-1], rel, txt, COLORS[m])
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
    fig.savefig(args.out / FIGURES[1])
    plt.close(fig)


def figure_jumps(args, res, plt) -> None:
    """(c) digits-FD of the ODE-jump outputs against the step of the jump."""
    q, floor, first_k = res.q, res.floor, res.first_k
    N, B = len(res.sig) - 1, args.samples
    ks = np.arange(N + 1)
    fig, ax = plt.subplots(figsize=(7.5, 4.4), dpi=90)
    jk = np.arange(N)
    for m, key, ls in (("theta", "jump", "o-"), ("theta", "x", "s--"), ("opt", "jump", "^-")):
        lab = {"jump": f"{LABELS[m]}: jump output D(x_k; σ_k)", "x": f"{LABELS[m]}: x_k itself (clamped)"}[key]
        rng = jk if key == "jump" else ks
        ys = np.array([q[f"{m}_{key}_{k}"]["fd"] for k in rng])
        es = np.array([q[f"{m}_{key}_{k}"]["se"] for k in rng])
        ax.errorbar(rng, ys, yerr=2 * es, fmt=ls, ms=3, lw=1, capsize=2, color=COLORS[m],
                    alpha=1.0 if key == "jump" else 0.6, label=lab)
    fin = q["theta_x_" + str(N)]
    ax.axhspan(fin["fd"] - 2 * fin["se"], fin["fd"] + 2 * fin["se"], color=COLORS["theta"], alpha=0.12,
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
    fig.savefig(args.out / FIGURES[2])
    plt.close(fig)


def figure_images(args, res, plt) -> None:
    """x_i, D_theta(x_i) and D*(x_i) as images along the trained model's trajectories."""
    sig, S, N, B = res.sig, res.S, len(res.sig) - 1, args.samples
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
    fig.savefig(args.out / FIGURES[3])
    plt.close(fig)


def write_csv(args, res) -> None:
    """chen.csv: one row per step k."""
    sig, S, dev, q = res.sig, res.S, res.dev, res.q
    N, out = len(sig) - 1, args.out
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


def markdown(args, res) -> str:
    """chen_results.md: the table and the summary, every number from this run."""
    sig, S, dev, q, floor = res.sig, res.S, res.dev, res.q, res.floor
    N, B, first_k, first_x = len(sig) - 1, args.samples, res.first_k, res.first_x
    fin = q["theta_x_" + str(N)]
    L = ["# Chen et al.'s statistics on the trained digits U-Net",
         "",
         f"Made by `{res.command}` ({res.seconds:.0f} s on {torch.get_num_threads()} CPU thread(s)). Run `{args.run}`, "
         f"EMA score network at step {res.step} of {res.cfg.iterations}. EDM Heun on the Karras grid N={N} "
         f"(σ {args.sigma_max:g} → {args.sigma_min:g}, ρ={args.rho:g}), B={B} trajectories from one seed ({args.seed}); "
         f"the optimal denoiser D* (mean shift over the 1797 training digits) starts from the same x_0.",
         "",
         f"digits-FD: Fréchet distance of the digits classifier's 32-d features (held-out accuracy {res.acc:.3f}) "
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
          departure(dev, sig, N),
          f"- D*'s full sample (training digits, memorised): digits-FD {q['opt_x_final']['fd']:.3g} ± "
          f"{q['opt_x_final']['se']:.2g}; minus D_θ's: {q['opt_x_final']['diff']:+.3g} "
          f"[{q['opt_x_final']['lo']:+.2g}, {q['opt_x_final']['hi']:+.2g}] (paired 95%).",
          ""]
    return "\n".join(L)


def departure(dev, sig, N: int) -> str:
    """Where D_theta departs from D*, in the two measures the table gives: they disagree, so say both."""
    rms = [float(np.median(dev["theta"][0][k])) for k in range(N)]
    rel = [float(np.median(dev["theta"][1][k])) for k in range(N)]
    hi, lo = int(np.argmax(rms)), int(np.argmin(rms))
    return (f"- How far D_θ is from D* depends on the measure. In absolute terms (rms |D_θ − D*| per pixel) it is "
            f"largest at σ = {sig[hi]:.3g} ({rms[hi]:.3g}) and smallest at σ = {sig[lo]:.3g} ({rms[lo]:.3g}). "
            f"Relative to the optimal score (‖s_θ − s*‖/‖s*‖) it is smallest at large σ ({rel[0]:.2g} at σ = "
            f"{sig[0]:.3g}), where ‖s*‖ is dominated by the noise, and {rel[N - 1]:.2g} at σ = {sig[N - 1]:.3g}. "
            "So \"D_θ tracks D* at large noise\" holds only for the relative measure. Whether the departure at small "
            "σ is what keeps D_θ from memorising is not tested here.")


def write_outputs(args, res) -> None:
    """Every output into args.out; the figures also into --figures, the markdown also to --markdown."""
    plt = pyplot()
    for figure in (figure_trajectories, figure_score_deviation, figure_jumps, figure_images):
        figure(args, res, plt)
    write_csv(args, res)
    md = markdown(args, res)
    (args.out / "chen_results.md").write_text(md)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md)
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        for name in FIGURES:
            shutil.copyfile(args.out / name, args.figures / name)


__all__ = ["write_outputs", "markdown", "FIGURES"]
