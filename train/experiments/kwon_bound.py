"""Kwon, Fan, Lee (2022): does the score-matching objective J bound W2? A fair test (ALGORITHMS §6).

Two configurations on Kwon et al.'s 2-D four-Gaussian mixture, both with their 3x64 softplus
epsilon-MLP:

  kwon  Kwon et al.'s notebook setup (Score_Wasserstein.ipynb, `wgfcore.adapters.KWON_SCHEDULE`): a 10-step
        DDPM with the sigmoid beta schedule sigmoid(linspace(-6, 6, 10)) (beta_end - beta_start) + beta_start
        from 1e-5 to 1e-2 (--beta-end 5e-3 gives the 2-D DDPM tutorial's schedule, which this study used
        before issue 20), ancestral sampling (variance beta_i, no noise on the last step) that starts from
        the *forward-noised data batch* x_T ~ q(x_T | x_0), so W2(p_T, q_T) = 0.
  ours  this project's VP-SDE (b 0.1 .. 20, ALGORITHMS §1), Euler-Maruyama on the reverse SDE
        (--em-steps) from the prior N(0, I), t in [1e-3, 1].

Training follows Kwon's notebook: the DSM loss is first *maximised* for --ascent iterations, then
minimised for --iters, with checkpoints along both phases, so J spans several decades. At every
checkpoint:

  J_g2    = 1/2 int g^2 E|grad log p_t - s_theta|^2 dt, the paper's weight (g^2 = 2 beta), against the
            analytic mixture score; J_sigma2 (the DSM weight sigma_t^2) is reported next to it.
  W2      exact empirical W2 (POT) between --n-samples generated points and a reference set of true
          points drawn with exactly round(n w_k) points per mode. Three numbers: W2_all (plain);
          W2_modes = sqrt(sum_k n_k/n W2(generated in mode k, n_k true points of mode k)^2), the
          within-mode transport with the generated mode counts n_k, so multinomial mode-mass noise
          cannot hide the score error; W2_mass = W2 between the generated and the true mode masses
          (on the mode centres), which is where that noise lives. Floors: the analytic score through
          the same sampler, over --floor-seeds seeds (mean +- sd), and two independent true sets.
  bound   sqrt(2 int I^2 g^2 dt) sqrt(J_g2) + I(T) W2(p_T, q_T) (`wgfcore.bounds`), with the model's
          one-sided Lipschitz constant L_s(t) estimated as the largest symmetric-Jacobian eigenvalue over
          draws of p_t, a grid over the data's box and 256 of the sampler's own states at that time;
          the theorem needs the sup over R^d, so this is a lower estimate of L_s, and the plotted
          bound a lower estimate of the paper's bound. The bound covers the continuous-time reverse
          process; the samplers' discretisation error (measured by the analytic-score floor) is extra.

    python train/run.py kwon --out runs/kwon_bound --doc docs/kwon_results.md --figures docs/figures

writes kwon_bound.csv, kwon_run.json (the options it ran with), kwon_w2_vs_j.png and kwon_bound.png into
--out, the table to --doc and the two figures to --figures (when given). `--render DIR` remakes the table
and figures from DIR's own record (kwon_run.json, the CSV, the floors), never from the flags given.
`--small` is the seconds-long version the test suite runs. The two configurations are
train/experiments/kwon_setups.py, the table and figures kwon_report.py; training runs through the
engine's loop (train.engine.loop).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from wgfcore.adapters import KWON_SCHEDULE
from wgfcore.bounds import kwon_bound_constant, one_sided_lipschitz
from wgfcore.nets.mlp import MLP
from wgfcore.scores import kwon_mixture

from ..engine.cli import at_least, path, pos_int, seed as seed_arg, threads
from ..engine.config import Config
from ..engine.distributed import Dist
from ..engine.errors import UsageError
from ..engine.loop import loop, make_optimizer
from .kwon_report import plot, summarise, write_doc
from .kwon_setups import SETUPS, SignedDSM, stratified_sample, w2_report

CONFIGS = tuple(SETUPS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", type=path, default=Path("runs/kwon_bound"), help="output folder")
    p.add_argument("--doc", type=path, default=None, help="also write the markdown table here")
    p.add_argument("--figures", type=path, default=None, help="also write the figures into this folder")
    p.add_argument("--configs", default="kwon,ours", help="comma-separated subset of kwon,ours")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--runs", type=pos_int, default=2, help="training runs per configuration (seeds seed, seed+1, ...)")
    p.add_argument("--ascent", type=at_least(0), default=20, help="iterations that maximise the DSM loss first")
    p.add_argument("--ascent-checkpoints", type=at_least(0), default=4)
    p.add_argument("--iters", type=pos_int, default=6000, help="iterations that then minimise it")
    p.add_argument("--checkpoints", type=pos_int, default=9, help="log-spaced checkpoints over the minimisation")
    p.add_argument("--batch", type=pos_int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-samples", type=pos_int, default=2000, help="generated points per W2")
    p.add_argument("--floor-seeds", type=at_least(2), default=5,
                   help="seeds for the floors' mean and sd (the spread needs two draws)")
    p.add_argument("--em-steps", type=pos_int, default=500, help="ours: Euler-Maruyama steps")
    p.add_argument("--ddpm-steps", type=at_least(2), default=KWON_SCHEDULE["num_train_timesteps"],
                   help="kwon: DDPM steps (default: Kwon et al.'s 10)")
    p.add_argument("--beta-start", type=float, default=KWON_SCHEDULE["beta_start"],
                   help="kwon: sigmoid schedule's first beta (default: Kwon et al.'s 1e-5)")
    p.add_argument("--beta-end", type=float, default=KWON_SCHEDULE["beta_end"],
                   help="kwon: sigmoid schedule's last beta (default: Kwon et al.'s 1e-2; 5e-3 is the 2-D DDPM "
                        "tutorial's, used here before issue 20)")
    p.add_argument("--n-t", type=pos_int, default=400, help="ours: time draws for J")
    p.add_argument("--n-x", type=pos_int, default=256, help="x draws per time for J")
    p.add_argument("--lip-times", type=pos_int, default=40, help="ours: time intervals for L_s(t)")
    p.add_argument("--lip-points", type=pos_int, default=256, help="points per time for L_s (plus a 17x17 grid)")
    p.add_argument("--render", type=path, default=None,
                   help="re-render the table and figures from a finished run's --out folder (no training), with "
                        "the options that run recorded (kwon_run.json); only --doc and --figures may be given")
    p.add_argument("--small", action="store_true", help="seconds-long smoke version (the test suite runs it)")
    p.add_argument("--threads", type=threads, default=1)


def check_arguments(args) -> None:
    """--small's sizes, then every cross-argument rule (a UsageError naming the rule)."""
    if args.small:
        args.runs, args.ascent, args.ascent_checkpoints, args.iters, args.checkpoints = 1, 20, 1, 60, 2
        args.n_samples, args.floor_seeds, args.em_steps, args.n_t, args.n_x = 200, 2, 40, 16, 32
        args.lip_times, args.lip_points = 6, 32
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()] \
        if isinstance(args.configs, str) else args.configs
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad or not args.configs:
        raise UsageError(f"--configs must be a comma-separated subset of {','.join(CONFIGS)}, got {bad or 'nothing'}")
    if not 0 < args.beta_start < args.beta_end < 1:
        raise UsageError("need 0 < --beta-start < --beta-end < 1")
    if not 0 < args.lr < float("inf"):
        raise UsageError(f"--lr must be a positive finite number, got {args.lr}")


