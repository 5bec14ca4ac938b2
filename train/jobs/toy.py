"""The 2-D toy job (`train/run.py --dataset gmm`): joint score + projection training on Kwon et al.'s
four-Gaussian mixture, then W2 (POT) of every sampler at each N, with NFE, for the learned and the
analytic score. ALGORITHMS §1-3, §6-7.

It shares the image jobs' config schema, run-folder rules and lock, training loop, EMA, report and
plots; only the data (fresh mixture draws every step), the networks (MLPs) and the metric (exact W2)
are its own. Writes results.md/.csv, samples*.png and w2_vs_nfe.png into the run folder.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from wgfcore.metrics import w2_empirical
from wgfcore.sample import eps_to_score, sample, tweedie_proj_fn
from wgfcore.scores import GaussianMixture, kwon_mixture
from wgfcore.sde import VPSDE

from ..engine import checkpoint as ckpt
from ..engine import config as C
from ..engine import distributed as D
from ..engine.errors import UsageError
from ..engine.loop import loop, loss_fields, make_optimizer
from ..engine.networks import EMA, build_nets, check_compile, compiled
from ..engine.objectives import JointObjective, ProjectionObjective
from ..engine.rundir import LossLog, claim_new, undo_new_run, write_json
from ..evaluation.plots import plot_losses, plot_metric, toy_scatter
from ..evaluation.report import toy_markdown, toy_verdicts, write_csv
from ..evaluation.table import cells, check_nfe
from .common import overrides


def _mixture_batches(data: GaussianMixture, cfg: C.Config, g: torch.Generator, device, start: int, stop: int):
    for step in range(start, stop):
        yield step, data.sample(cfg.batch_size, g).float().to(device)


def train_toy(cfg: C.Config, out: Path, d: D.Dist, data: GaussianMixture, sde: VPSDE, *, fixed_score=None,
              progress: bool = True):
    """Joint training of the eps- and projection MLPs (with `fixed_score`: T alone against it), through
    the shared loop; checkpoints and losses.csv in `out`. Returns (EMA eps net, EMA projection net)."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    eps_net, proj_net = (n.to(d.device) for n in build_nets(cfg))
    fwd = [compiled(eps_net, cfg.compile), compiled(proj_net, cfg.compile)]
    if fixed_score is None:
        obj = JointObjective(eps_net, proj_net, sde, cfg, forward_nets=fwd)
        params = list(obj.parameters())
    else:
        obj = ProjectionObjective(fwd[1], fixed_score, sde, cfg)
        params = list(proj_net.parameters())
    opt = make_optimizer(params, cfg)
    ema_eps, ema_proj = EMA(eps_net, cfg.ema_decay), EMA(proj_net, cfg.ema_decay)
    groups = [("", params)] if cfg.clip_jointly else [("eps", list(eps_net.parameters())),
                                                                ("proj", list(proj_net.parameters()))]
    log = LossLog(out / "losses.csv", loss_fields(groups), None)

    def save(done):
        state = ckpt.training_state(done, cfg, d, eps_net, proj_net, ema_eps.net, ema_proj.net, opt, {"data": g})
        return ckpt.save_checkpoint(state, out / "checkpoints", done)

    loop(model=obj, opt=opt, batches=_mixture_batches(data, cfg, g, d.device, 0, cfg.iterations), cfg=cfg, d=d,
         start=0, stop=cfg.iterations, generator=None, clip_groups=groups,
         emas=[(ema_eps, eps_net), (ema_proj, proj_net)], log=log, save=save, last_good=(0, None),
         watch=[eps_net, proj_net], progress=progress,
         desc="train T only (analytic score)" if fixed_score is not None else "train score+T")
    plot_losses(out / "losses.csv", out / "losses.png")
    return ema_eps.net, ema_proj.net


def reference_set(data: GaussianMixture, n: int, seed: int):
    """A stratified reference (exact mode proportions, so its own mode-count noise adds nothing), and
    the W2 estimator's floor: fresh true samples against it, 3 draws (mean, sd)."""
    gref = torch.Generator().manual_seed(10_000 + seed)
    per = n // data.K
    ref = torch.cat([GaussianMixture(data.means[k:k + 1], data.covs[k:k + 1]).sample(per, gref)
                     for k in range(data.K)]).float()
    floors = torch.tensor([w2_empirical(data.sample(n, gref).float(), ref) for _ in range(3)])
    return ref, float(floors.mean()), float(floors.std())


def evaluate_toy(score_fn, proj_fn, cfg: C.Config, ref, d, label: str, progress: bool = True):
    """W2 of every (row, N) cell against the reference; returns (result rows, samples per cell)."""
    rows, samples = [], {}
    for c in tqdm(cells(cfg.eval), desc=f"evaluate ({label})", disable=not progress):
        proj = proj_fn
        if c["row"] == "pp_tweedie":
            proj = tweedie_proj_fn(score_fn, c["steps"])
        t0 = time.time()
        with torch.no_grad():
            x, calls = sample(score_fn, (c["n"], 2), c["steps"], sampler=c["sampler"],
                              proj_fn=proj if c["sampler"] == "predict_project" else None, delta_p=c["delta_p"],
                              seed=cfg.seed + 1, device=d.device, return_nfe=True)
        check_nfe(c, calls)
        n = c.pop("n")
        rows.append(dict(c, score=label, metric="W2", value=w2_empirical(x.cpu(), ref), se=None, n_samples=n,
                         seconds=round(time.time() - t0, 2)))
        samples[(c["label"], c["N"])] = x.cpu()
    return rows, samples


