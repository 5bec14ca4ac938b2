"""Issue 20's pre-registered sweep (docs/pp_sweep.md): does Predict-Project pay at equal compute, with the
noise of training? ALGORITHMS §2 (samplers, NFE), §3 (the projection and its per-step fraction), §7
(digits-FD, paired comparisons).

    python train/run.py pp-sweep --runs RUN [RUN ...] --out DIR [--doc docs/pp_sweep.md --figures docs/figures]
        [--seeds 0,1] [--widths 1,0.5] [--steps 20] [--delta-p 3,10] [--proj pp,tweedie,tweedie_free]

RUN are trained digits run folders (`train/run.py --no-eval`, any `proj_net` width, any `--seed`); each
one's seed and T width are read from its own config. Every cell (sampler, steps, delta_p, projection,
training seed) is drawn once, as train/evaluation/evaluate.py draws a Table 1 cell, and its digits-
classifier features are cached under DIR/cells: the command resumes, and a subset (--seeds, --widths,
--steps, --delta-p, --proj) re-derives cells of the full table bit for bit. The wall time per step is
measured first (interleaved rounds, DIR/timing.json), because the wall-time comparator depends on it.
--jobs worker processes (one thread each) draw the cells. The results section of --doc (everything
from its "## Results" heading on) and the figure are rewritten from the cache (pp_sweep_report.py).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from wgfcore.sde import VPSDE

from ..engine.checkpoint import load_run
from ..engine.cli import pos_int
from ..engine.distributed import Dist
from ..engine.errors import UsageError
from ..evaluation.draw import draw
from . import pp_sweep_cost as Cost
from . import pp_sweep_report as R
from .pp_sweep_cost import PROJ, comparators
from .pp_sweep_report import GRID, S, cell_name

#: the step backend of every cell and timing: the torch path, which every cached cell was drawn with ("auto" now
#: picks the C++ backend on a CPU and Triton on CUDA, whose noise streams differ for the same seed)
BACKEND = "torch"
#: samplers of the cell kinds: (sampler name, draws a Tweedie T from the score)
SAMPLER = {"em": ("euler_maruyama", False), "heun": ("heun_ode", False), "pp": ("predict_project", False),
           "tweedie": ("predict_project", True), "tweedie_free": ("predict_project_tweedie", False)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="trained digits run folders")
    p.add_argument("--out", type=Path, required=True, help="cache and working folder")
    p.add_argument("--doc", type=Path, default=None, help="page whose results section is rewritten "
                   "(default: OUT/pp_sweep.md)")
    p.add_argument("--figures", type=Path, default=None, help="also write the figure into this folder")
    p.add_argument("--seeds", default=None, help="subset of training seeds, e.g. 0,1")
    p.add_argument("--widths", default=None, help="subset of T widths, e.g. 1,0.5")
    p.add_argument("--steps", default=None, help="subset of N, e.g. 20,40")
    p.add_argument("--delta-p", default=None, help="subset of the grid's delta_p values, e.g. 3,10")
    p.add_argument("--proj", default=None, help="subset of projections: pp,tweedie,tweedie_free")
    p.add_argument("--timing", type=Path, default=None, help="use this timing.json (e.g. docs/pp_sweep_timing.json) "
                   "instead of measuring: re-deriving cells of a table needs the wall-time comparators it used")
    p.add_argument("--jobs", type=pos_int, default=2, help="worker processes (one thread each)")
    p.add_argument("--no-draw", action="store_true", help="only report what the cache holds")
    p.add_argument("--small", action="store_true", help="seconds-long smoke version (the tests run it): "
                   "48 samples per cell (one batch), 2 timing rounds of 2 steps, 20 bootstrap resamples")


def _floats(s, what, allowed=None):
    if s is None:
        return None
    try:
        v = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{what} must be a comma-separated list of numbers, got {s!r}") from None
    if not v or (allowed is not None and any(x not in allowed for x in v)):
        raise UsageError(f"--{what} must be a subset of {sorted(allowed)}, got {s!r}")
    return v


def check_arguments(args) -> None:
    args.seeds = None if args.seeds is None else [int(x) for x in _floats(args.seeds, "seeds")]
    args.widths = None if args.widths is None else [f"{x:g}" for x in _floats(args.widths, "widths")]
    args.steps = None if args.steps is None else [int(x) for x in _floats(args.steps, "steps", set(GRID))]
    args.delta_p = _floats(args.delta_p, "delta-p", {d for v in GRID.values() for d in v})
    if args.proj is not None:
        args.proj = [x.strip() for x in args.proj.split(",") if x.strip()]
        if not args.proj or any(x not in PROJ for x in args.proj):
            raise UsageError(f"--proj must be a subset of {','.join(PROJ)}, got {','.join(args.proj)}")
    for r in args.runs:
        if not (r / "checkpoints").is_dir():
            raise UsageError(f"--runs {r}: not a run folder (no checkpoints/)")


class Run:
    """A trained run folder: its seed, T width (relative to the score net), score-net identity and FLOPs."""

    def __init__(self, path: Path):
        from torch.utils.flop_counter import FlopCounterMode

        self.path = Path(path)
        cfg, eps, proj, self.step = load_run(self.path)
        if cfg.dataset != "digits":
            raise UsageError(f"--runs {self.path} is a {cfg.dataset!r} run; this sweep needs digits runs")
        self.seed = int(cfg.seed)
        mc = cfg.net.get("model_channels")
        self.width = f"{cfg.proj_net.get('model_channels', mc) / mc:g}"
        h = hashlib.sha1()
        for k, v in sorted(eps.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        self.eps_sha = h.hexdigest()[:10]
        flops = []
        for net in (eps, proj):  # one call on one sample: convolutions and matrix products
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                net(torch.zeros(1, *cfg.image_shape), torch.full((1,), 0.5))
            flops.append(int(fc.get_total_flops()))
        self.flops = tuple(flops)


# --- drawing (worker processes) ----------------------------------------------------------------------------

_W = {}


def _worker_init(cache_dir: str, settings: dict):
    from ..evaluation.digits_classifier import DigitsFeatures, get_classifier

    torch.set_num_threads(1)
    S.update(settings)
    net, _ = get_classifier(cache_dir, resolution=16, epochs=12)
    _W["features"], _W["runs"] = DigitsFeatures(net), {}


def draw_cell(path: str, kind: str, steps: int, dp, n: int, out: str) -> float:
    """n samples of one cell with run `path`'s EMA networks, drawn as train/evaluation/evaluate.py draws a
    Table 1 cell (batch b's prior draws and noise from seed * 100003 + 12345 + b); saves their features."""
    if path not in _W["runs"]:
        cfg, eps, proj, _ = load_run(Path(path))
        _W["runs"][path] = (cfg, eps.eval(), proj.eval())
    cfg, eps, proj = _W["runs"][path]
    sampler, tweedie = SAMPLER[kind]
    feats, t0, B = [], time.time(), S["batch"]
    with torch.no_grad():
        for b in range(math.ceil(n / B)):
            x, _ = draw(eps, proj, VPSDE(), sampler, steps, min(B, n - b * B), cfg, Dist(),
                        seed=int(cfg.seed) * 100_003 + 12_345 + b, backend=BACKEND,
                        delta_p=dp if kind not in ("em", "heun") else None, tweedie=tweedie)
            feats.append(_W["features"](x))
    seconds = time.time() - t0
    tmp = Path(out).with_suffix(".tmp")
    torch.save({"features": torch.cat(feats), "n": n, "seconds": seconds, "run": path}, tmp)
    os.replace(tmp, out)
    return seconds


def timing_session(paths: dict, log):
    """measure(keys) for pp_sweep_report.timing_for: each key's sampler on paths[key]'s networks, S['batch']
    samples, S['timing_steps'] steps, S['timing_rounds'] interleaved rounds, one thread."""
    def measure(keys):
        nets = {k: load_run(Path(paths[k])) for k in keys}

        def run_one(key):
            cfg, eps, proj, _ = nets[key]
            sampler, tweedie = SAMPLER[key.split(":")[0]]
            with torch.no_grad():
                draw(eps.eval(), proj.eval(), VPSDE(), sampler, S["timing_steps"], S["batch"], cfg, Dist(), seed=0,
                     backend=BACKEND, delta_p=1.0 if sampler.startswith("predict") else None, tweedie=tweedie)
        return Cost.interleaved(run_one, keys, S["timing_rounds"], S["timing_steps"], S["batch"], log)
    return measure


def available(proj: str) -> bool:
    """Whether this tree has the sampler a projection needs (the no-extra-cost Tweedie T is helper
    "sample"'s predict_project_tweedie)."""
    from wgfcore.sample import SAMPLERS

    return SAMPLER[proj][0] in SAMPLERS


# --- the plan ------------------------------------------------------------------------------------------

def plan(args, runs: list, timing: dict):
    """Configurations (seed, N, dp, projection, width) and every cell they and Table 1 need, each with its
    sample count and drawing priority (docs/pp_sweep.md). A cell is keyed by (seed, score net, name): the
    cells of the score net alone (EM, Heun, the Tweedie T) are drawn once for all runs that share it."""
    configs, cells = [], {}

    def need(run, kind, steps, n, dp=None, prio=0):
        key = (run.seed, run.eps_sha, cell_name(kind, steps, dp, run.width))
        old = cells.get(key, (run.path, kind, steps, 0, dp, prio))
        cells[key] = (old[0], kind, steps, max(n, old[3]), dp, min(prio, old[5]))
        return key

    base = {}  # the run that draws a seed's Tweedie cells (no trained T needed): width 1 if there is one
    for r in sorted(runs, key=lambda r: -float(r.width)):
        base.setdefault(r.seed, r)
    for run in runs:
        for N, dps in GRID.items():
            if args.steps and N not in args.steps:
                continue
            n = S["samples"]
            for dp in dps:
                if args.delta_p and dp not in args.delta_p:
                    continue
                for proj in (args.proj or PROJ):
                    if proj != "pp" and (run is not base[run.seed] or N not in R.TWEEDIE_STEPS):
                        continue
                    K = comparators(N, proj, run.width, run.flops, timing)
                    prio = list(GRID).index(N) if proj == "pp" else len(GRID) + 1 + PROJ.index(proj)
                    comp = {m: need(run, "em", k, n, prio=prio) for m, k in K.items()}
                    comp["same_n"] = need(run, "em", N, n, prio=prio)
                    configs.append({"seed": run.seed, "width": run.width if proj == "pp" else "-", "proj": proj,
                                    "N": N, "dp": dp, "n": n, "cell": need(run, proj, N, n, dp, prio), "comp": comp,
                                    "K": K})
            if run is base[run.seed]:
                need(run, "heun", N, n, prio=len(GRID))
            if run.width == "1" and (not args.proj or "pp" in args.proj):  # Table 1 at the paper's delta_p
                dp0 = R.paper_dp(N)
                if not args.delta_p or dp0 in args.delta_p:
                    for kind, steps, dp in (("em", N, None), ("em", 2 * N, None), ("heun", N, None), ("pp", N, dp0)):
                        need(run, kind, steps, S["table1_samples"], dp, prio=len(GRID))
    return configs, cells


def run_cells(args, cells: dict, cache_dir: Path, log) -> None:
    todo = []
    for key, (path, kind, steps, n, dp, prio) in cells.items():
        if R.load_features(args.out, key, n) is None:
            cost = steps * (2 if kind in ("pp", "tweedie", "heun") else 1) * n
            todo.append((prio, key[0], -cost, key, str(path), kind, steps, dp, n))
    todo.sort(key=lambda t: t[:3])  # pre-registered order; the largest cells first within it (load balance)
    total = -sum(t[2] for t in todo)
    log(f"{len(cells)} cells, {len(todo)} to draw ({total / 1e6:.2f} M sample-steps)")
    if not todo or args.no_draw:
        return
    done = 0
    jobs = []
    for _, _, cost, key, path, kind, steps, dp, n in todo:
        f = R.cell_file(args.out, key)
        f.parent.mkdir(parents=True, exist_ok=True)
        jobs.append(((path, kind, steps, dp, n, str(f)), -cost, key))
    if args.jobs == 1:  # in this process: a worker's start (imports, the classifier) costs more than small cells
        _worker_init(str(cache_dir), dict(S))
        finished = ((job, draw_cell(*job[0])) for job in jobs)
    else:
        ex = ProcessPoolExecutor(max_workers=args.jobs, initializer=_worker_init, initargs=(str(cache_dir), dict(S)))
        futs = {ex.submit(draw_cell, *job[0]): job for job in jobs}
        finished = ((futs[fut], fut.result()) for fut in as_completed(futs))
    try:
        for (_, cost, key), sec in finished:
            done += cost
            log(f"drew s{key[0]} {key[2]} in {sec:.0f} s ({100 * done / total:.0f}% of the work)")
    finally:
        if args.jobs > 1:
            ex.shutdown(cancel_futures=True)


def run(args) -> int:
    check_arguments(args)
    if args.small:
        S.update(samples=48, table1_samples=48, fig_n=48, batch=48, n_boot=20, timing_steps=2, timing_rounds=2)
    t0 = time.time()

    def log(msg):
        print(f"{time.time() - t0:7.0f}s {msg}", flush=True)

    torch.set_num_threads(1)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot create it ({e.strerror})") from None
    runs = [r for r in (Run(p) for p in args.runs)
            if (not args.seeds or r.seed in args.seeds) and (not args.widths or r.width in args.widths)]
    if not runs:
        raise UsageError("no run matches --seeds/--widths")
    if len({(r.seed, r.width) for r in runs}) < len(runs):
        raise UsageError("two --runs share a seed and a T width")
    for r in runs:
        log(f"run {r.path}: seed {r.seed}, T width {r.width}, step {r.step}, score net {r.eps_sha}, "
            f"FLOPs score {r.flops[0]:,} T {r.flops[1]:,}")
    projs = [p for p in (args.proj or PROJ) if available(p)]
    if len(projs) < len(args.proj or PROJ):
        log(f"not in this tree, left out: {', '.join(p for p in (args.proj or PROJ) if p not in projs)}")
    args.proj = projs
    by_w = {}
    for r in sorted(runs, key=lambda r: r.seed):
        by_w.setdefault(r.width, str(r.path))
    first = by_w.get("1", next(iter(by_w.values())))
    paths = {"em": first, "heun": first, **{p: first for p in projs if p != "pp"}}
    paths.update({f"pp:{w}": p for w, p in sorted(by_w.items(), key=lambda kv: -float(kv[0])) if "pp" in projs})
    if args.timing is not None and not (args.out / "timing.json").is_file():
        try:
            (args.out / "timing.json").write_text(args.timing.read_text())
        except OSError as e:
            raise UsageError(f"--timing {args.timing}: {e.strerror}") from None
    timing = Cost.timing_for(args.out / "timing.json", list(paths), timing_session(paths, log))
    configs, cells = plan(args, runs, timing)
    run_cells(args, cells, args.out / ".cache", log)
    R.write_report(args, configs, cells, runs, timing, log)
    return 0


__all__ = ["add_arguments", "run", "plan", "comparators", "Run"]
