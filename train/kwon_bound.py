"""Kwon, Fan, Lee (2022): score matching bounds W2. Reproduce their 2-D experiment (ALGORITHMS §6).

Train the 3x64 softplus MLP with DSM on the four-Gaussian mixture and, at log-spaced checkpoints of
each run, measure (i) the exact score-matching objective J against the analytic mixture score
(`wgfcore.bounds.score_matching_objective`) and (ii) W2 (POT, exact) between reverse-SDE samples and
the true mixture. Fit the log-log slope of W2 against J (the bound says W2 <= O(sqrt J) + const).

    python train/w2_vs_score_matching.py --out runs/w2_vs_j --figure docs/figures/w2_vs_score_matching.png

Writes w2_vs_j.csv and w2_vs_j.png into --out (and the PNG also to --figure when given).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from wgfcore.bounds import score_matching_objective  # noqa: E402
from wgfcore.losses import dsm_loss  # noqa: E402
from wgfcore.metrics import w2_empirical  # noqa: E402
from wgfcore.nets.mlp import MLP  # noqa: E402
from wgfcore.sample import eps_to_score, sample  # noqa: E402
from wgfcore.scores import GaussianMixture, kwon_mixture  # noqa: E402
from wgfcore.sde import VPSDE  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/w2_vs_score_matching"), help="output folder")
    p.add_argument("--figure", type=Path, default=None, help="also write the PNG here (e.g. docs/figures/...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=2, help="independent training runs (seeds seed, seed+1, ...)")
    p.add_argument("--iters", type=int, default=12000, help="DSM iterations per run")
    p.add_argument("--checkpoints", type=int, default=8, help="log-spaced evaluation points per run, --first..--iters")
    p.add_argument("--first", type=int, default=1500,
                   help="first log-spaced checkpoint (training sits on a plateau of J ~ 0.07-0.1 until ~2-5K it)")
    p.add_argument("--early", type=int, default=100, help="one extra checkpoint on the plateau (0: none)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-samples", type=int, default=2000, help="samples per W2 (>= 2000)")
    p.add_argument("--sample-steps", type=int, default=500, help="Euler-Maruyama steps of the reverse SDE")
    p.add_argument("--n-t", type=int, default=1000, help="time draws for J")
    p.add_argument("--n-x", type=int, default=128, help="x draws per time for J")
    p.add_argument("--eps", type=float, default=1e-3, help="J integrates over t in [eps, 1], the sampler's range")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this tiny MLP)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if args.n_samples < 2000:
        p.error("--n-samples must be >= 2000 (W2 of smaller sets is dominated by sampling noise)")
    if args.first >= args.iters or args.checkpoints < 2:
        p.error("need --first < --iters and --checkpoints >= 2")
    return args


def stratified_sample(mix: GaussianMixture, n: int, generator) -> torch.Tensor:
    """n draws with exactly round(n w_k) points in component k: the true law, without the multinomial
    noise in the component counts that would otherwise add its own floor to the measured W2."""
    counts = torch.floor(mix.weights * n).long()
    counts[: n - int(counts.sum())] += 1
    k = torch.repeat_interleave(torch.arange(mix.K), counts)
    z = torch.randn(n, mix.d, generator=generator, dtype=torch.float64)
    root = mix.U * mix.lam.sqrt()[:, None, :]
    return mix.means[k] + torch.einsum("nij,nj->ni", root[k], z)


def fit_loglog(J: np.ndarray, W: np.ndarray) -> tuple[float, float, float]:
    """Least-squares slope and intercept of log W2 against log J, and the slope's standard error."""
    lx, ly = np.log(J), np.log(W)
    A = np.stack([lx, np.ones_like(lx)], 1)
    coef, *_ = np.linalg.lstsq(A, ly, rcond=None)
    resid = ly - A @ coef
    dof = max(len(lx) - 2, 1)
    cov = (resid @ resid / dof) * np.linalg.inv(A.T @ A)
    return float(coef[0]), float(coef[1]), float(math.sqrt(cov[0, 0]))


