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

    python train/run.py chen --run runs/digits-default --figures docs/figures --markdown docs/chen_results.md

Writes chen.csv, chen_results.md, chen_summary.json and the figures chen_trajectories.png,
chen_score_deviation.png, chen_jump_fd.png, chen_denoising_digits.png into --out (the PNGs also into
--figures, the markdown also to --markdown; train/experiments/chen_report.py). The memorising-only
study (and the 2-D mixture) is `train/run.py chen-optimal`.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm.auto import trange

from wgfcore.denoisers import optimal_denoiser
from wgfcore.edm import trajectories, vp_denoiser_from_score
from wgfcore.geometry import (deviation, nearest_neighbour, nn_distance_trajectory, score_deviation, turning_angle,
                              typical_spacing)
from wgfcore.metrics import frechet_distance, gaussian_fit
from wgfcore.sample import eps_to_score
from wgfcore.sde import VPSDE, karras_sigmas

from ..data.datasets import load_digits_tensor
from ..engine.checkpoint import load_run
from ..engine.cli import at_least, path, pos_int, seed as seed_arg, threads
from ..engine.errors import UsageError
from ..evaluation.digits_classifier import DigitsFeatures, get_classifier
from .chen_optimal import add_karras_args, check_karras_args
from .chen_report import FIGURES, write_outputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    p.add_argument("--run", type=path, required=True, help="a finished run folder of train/run.py (digits)")
    p.add_argument("--out", type=path, default=Path("runs/chen"), help="output folder (default runs/chen)")
    p.add_argument("--figures", type=path, default=None, help="also copy the PNGs here (e.g. docs/figures)")
    p.add_argument("--markdown", type=path, default=None, help="also write the markdown table here")
    p.add_argument("--samples", type=at_least(2), default=1000,
                   help="trajectories B (digits-FD needs several hundred)")
    add_karras_args(p)
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the initial noise and of the bootstrap")
    p.add_argument("--bootstrap", type=at_least(2), default=200, help="bootstrap resamples for each digits-FD point")
    p.add_argument("--floor-draws", type=at_least(2), default=20, help="subsets of real digits for the FD floor")
    p.add_argument("--batch", type=pos_int, default=500, help="network batch (memory only)")
    p.add_argument("--cache-dir", type=path, default=None,
                   help="the digits classifier cache, shared with train/run.py (default <run>/../.cache)")
    p.add_argument("--classifier-epochs", type=pos_int, default=None,
                   help="default: the run's eval.classifier_epochs")
    p.add_argument("--allow-unfinished", action="store_true", help="use the newest checkpoint of a running job")
    p.add_argument("--threads", type=threads, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


# --- the trained model ------------------------------------------------------------------------------

def load_digits_run(run_dir: Path, allow_unfinished: bool = False):
    """(config, EMA epsilon U-Net in eval mode, step) of a digits run of train/run.py, through the
    engine's `load_run`; a UsageError for a run that is not finished (unless allow_unfinished) or
    not 1x16x16 digits (digits-FD is defined for those only)."""
    cfg, net, _, step = load_run(run_dir)
    if step < cfg.iterations and not allow_unfinished:
        raise UsageError(f"--run {run_dir}: not finished (checkpoint at step {step} of {cfg.iterations}); wait for "
                         "train/run.py or pass --allow-unfinished")
    if cfg.dataset != "digits" or cfg.image_shape != (1, 16, 16):
        raise UsageError(f"--run {run_dir}: digits-FD is defined for the 1x16x16 digits; this run has dataset "
                         f"{cfg.dataset!r}" + ("" if cfg.toy else ", {}x{}x{}".format(*cfg.image_shape)))
    return cfg, net, step


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


def denoise_along(tr: dict, denoiser, progress: bool = False, desc: str = "denoise") -> torch.Tensor:
    """denoiser(x_i; sigma_i) at the states x_0..x_{N-1} of a trajectory `tr`, stacked (N, B, ...) in x's dtype."""
    X, sig = tr["x"][:-1], tr["sigmas"]
    return torch.stack([denoiser(X[i], torch.full((X.shape[1],), float(sig[i]), dtype=X.dtype))
                        for i in trange(X.shape[0], desc=desc, disable=not progress, leave=False)])


def fd_with_noise(feature_sets: dict, ref: tuple, n_boot: int, seed: int, paired_to: str,
                  progress: bool = False) -> dict:
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
    for _ in trange(n_boot, desc="digits-FD bootstrap", disable=not progress, leave=False):
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


# --- the study ------------------------------------------------------------------------------------------

def compute(args, cfg, net, data, feats):
    """Everything measured, without I/O: (sigmas, stats per denoiser, score deviations, FD table)."""
    sigmas = karras_sigmas(args.steps, args.sigma_min, args.sigma_max, args.rho)
    sig = sigmas.numpy()
    N = args.steps
    g = torch.Generator().manual_seed(args.seed)
    x0 = args.sigma_max * torch.randn((args.samples, *cfg.image_shape), generator=g)  # float32, the network's dtype
    D_theta = unet_denoiser(net, batch=args.batch)
    D_star = data_denoiser(data)
    tr = {"theta": trajectories(D_theta, x0, sigmas, sampler="heun", progress=args.progress),
          "opt": trajectories(D_star, x0.to(torch.float64), sigmas, sampler="heun", progress=args.progress)}
    spacing = float(typical_spacing(data).median())
    S = {m: {**path_statistics(t, data, spacing), "traj": t} for m, t in tr.items()}
    # score deviation, always against the optimal score s*: at D_theta's states and at D*'s states
    star_on_theta = denoise_along(tr["theta"], D_star, args.progress, "D* on D_theta's paths")
    theta_on_opt = denoise_along(tr["opt"], D_theta, args.progress, "D_theta on D*'s paths")
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
    q = fd_with_noise(sets, ref, args.bootstrap, args.seed, paired_to=f"theta_x_{N}", progress=args.progress)
    floor = data_floor(f_data, ref, args.samples, args.floor_draws, args.seed)
    first_k = first_within_noise(q, [f"theta_jump_{k}" for k in range(N)])
    first_x = first_within_noise(q, [f"theta_x_{k}" for k in range(N + 1)])
    return sig, S, dev, q, floor, (first_k, first_x)


def command_line(argv) -> str:
    """The command that made this output, --run first (the markdown quotes it)."""
    argv = list(argv or [])
    rest = [a for a in argv if a != "chen"]
    if "--run" in rest:
        i = rest.index("--run")
        run = rest[i:i + 2]
        del rest[i:i + 2]
        rest = run + rest
    return " ".join(["python train/run.py chen", *rest])


def run(args) -> int:
    t0 = time.time()
    check_karras_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, net, step = load_digits_run(args.run, args.allow_unfinished)
    epochs = args.classifier_epochs or cfg.eval.classifier_epochs
    cache = args.cache_dir or args.run.parent / ".cache"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot create it ({e.strerror})") from None
    clf, acc = get_classifier(cache, resolution=cfg.resolution, epochs=epochs, progress=args.progress)
    feats = DigitsFeatures(clf)
    data = load_digits_tensor(cfg.resolution)[0]
    sig, S, dev, q, floor, (first_k, first_x) = compute(args, cfg, net, data, feats)
    seconds = time.time() - t0
    res = SimpleNamespace(cfg=cfg, step=step, sig=sig, S=S, dev=dev, q=q, floor=floor, acc=acc, seconds=seconds,
                          first_k=first_k, first_x=first_x, command=command_line(getattr(args, "argv", None)))
    write_outputs(args, res)
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


__all__ = ["add_arguments", "run", "compute", "load_digits_run", "unet_denoiser", "data_denoiser", "path_statistics",
           "fd_with_noise", "data_floor", "first_within_noise", "FIGURES"]