#: the options that define a run (recorded in kwon_run.json; --render takes them from there)
STUDY_OPTIONS = ("configs", "seed", "runs", "ascent", "ascent_checkpoints", "iters", "checkpoints", "batch", "lr",
                 "n_samples", "floor_seeds", "em_steps", "ddpm_steps", "beta_start", "beta_end", "n_t", "n_x",
                 "lip_times", "lip_points", "threads", "small")


def from_record(args) -> float | None:
    """--render: set args' study options from the run's kwon_run.json; an option given on the command line
    (other than --render, --doc, --figures) is an error, since the document must describe the run it is
    made from. Returns the run's recorded duration in seconds."""
    rec_file = args.render / "kwon_run.json"
    try:
        rec = json.loads(rec_file.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--render {args.render}: cannot read its record kwon_run.json ({e}); only runs that "
                         "recorded their options can be re-rendered") from None
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    default = vars(defaults.parse_args([]))
    given = [k for k in STUDY_OPTIONS + ("out",) if getattr(args, k) != default[k]]
    if given:
        raise UsageError(f"--render takes the run's options from {rec_file}; drop "
                         + ", ".join("--" + k.replace("_", "-") for k in given))
    for k, v in rec["options"].items():
        setattr(args, k, v)
    args.argv = rec["argv"]
    return rec.get("elapsed_s")