def paired_seeds(score_fn, proj_fn, cfg: C.Config, ref, d, rows: list, progress: bool = True) -> dict:
    """W2 per sampling seed of the cells the verdicts compare (pp, em, em2n at every N): seed 0 is the
    main table's; seed s > 0 draws new prior samples and noise, the same for the three cells."""
    keep = {"pp", "em", "em2n"}
    per_seed = {(r["row"], r["N"]): [r["value"]] for r in rows if r["row"] in keep}
    S = int(cfg.eval.seeds)
    todo = [c for c in cells(cfg.eval) if c["row"] in keep]
    for s in tqdm(range(1, S), desc="paired seeds", disable=not progress):
        for c in todo:
            with torch.no_grad():
                x = sample(score_fn, (c["n"], 2), c["steps"], sampler=c["sampler"],
                           proj_fn=proj_fn if c["sampler"] == "predict_project" else None, delta_p=c["delta_p"],
                           seed=cfg.seed + 1 + 7919 * s, device=d.device)
            per_seed[(c["row"], c["N"])].append(w2_empirical(x.cpu(), ref))
    return per_seed


def toy_job(args, d) -> int:
    if args.resume:
        raise UsageError("--resume: the gmm job runs in minutes and does not resume; start it again "
                         "(with --overwrite to reuse its --out)")
    cfg = C.build("gmm", args.quick, args.config, overrides(args), args.seed)
    check_compile(cfg.compile)
    out = Path(args.out) if args.out else Path(args.runs_dir) / time.strftime("gmm-%Y%m%d-%H%M%S")
    lock = claim_new(out, args.overwrite, job="gmm", resumable=False)
    try:
        return _run(cfg, out, args, d)
    except UsageError:
        undo_new_run(out, lock)  # a failed start leaves nothing that blocks the folder
        raise
    finally:
        lock.release()


def _run(cfg: C.Config, out: Path, args, d) -> int:
    torch.set_num_threads(args.threads or cfg.cpu_threads or torch.get_num_threads())
    progress = not args.no_progress
    write_json(cfg.data, out / "config.json")
    write_json({"argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(d.device),
                "torch": torch.__version__, "threads": torch.get_num_threads()}, out / "run_info.json")
    print(f"run folder: {out}", file=sys.stderr)
    t0 = time.time()
    sde, data = VPSDE(), kwon_mixture()

    eps_net, proj_net = train_toy(cfg, out, d, data, sde, progress=progress)
    _, proj_analytic = train_toy(cfg, out / "analytic", d, data, sde, fixed_score=data.score_fn(sde),
                                 progress=progress)
    eps_net, proj_net, proj_analytic = (compiled(n, cfg.compile) for n in (eps_net, proj_net, proj_analytic))
    score_learned = eps_to_score(eps_net, sde)

    n = cfg.eval.samples
    ref, floor, noise = reference_set(data, n, cfg.seed)
    rows_l, samp_l = evaluate_toy(score_learned, proj_net, cfg, ref, d, "learned", progress)
    rows_a, samp_a = evaluate_toy(data.score_fn(sde), proj_analytic, cfg, ref, d, "analytic", progress)
    floor_row = {"row": "data", "label": "floor: W2 of fresh true samples", "sampler": "data", "N": 0, "steps": 0,
                 "nfe": 0, "delta_p": None, "metric": "W2", "value": floor, "se": noise, "n_samples": n, "seconds": 0.0}
    write_csv(rows_l + rows_a + [floor_row], out / "results.csv", extra_fields=["score"])
    seeds = int(cfg.eval.seeds)
    lines = None
    if seeds >= 2 and not cfg.quick:  # an untrained (--quick) model gets no verdicts
        lines = []
        for label, score_fn, proj_fn, rows in (("learned", score_learned, proj_net, rows_l),
                                               ("analytic", data.score_fn(sde), proj_analytic, rows_a)):
            per_seed = paired_seeds(score_fn, proj_fn, cfg, ref, d, rows, progress)
            write_json({f"{k[0]}@{k[1]}": v for k, v in per_seed.items()}, out / f"paired_seeds_{label}.json")
            lines += toy_verdicts(per_seed, label, cfg.eval.steps, seeds) + [""]
    md = toy_markdown(rows_l, rows_a, floor_row, cfg, lines)
    (out / "results.md").write_text(md)
    toy_scatter(samp_l, ref, cfg.eval.steps, out / "samples.png", "samples, learned score")
    toy_scatter(samp_a, ref, cfg.eval.steps, out / "samples_analytic.png", "samples, analytic score")
    plot_metric({"learned score": rows_l + [floor_row], "analytic score": rows_a + [floor_row]},
                out / "w2_vs_nfe.png", "W2 to the mixture (POT)")
    print(md)
    print(f"wrote {out} in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


__all__ = ["toy_job", "train_toy", "evaluate_toy", "reference_set"]
