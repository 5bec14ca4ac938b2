"""The 2-D toy end to end: joint score + projection training on Kwon et al.'s four-Gaussian mixture,
then W2 (POT) of every sampler at N = 1000/100/40/20, with NFE, for the learned and the analytic score.

ALGORITHMS §1-3, §6-7. Run as `python train/run.py --dataset gmm` (see --help). Writes results.md,
results.csv, samples.png and w2_vs_nfe.png into the run folder.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from wgfcore.losses import joint_loss, projection_loss
from wgfcore.metrics import w2_empirical
from wgfcore.nets.mlp import MLP
from wgfcore.ops import default_delta_p
from wgfcore.sample import eps_to_score, sample, tweedie_proj_fn
from wgfcore.scores import GaussianMixture, kwon_mixture
from wgfcore.sde import VPSDE


def parse(argv=None):
    p = argparse.ArgumentParser(prog="train/run.py --dataset gmm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["gmm"], default="gmm")
    p.add_argument("--iters", type=int, default=6000, help="joint training iterations")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=128, help="MLP width (3 hidden layers, softplus)")
    p.add_argument("--delta-tau", default="20", help="projection-loss step: N (dtau = (1-eps)/N) or a list 20,40,100")
    p.add_argument("--steps", default="1000,100,40,20", help="sampler step counts N to evaluate")
    p.add_argument("--n-samples", type=int, default=4000, help="samples per W2 cell (>= 2000)")
    p.add_argument("--delta-p", type=float, default=None,
                   help="override the paper's delta_p for every N (default: ops.default_delta_p(N))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/gmm-<time>)")
    p.add_argument("--quick", action="store_true", help="a smoke run of well under a minute")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest for these tiny MLPs (thread overhead dominates)")
    a = p.parse_args(argv)
    if a.quick:
        a.iters, a.steps, a.n_samples = min(a.iters, 300), "40,20", min(a.n_samples, 500)
    if a.n_samples < 2 or a.iters < 1 or a.batch < 1:
        p.error("--n-samples, --iters and --batch must be positive")
    a.steps = [int(s) for s in str(a.steps).split(",")]
    dts = [int(s) for s in str(a.delta_tau).split(",")]
    a.delta_tau = (1 - 1e-3) / dts[0] if len(dts) == 1 else dts
    return a


class EMA:
    def __init__(self, model, decay=0.999):
        self.model, self.decay = copy.deepcopy(model).eval().requires_grad_(False), decay

    @torch.no_grad()
    def update(self, model):
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p, 1 - self.decay)


def train(data: GaussianMixture, sde, args, score_fn_fixed=None):
    """Joint training of eps- and projection MLPs; with `score_fn_fixed`, train T alone against it."""
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    eps_net = MLP(2, args.hidden, 3).to(args.device)
    proj_net = MLP(2, args.hidden, 3).to(args.device)
    params = list(proj_net.parameters()) + ([] if score_fn_fixed else list(eps_net.parameters()))
    opt = torch.optim.Adam(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iters, eta_min=args.lr * 0.05)
    ema_eps, ema_proj = EMA(eps_net), EMA(proj_net)
    log = []
    bar = tqdm(range(args.iters), desc="train T only (analytic score)" if score_fn_fixed else "train score+T")
    for it in bar:
        x0 = data.sample(args.batch, g).float().to(args.device)
        if score_fn_fixed is None:
            loss, parts = joint_loss(eps_net, proj_net, x0, sde, delta_tau=args.delta_tau, generator=None)
        else:
            loss = projection_loss(proj_net, score_fn_fixed, x0, sde, delta_tau=args.delta_tau)
            parts = {"dsm": torch.zeros(()), "proj": loss.detach()}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_eps.update(eps_net)
        ema_proj.update(proj_net)
        if it % 100 == 0 or it == args.iters - 1:
            log.append({"iter": it, "dsm": float(parts["dsm"]), "proj": float(parts["proj"])})
            bar.set_postfix(dsm=f"{log[-1]['dsm']:.3f}", proj=f"{log[-1]['proj']:.3f}")
    return ema_eps.model, ema_proj.model, log


def evaluate(score_fn, proj_fn, data, args, label, ref):
    """W2 of each sampler and N against the reference set; returns rows and the samples."""
    rows, samples = [], {}
    plan = []
    for N in args.steps:
        plan += [("Score-based (EM)", "euler_maruyama", N, None),
                 ("EM at equal NFE (2N steps)", "euler_maruyama", 2 * N, None),
                 ("Predict-Project (learned T)", "predict_project", N, proj_fn),
                 ("Predict-Project (Tweedie T, ours)", "predict_project", N, "tweedie"),
                 ("Heun PF-ODE (equal NFE)", "heun_ode", N, None)]
    for name, sampler, steps, proj in tqdm(plan, desc=f"evaluate ({label})"):
        if proj == "tweedie":
            proj = tweedie_proj_fn(score_fn, steps)
        dp = default_delta_p(steps) if args.delta_p is None else args.delta_p
        with torch.no_grad():
            x, nfe = sample(score_fn, (args.n_samples, 2), steps, sampler=sampler, proj_fn=proj, delta_p=dp,
                            seed=args.seed + 1, device=args.device, return_nfe=True)
        N = steps // 2 if name.startswith("EM at equal") else steps
        rows.append({"score": label, "sampler": name, "N": N, "steps": steps, "NFE": nfe,
                     "delta_p": round(dp, 4) if sampler == "predict_project" else "",
                     "W2": w2_empirical(x.cpu(), ref)})
        samples[(name, N)] = x.cpu()
    return rows, samples


def table_md(rows, steps, floor):
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    head = "| sampler | " + " | ".join(f"N={n}" for n in steps) + " |"
    out = [head, "|" + "---|" * (len(steps) + 1)]
    for nm in names:
        cells = []
        for n in steps:
            r = next(r for r in rows if r["sampler"] == nm and r["N"] == n)
            cells.append(f"{r['W2']:.4f} (NFE {r['NFE']})")
        out.append(f"| {nm} | " + " | ".join(cells) + " |")
    out.append("| *floor: W2 of fresh true samples* | " + " | ".join(f"{floor:.4f}" for _ in steps) + " |")
    return "\n".join(out)


def verdict(rows, label, steps, noise):
    """Predict-Project at N against EM at 2N steps (equal NFE), cell by cell, from the measured rows."""
    parts = []
    for n in steps:
        pp = next(r["W2"] for r in rows if r["sampler"] == "Predict-Project (learned T)" and r["N"] == n)
        em = next(r["W2"] for r in rows if r["sampler"] == "EM at equal NFE (2N steps)" and r["N"] == n)
        word = "within noise of" if abs(pp - em) < 2 * noise else ("better than" if pp < em else "worse than")
        parts.append(f"N={n}: PP {pp:.4f} {word} EM {em:.4f}")
    return f"- {label} score, Predict-Project vs EM at equal NFE: " + "; ".join(parts) + "."


def plot(samples, ref, steps, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def plot_w2(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, label in zip(axes, ("learned", "analytic")):
        for nm in dict.fromkeys(r["sampler"] for r in rows):
            rs = sorted((r for r in rows if r["sampler"] == nm and r["score"] == label), key=lambda r: r["NFE"])
            ax.plot([r["NFE"] for r in rs], [r["W2"] for r in rs], "o-", label=nm, ms=3)
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_title(f"{label} score")
    axes[0].set_ylabel("W2 to the mixture (POT)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(max(1, args.threads))
    out = args.out or Path("runs") / time.strftime("gmm-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sde, data = VPSDE(), kwon_mixture()
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))

    eps_net, proj_net, log = train(data, sde, args)
    score_learned = eps_to_score(eps_net, sde)
    _, proj_analytic, log_a = train(data, sde, args, score_fn_fixed=data.score_fn(sde))
    torch.save({"eps_net": eps_net.state_dict(), "proj_net": proj_net.state_dict(),
                "proj_net_analytic": proj_analytic.state_dict(), "config": cfg}, out / "model.pt")
    with open(out / "train_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["iter", "dsm", "proj"])
        w.writeheader()
        w.writerows(log)

    gref = torch.Generator().manual_seed(10_000 + args.seed)
    # Stratified reference (exact mode proportions) so that its own mode-count noise adds nothing.
    per = args.n_samples // data.K
    ref = torch.cat([GaussianMixture(data.means[k:k + 1], data.covs[k:k + 1]).sample(per, gref)
                     for k in range(data.K)]).float()
    # The W2 estimator's own level and noise: fresh true samples against the reference, 3 draws.
    floors = torch.tensor([w2_empirical(data.sample(args.n_samples, gref).float(), ref) for _ in range(3)])
    floor, noise = float(floors.mean()), float(floors.std())

    rows_l, samp_l = evaluate(score_learned, proj_net, data, args, "learned", ref)
    rows_a, samp_a = evaluate(data.score_fn(sde), proj_analytic, data, args, "analytic", ref)
    rows = rows_l + rows_a
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    verdicts = [verdict(rows_l, "learned", args.steps, noise), verdict(rows_a, "analytic", args.steps, noise)]
    md = (f"W2 (POT, exact OT, {args.n_samples} samples each) to Kwon et al.'s 4-Gaussian mixture; "
          f"NFE in brackets.\n\n### Learned score (MLP 3x{args.hidden}, {args.iters} joint iterations)\n\n"
          f"{table_md(rows_l, args.steps, floor)}\n\n### Analytic score (T trained against it)\n\n"
          f"{table_md(rows_a, args.steps, floor)}\n\n"
          f"The floor is the W2 between {args.n_samples} fresh samples of the true mixture and the reference "
          f"set (mean of 3 draws, sd {noise:.4f}): no sampler can be told apart from the truth below it, and "
          f"differences under ~2 sd are noise.\n\n" + "\n".join(verdicts) + "\n")
    (out / "results.md").write_text(md)
    plot(samp_l, ref, args.steps, out / "samples.png", "samples, learned score")
    plot(samp_a, ref, args.steps, out / "samples_analytic.png", "samples, analytic score")
    plot_w2(rows, out / "w2_vs_nfe.png")
    print(md)
    print(f"wrote {out} in {time.time() - t0:.0f} s")
    return out


if __name__ == "__main__":
    main()
