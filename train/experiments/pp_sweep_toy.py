"""Issue 20's pre-registered sweep on the 2-D toy (docs/pp_sweep.md, "The toy"): the digits sweep's grid,
costs and decision rule on Kwon et al.'s mixture, with the learned score and with the analytic one.
ALGORITHMS §2-3, §6-7.

    python train/run.py pp-sweep-toy --out DIR [--doc docs/pp_sweep_toy.md --figures docs/figures]
        [--seeds 0,1,2] [--widths 128,64,32] [--steps 20] [--delta-p 3,10] [--proj pp,tweedie,tweedie_free]

For every training seed and T width (`proj_net` {"hidden": w}) it trains, with train/jobs/toy.py's trainer
and the gmm config, the eps-MLP and T jointly (the learned column) and T alone against the exact mixture
score (the analytic column), into DIR/runs (reused when present). Every cell is then sampled as the gmm
job samples (seed = training seed + 1, so the cells of one seed are paired) and its exact W2 (POT) to a
stratified reference of the same size is cached in DIR/cells; the report is pp_sweep_report's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from wgfcore.metrics import w2_empirical
from wgfcore.sample import eps_to_score, sample, tweedie_proj_fn
from wgfcore.scores import kwon_mixture
from wgfcore.sde import VPSDE

from ..engine import config as C
from ..engine.checkpoint import load_run
from ..engine.cli import pos_int
from ..engine.distributed import Dist
from ..engine.errors import UsageError
from ..engine.networks import build_nets
from ..jobs.toy import reference_set, train_toy
from . import pp_sweep_cost as Cost
from . import pp_sweep_doc as D
from . import pp_sweep_report as R
from .pp_sweep import BACKEND, SAMPLER, _floats, available
from .pp_sweep_cost import PROJ, comparators
from .pp_sweep_report import GRID, cell_name

TOY = {"samples": 2000, "widths": (128, 64, 32), "seeds": (0, 1, 2), "timing_steps": 10, "timing_rounds": 7,
       "quick": False}
SCORES = ("learned", "analytic")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", type=Path, required=True, help="runs, cache and working folder")
    p.add_argument("--doc", type=Path, default=None, help="the results page (default: OUT/pp_sweep_toy.md)")
    p.add_argument("--figures", type=Path, default=None, help="also write the figure into this folder")
    p.add_argument("--seeds", default="0,1,2", help="training seeds")
    p.add_argument("--widths", default="128,64,32", help="T widths (hidden units; the score MLP has 128)")
    p.add_argument("--steps", default=None, help="subset of N, e.g. 20,40")
    p.add_argument("--delta-p", default=None, help="subset of the grid's delta_p values, e.g. 3,10")
    p.add_argument("--proj", default=None, help="subset of projections: pp,tweedie,tweedie_free")
    p.add_argument("--timing", type=Path, default=None, help="use this timing.json (e.g. docs/pp_sweep_toy_timing.json) "
                   "instead of measuring: re-deriving cells of a table needs the wall-time comparators it used")
    p.add_argument("--jobs", type=pos_int, default=2, help="worker processes (one thread each)")
    p.add_argument("--small", action="store_true", help="seconds-long smoke version (the tests run it): the "
                   "--quick gmm config, 200 samples per cell, 2 timing rounds of 2 steps")


def toy_config(seed: int, width: int) -> C.Config:
    return C.build("gmm", TOY["quick"], None, {"proj_net": {"hidden": width}}, seed)


def train_pair(out: str, seed: int, width: int, settings: dict) -> str:
    """The joint run and the T-against-the-analytic-score run of one (seed, width), each trained into a
    temporary folder and renamed when done, so a folder that exists is complete."""
    torch.set_num_threads(1)
    TOY.update(settings)
    cfg, data, sde = toy_config(seed, width), kwon_mixture(), VPSDE()
    for sub, fixed in (("joint", None), ("analytic", data.score_fn(sde))):
        final = Path(out) / "runs" / f"s{seed}-h{width}" / sub
        if final.is_dir():
            continue
        tmp = final.with_name(f"{sub}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(cfg.data, indent=1))
        train_toy(cfg, tmp, Dist(), data, sde, fixed_score=fixed, progress=False)
        os.replace(tmp, final)
    return f"s{seed}-h{width}"


_NETS = {}


def _functions(out: str, seed: int, width: int, score: str, kind: str, steps: int):
    """(score_fn, proj_fn) of a cell: the learned eps-MLP of (seed, width) or the exact score; T learned
    jointly, learned against the exact score, or the Tweedie T."""
    key = (seed, width)
    if key not in _NETS:
        run = Path(out) / "runs" / f"s{seed}-h{width}"
        _, eps, proj, _ = load_run(run / "joint")
        _, _, proj_a, _ = load_run(run / "analytic")
        _NETS[key] = (eps.eval(), proj.eval(), proj_a.eval())
    eps, proj, proj_a = _NETS[key]
    sde = VPSDE()
    score_fn = eps_to_score(eps, sde) if score == "learned" else kwon_mixture().score_fn(sde)
    if kind == "pp":
        return score_fn, proj if score == "learned" else proj_a
    return score_fn, tweedie_proj_fn(score_fn, steps) if kind == "tweedie" else None


def draw_toy(out: str, seed: int, width: int, score: str, kind: str, steps: int, dp, n: int):
    score_fn, proj_fn = _functions(out, seed, width, score, kind, steps)
    sampler, _ = SAMPLER[kind]
    with torch.no_grad():
        return sample(score_fn, (n, 2), steps, sampler=sampler, proj_fn=proj_fn, seed=seed + 1,
                      delta_p=dp if kind not in ("em", "heun") else None, backend=BACKEND)


def cell_w2(out: str, key, seed: int, width: int, score: str, kind: str, steps: int, dp, n: int, settings: dict):
    torch.set_num_threads(1)
    TOY.update(settings)
    t0 = time.time()
    x = draw_toy(out, seed, width, score, kind, steps, dp, n)
    ref = torch.load(Path(out) / "refs" / f"s{seed}.pt", weights_only=True)["ref"]
    w2 = w2_empirical(x.cpu(), ref) if bool(torch.isfinite(x).all()) else math.inf
    f = Path(out) / "cells" / f"s{seed}-{key[1]}" / f"{key[2]}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"w2": w2, "n": n, "seconds": time.time() - t0}))
    return w2


def flops(width: int) -> tuple[int, int]:
    """FLOPs of one call on one point of the eps-MLP and of T (convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = []
    for net in build_nets(toy_config(0, width)):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            net(torch.zeros(1, 2), torch.full((1,), 0.5))
        out.append(int(fc.get_total_flops()))
    return tuple(out)


def rel(width: int) -> str:
    return f"{width / 128:g}"


def timing_session(out: Path, seed: int, base: int, n: int, log):
    """measure(keys) for pp_sweep_report.timing_for: each sampler on n points (see pp_sweep.timing_session),
    with the networks of (seed, base width) except a learned T of another width ("pp:<relative width>")."""
    def measure(keys):
        def run_one(key):
            kind, _, w = key.partition(":")
            width = int(round(float(w) * 128)) if w else base
            draw_toy(str(out), seed, width, "learned", kind, TOY["timing_steps"], 1.0, n)
        return Cost.interleaved(run_one, keys, TOY["timing_rounds"], TOY["timing_steps"], n, log)
    return measure


def plan_toy(args, timing, F):
    """{score: configurations} and every cell, as pp_sweep.plan does for digits. A cell is keyed by (seed,
    score net, name): the learned score of width w's joint run ("h<w>"), or the exact one ("analytic")."""
    configs, cells = {s: [] for s in SCORES}, {}

    def need(seed, width, score, kind, steps, dp=None):
        net = f"h{width}" if score == "learned" else "analytic"
        key = (seed, net, cell_name(kind, steps, dp, rel(width)))
        cells.setdefault(key, (seed, width, score, kind, steps, dp))
        return key

    base = args.widths[0]  # the Tweedie T needs no trained T: drawn once per seed and score
    for score in SCORES:
        for seed in args.seeds:
            for width in args.widths:
                for N, dps in GRID.items():
                    if args.steps and N not in args.steps:
                        continue
                    need(seed, base, score, "heun", N)
                    for dp in (d for d in dps if not args.delta_p or d in args.delta_p):
                        for proj in (p for p in (args.proj or PROJ)
                                     if p == "pp" or width == base and N in R.TWEEDIE_STEPS):
                            K = comparators(N, proj, rel(width), (F[width][0], F[width][1]), timing)
                            w_em = width if score == "learned" else base
                            comp = {m: need(seed, w_em, score, "em", k) for m, k in K.items()}
                            comp["same_n"] = need(seed, w_em, score, "em", N)
                            configs[score].append({
                                "seed": seed, "width": rel(width) if proj == "pp" else "-", "proj": proj, "N": N,
                                "dp": dp, "n": TOY["samples"], "K": K, "comp": comp,
                                "cell": need(seed, width, score, proj, N, dp)})
    return configs, cells


def run(args) -> int:
    if args.small:
        TOY.update(samples=200, timing_steps=2, timing_rounds=2, quick=True)
    args.seeds = [int(x) for x in _floats(args.seeds, "seeds")]
    args.widths = [int(x) for x in _floats(args.widths, "widths")]
    if any(w < 1 for w in args.widths) or any(s < 0 for s in args.seeds):
        raise UsageError("--widths must be positive integers and --seeds non-negative")
    args.steps = None if args.steps is None else [int(x) for x in _floats(args.steps, "steps", set(GRID))]
    args.delta_p = _floats(args.delta_p, "delta-p", {d for v in GRID.values() for d in v})
    args.proj = None if args.proj is None else [x.strip() for x in args.proj.split(",") if x.strip()]
    if args.proj is not None and (not args.proj or set(args.proj) - set(PROJ)):
        raise UsageError(f"--proj must be a subset of {','.join(PROJ)}")
    t0, out, n = time.time(), args.out, TOY["samples"]

    def log(msg):
        print(f"{time.time() - t0:7.0f}s {msg}", flush=True)

    torch.set_num_threads(1)
    (out / "refs").mkdir(parents=True, exist_ok=True)
    data, floors = kwon_mixture(), {}
    for seed in args.seeds:  # the stratified reference of each seed, and the estimator's floor
        f = out / "refs" / f"s{seed}.pt"
        if not f.is_file():
            ref, fm, fs = reference_set(data, n, seed)
            torch.save({"ref": ref, "floor": (fm, fs)}, f)
        floors[seed] = torch.load(f, weights_only=True)["floor"]
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:
        futs = [ex.submit(train_pair, str(out), s, w, dict(TOY)) for s in args.seeds for w in args.widths]
        for fut in as_completed(futs):
            log(f"trained {fut.result()}")
    F = {w: flops(w) for w in args.widths}
    args.proj = [p for p in (args.proj or PROJ) if available(p)]
    keys = ["em", "heun"] + [p for p in args.proj if p != "pp"] + \
        ([f"pp:{rel(w)}" for w in args.widths] if "pp" in args.proj else [])
    if args.timing is not None and not (out / "timing.json").is_file():
        try:
            (out / "timing.json").write_text(args.timing.read_text())
        except OSError as e:
            raise UsageError(f"--timing {args.timing}: {e.strerror}") from None
    timing = Cost.timing_for(out / "timing.json", keys, timing_session(out, args.seeds[0], args.widths[0], n, log))
    configs, cells = plan_toy(args, timing, F)
    todo = [(k, v) for k, v in cells.items() if not (out / "cells" / f"s{k[0]}-{k[1]}" / f"{k[2]}.json").is_file()]
    log(f"{len(cells)} cells, {len(todo)} to draw")
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:
        futs = {ex.submit(cell_w2, str(out), k, *v, n, dict(TOY)): k for k, v in todo}
        for i, fut in enumerate(as_completed(futs)):
            log(f"{i + 1}/{len(todo)} s{futs[fut][0]} {futs[fut][1]} {futs[fut][2]}: W2 {fut.result():.4f}")
    write_toy_report(args, configs, cells, floors, F, timing, log)
    return 0


def write_toy_report(args, configs, cells, floors, F, timing, log) -> None:
    out, n = args.out, TOY["samples"]
    doc = args.doc or out / "pp_sweep_toy.md"

    def value(key, _n=None):
        f = out / "cells" / f"s{key[0]}-{key[1]}" / f"{key[2]}.json"
        return json.loads(f.read_text())["w2"] if f.is_file() else None

    fl = np.array([v[0] for v in floors.values()])
    L = [D.DOC_MARK, "", f"Generated by `python train/run.py {' '.join(args.argv)}`. The 2-D toy (Kwon et al.'s "
         f"mixture), exact W2 (POT) of {n} samples to a stratified reference of {n} true points; training seeds "
         f"{args.seeds}; T widths {args.widths} hidden units (the eps-MLP: 128); T trained jointly with the learned "
         "score, and alone against the exact score (the analytic column). The W2 estimator's floor (fresh true "
         f"samples against the reference): {fl.mean():.4f} (mean over the seeds' references).", ""]
    Fs = F[args.widths[0]][0]

    def flops_of(kind, w):
        return {"em": Fs, "heun": 2 * Fs, "tweedie": 2 * Fs, "tweedie_free": Fs}.get(kind) or \
            Fs + flops(int(round(float(w) * 128)))[1]  # also a width timed earlier but not in --widths

    L += Cost.timing_lines(timing, flops_of)
    cost = Cost.cost_function({rel(w): F[w] for w in args.widths}, timing)
    for score in SCORES:
        rows = R.config_rows(configs[score], value, n)
        heun = {}
        for key, (seed, w, sc, kind, steps, dp) in cells.items():
            if kind == "heun" and sc == score and value(key) is not None:
                heun.setdefault(steps, []).append(value(key))
        name = f"{doc.stem}_{score}.png"  # pp_sweep_toy_learned.png for the default page
        for d in [out] + ([args.figures] if args.figures else []):
            D.plot(rows, R.em_curve(configs[score], value, n), {k: float(np.mean(v)) for k, v in heun.items()}, cost,
                   Path(d) / name, "W2 (mean over seeds)", title=f"Toy, {score} score: ")
        L += ["", f"### {score.capitalize()} score", ""] + D.sweep_lines(rows, "W2", n, ".4f")
        L += ["", f"![{score}](figures/{name})"]
    cells_doc = doc.with_name(doc.stem + "_cells.md")
    per_cell = {(k[0], f"{k[1]}/{k[2]}", n): value(k) for k in cells if value(k) is not None}
    L += ["", f"Every cell's W2 by training seed (score net / cell): [{cells_doc.name}]({cells_doc.name})."]
    D.rewrite_doc(doc, "\n".join(L), "# Predict-Project sweep on the 2-D toy (issue 20; pre-registered in pp_sweep.md)")
    cells_doc.write_text(f"# The cells of the toy sweep in [{doc.name}]({doc.name}), by training seed\n\nGenerated "
                         f"with it (`python train/run.py {' '.join(args.argv)}`): exact W2 of each cell's {n} samples "
                         "(h<w>: the learned score of the joint run with T width w; analytic: the exact score).\n\n"
                         + "\n".join(D.cells_lines(per_cell, ".4f")) + "\n")
    log(f"wrote {doc}")


__all__ = ["add_arguments", "run"]