def lipschitz_profile(cfg, score_fn, mix, g, trajectory=None) -> tuple[torch.Tensor, torch.Tensor]:
    """L_s on each interval of cfg.lip_grid(), estimated where the model is used: at the interval's
    left end for ours (L_s grows as t falls), at the DDPM timestep for kwon; points are draws of p_t,
    a 17x17 grid over the data's box and, given the sampler's `trajectory` {t: states}, its states at
    the recorded time nearest to t (the model's own paths can leave the data's region)."""
    ts = cfg.lip_grid()
    traj_t = torch.tensor(sorted(trajectory), dtype=torch.float64) if trajectory else None
    u = torch.linspace(-1.0, 1.0, 17, dtype=torch.float64)
    grid = torch.cartesian_prod(u, u)
    L = []
    for k in range(len(ts) - 1):
        t_eval = ts[k + 1] if cfg.name == "kwon" else ts[k]
        x0 = mix.sample(cfg.args.lip_points, generator=g)
        xt = cfg.sde.perturb(x0, t_eval, generator=g)[0]
        pts = [xt, float(cfg.sde.alpha(t_eval)) * grid]
        if traj_t is not None:
            near = float(traj_t[(traj_t - t_eval).abs().argmin()])
            own = trajectory[near].to(torch.float64)
            pts.append(own[torch.isfinite(own).all(1)])
        pts = torch.cat(pts).float()
        L.append(one_sided_lipschitz(score_fn, pts, float(t_eval)))
    return ts, torch.tensor(L, dtype=torch.float64)


def bound_row(cfg, score_fn, mix, J_g2, g, trajectory=None) -> dict:
    ts, L = lipschitz_profile(cfg, score_fn, mix, g, trajectory)
    c = kwon_bound_constant(ts, L, cfg.sde)
    log_b1 = c["log_C"] + 0.5 * math.log(max(J_g2, 1e-300))
    w2T = cfg.w2_T(mix)
    log_b2 = c["log_IT"] + math.log(w2T) if w2T > 0 else -math.inf
    log_bound = float(np.logaddexp(log_b1, log_b2))
    return {"L_s_max": float(L.max()), "log10_C": c["log_C"] / math.log(10), "log10_IT": c["log_IT"] / math.log(10),
            "log10_bound": log_bound / math.log(10)}


def floors(cfg, mix, args) -> dict:
    """The analytic score through the same sampler, and two independent true sets, over floor_seeds seeds."""
    out = {}
    exact = mix.score_fn(cfg.sde)
    rows = [w2_report(cfg.generate(exact, mix, args.n_samples, seed=90_000 + r), mix,
                      torch.Generator().manual_seed(91_000 + r)) for r in range(args.floor_seeds)]
    iid = [w2_report(stratified_sample(mix, torch.multinomial(mix.weights, args.n_samples, True,
                                                              generator=torch.Generator().manual_seed(92_000 + r))
                                       .bincount(minlength=mix.K), torch.Generator().manual_seed(93_000 + r)),
                     mix, torch.Generator().manual_seed(94_000 + r)) for r in range(args.floor_seeds)]
    for key in ("W2_all", "W2_modes", "W2_mass"):
        for tag, rs in (("analytic", rows), ("iid", iid)):
            v = np.array([r[key] for r in rs])
            out[f"{tag}_{key}"] = (float(v.mean()), float(v.std(ddof=1)))
    return out


def training_config(args, seed: int, plan) -> Config:
    """The engine's view of this study's training: Adam at a constant lr, no clipping, no EMA, the loss
    logged at every step (its last value is recorded at each checkpoint) and no checkpoint files."""
    return Config.from_dict({
        "dataset": "gmm", "hidden": 64, "batch_size": args.batch, "iterations": max(m for _, m in plan),
        "lr": args.lr, "optimizer": "adam", "warmup": 0, "weight_decay": 0.0, "grad_clip": 0.0, "ema_decay": 0.0,
        "delta_tau": 0.05, "log_every": 1, "ckpt_every": 1, "seed": seed,
        "eval": {"steps": [args.em_steps], "samples": args.n_samples, "rows": ["em"]}}, "the kwon study's training")