def evaluate(score_fn, mix, sde, ref, args, seed):
    J, J_se = score_matching_objective(score_fn, mix, sde, n_t=args.n_t, n_x=args.n_x, eps=args.eps,
                                       generator=torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        x = sample(score_fn, (args.n_samples, mix.d), args.sample_steps, sampler="euler_maruyama",
                   eps=args.eps, seed=20_000 + seed)
    return J, J_se, w2_empirical(x, ref)


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    sde, mix = VPSDE(), kwon_mixture()
    g_ref = torch.Generator().manual_seed(args.seed + 7)
    ref = stratified_sample(mix, args.n_samples, g_ref)
    # Reference levels that no model can beat at this n and sampler: an independent stratified draw
    # (pure sampling noise), and the analytic score through the same reverse-SDE sampler.
    floor_iid = w2_empirical(stratified_sample(mix, args.n_samples, g_ref), ref)
    _, _, floor_sampler = evaluate(mix.score_fn(sde), mix, sde, ref, args, seed=-1)
    print(f"W2 floor: independent true samples {floor_iid:.4f}, analytic score + EM({args.sample_steps}) "
          f"{floor_sampler:.4f}")

    marks = set(np.geomspace(args.first, args.iters, args.checkpoints).round().astype(int).tolist())
    marks = sorted(marks | ({args.early} if 0 < args.early < args.first else set()))
    rows, t0 = [], time.time()
    bar = tqdm(total=args.runs * args.iters, disable=not args.progress, desc="DSM training")
    for r in range(args.runs):
        seed = args.seed + r
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        net = MLP(mix.d, hidden=64, depth=3, act="softplus")
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
        score_fn = eps_to_score(net, sde)
        it = 0
        for mark in marks:
            while it < mark:
                x0 = mix.sample(args.batch, generator=g).float()
                loss = dsm_loss(net, x0, sde, generator=g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                it += 1
                bar.update(1)
            net.eval()
            J, J_se, w2 = evaluate(score_fn, mix, sde, ref, args, seed=1000 * r + it)
            net.train()
            rows.append({"run": r, "iter": it, "dsm_loss": float(loss.detach()), "J": J, "J_se": J_se, "W2": w2})
            bar.set_postfix(J=f"{J:.3g}", W2=f"{w2:.3f}")
    bar.close()

    J = np.array([row["J"] for row in rows])
    W = np.array([row["W2"] for row in rows])
    slope, icpt, slope_se = fit_loglog(J, W)
    print(f"log-log fit over {len(rows)} checkpoints: W2 ~ J^{slope:.3f} (+- {slope_se:.3f}); "
          f"J in [{J.min():.3g}, {J.max():.3g}], W2 in [{W.min():.3f}, {W.max():.3f}]; {time.time() - t0:.0f} s")

    with open(args.out / "w2_vs_j.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        f.write(f"# slope {slope:.4f} +- {slope_se:.4f}; floor_iid {floor_iid:.4f}; floor_sampler {floor_sampler:.4f}\n")

    fig, ax = plt.subplots(figsize=(5.2, 4.0), dpi=110)
    for r in range(args.runs):
        sel = [i for i, row in enumerate(rows) if row["run"] == r]
        ax.errorbar(J[sel], W[sel], xerr=[rows[i]["J_se"] for i in sel], fmt="o-", ms=4, lw=0.8, capsize=2,
                    label=f"run {r} (checkpoints {marks[0]}..{marks[-1]} it)")
    jj = np.geomspace(J.min(), J.max(), 50)
    ax.plot(jj, np.exp(icpt) * jj ** slope, "k--", lw=1, label=f"fit: W2 ∝ J^{slope:.2f}±{slope_se:.2f}")
    ax.plot(jj, np.exp(icpt) * (jj / jj[-1]) ** 0.5 * jj[-1] ** slope, ":", c="gray", lw=1, label="slope 1/2")
    ax.axhline(floor_iid, c="tab:red", lw=0.8, ls="-.", label=f"W2 of two true sets, n={args.n_samples}")
    ax.axhline(floor_sampler, c="tab:green", lw=0.8, ls="-.", label=f"analytic score, EM N={args.sample_steps}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("J = ½∫ σ_t² E‖∇log p_t − s_θ‖² dt")
    ax.set_ylabel("W2(samples, mixture)  [POT, exact]")
    ax.set_title("Kwon et al. 2022: W2 vs score-matching objective", fontsize=9)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out / "w2_vs_j.png")
    if args.figure is not None:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure)
    plt.close(fig)
    return {"slope": slope, "slope_se": slope_se, "rows": rows, "floor_iid": floor_iid, "floor_sampler": floor_sampler}


if __name__ == "__main__":
    main()