def run_config(cfg, mix, args, log):
    fl = floors(cfg, mix, args)
    log(f"[{cfg.name}] floors (mean +- sd over {args.floor_seeds} seeds): " + ", ".join(
        f"{k} {m:.4f}+-{s:.4f}" for k, (m, s) in fl.items()))
    asc = sorted(set(np.geomspace(1, max(args.ascent, 1), args.ascent_checkpoints).round().astype(int).tolist())) \
        if args.ascent > 0 and args.ascent_checkpoints > 0 else []
    desc = sorted(set(np.geomspace(1, args.iters, args.checkpoints).round().astype(int).tolist()))
    plan = [("ascent", m) for m in asc] + [("descent", m) for m in desc]
    rows = []
    for r in range(args.runs):
        seed = args.seed + r
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        net = MLP(mix.d, hidden=64, depth=3, act="softplus")
        score_fn = cfg.score_fn(net)
        tcfg = training_config(args, seed, plan)
        it = {"ascent": 0, "descent": 0}
        phase_now, opt, loss = None, None, float("nan")
        for phase, mark in plan:
            if phase != phase_now:  # a fresh Adam per phase: its moments from the ascent would fight the descent
                opt, phase_now = make_optimizer(net.parameters(), tcfg), phase
            if it[phase] < mark:
                batches = ((i, mix.sample(args.batch, generator=g).float()) for i in range(it[phase], mark))
                logged = loop(model=SignedDSM(cfg, net, -1.0 if phase == "ascent" else 1.0), opt=opt, batches=batches,
                              cfg=tcfg, d=Dist(), start=it[phase], stop=mark, generator=g,
                              clip_groups=[("", list(net.parameters()))], emas=[], log=None, save=lambda done: None,
                              last_good=(0, None), watch=[net], progress=False, desc=f"{cfg.name} {phase}")
                loss, it[phase] = logged[-1]["dsm"], mark
            net.eval()
            ck = 1000 * r + len(rows)
            row = {"config": cfg.name, "run": r, "phase": phase, "iter": mark, "dsm_loss": loss}
            row.update(cfg.J(score_fn, mix, seed=10_000 + ck))
            traj = {}
            row.update(w2_report(cfg.generate(score_fn, mix, args.n_samples, seed=20_000 + ck, trajectory=traj), mix,
                                 torch.Generator().manual_seed(30_000 + ck)))
            row.update(bound_row(cfg, score_fn, mix, row["J_g2"], torch.Generator().manual_seed(40_000 + ck), traj))
            net.train()
            rows.append(row)
            log(f"[{cfg.name}] run {r} {phase} {mark:>5}: J_g2 {row['J_g2']:.3g} J_s2 {row['J_sigma2']:.3g} "
                f"W2 all {row['W2_all']:.4f} modes {row['W2_modes']:.4f} mass {row['W2_mass']:.4f} "
                f"log10 bound {row['log10_bound']:.1f} (L_s max {row['L_s_max']:.3g})")
    return fl, rows


def run(args) -> int:
    experiment(args)
    return 0


def experiment(args) -> dict:
    """The whole study (or with --render, its outputs again from a finished run); returns
    {configuration: (floors, rows, summary)}."""
    elapsed = from_record(args) if args.render is not None else None
    check_arguments(args)
    torch.set_num_threads(args.threads)
    if args.render is None:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {args.out}: cannot create it ({e.strerror})") from None
    mix, t0 = kwon_mixture(), time.time()
    cfgs = [SETUPS[c](args) for c in args.configs]
    results, all_rows = {}, []

    def log(msg):
        print(f"{time.time() - t0:7.1f}s {msg}", flush=True)

    if args.render is not None:
        floors_all = json.loads((args.render / "kwon_floors.json").read_text())
        with open(args.render / "kwon_bound.csv") as f:
            rows_all = [{k: (v if k in ("config", "phase") else (int(v) if k in ("run", "iter") else float(v)))
                         for k, v in r.items()} for r in csv.DictReader(f)]
        cfgs = [c for c in cfgs if c.name in floors_all]
        for cfg in cfgs:
            rows = [r for r in rows_all if r["config"] == cfg.name]
            fl = {k: tuple(v) for k, v in floors_all[cfg.name].items()}
            results[cfg.name] = (fl, rows, summarise(cfg, fl, rows))
        dirs = [args.render] + ([args.figures] if args.figures is not None else [])
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        plot(dirs, cfgs, results)
        write_doc(args.doc or args.render / "kwon_results.md", args, cfgs, results, elapsed, rendered=True)
        return results
    for cfg in cfgs:
        fl, rows = run_config(cfg, mix, args, log)
        results[cfg.name] = (fl, rows, summarise(cfg, fl, rows))
        all_rows += rows
        s = results[cfg.name][2]
        log(f"[{cfg.name}] J_g2 {s['J_range'][0]:.3g}..{s['J_range'][1]:.3g}; fit {s['fit']} over {s['n_fit']} points; "
            f"log10(bound / W2_modes) min/median/max {s['log10_ratio']}; below at {s['below']}")
    (args.out / "kwon_floors.json").write_text(json.dumps({k: v[0] for k, v in results.items()}, indent=1))
    with open(args.out / "kwon_bound.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(all_rows[0]))
        w.writeheader()
        w.writerows(all_rows)
    dirs = [args.out] + ([args.figures] if args.figures is not None else [])
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    plot(dirs, cfgs, results)
    elapsed = round(time.time() - t0, 1)
    record = {"argv": list(getattr(args, "argv", None) or ["kwon"]), "elapsed_s": elapsed,
              "options": {k: getattr(args, k) for k in STUDY_OPTIONS}}
    (args.out / "kwon_run.json").write_text(json.dumps(record, indent=1))
    write_doc(args.out / "kwon_results.md", args, cfgs, results, elapsed)
    if args.doc is not None:
        write_doc(args.doc, args, cfgs, results, elapsed)
    log(f"done in {elapsed:.0f} s")
    return results


__all__ = ["add_arguments", "run", "experiment", "CONFIGS"]
