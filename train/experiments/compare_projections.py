"""Is T trained alone on a frozen score as good as T trained jointly with it? A paired comparison.

ALGORITHMS §2-3 and §7. Each --pair JOINT:SEPARATE names a jointly trained run and a projection-only run
(`train/run.py --score-from JOINT`) whose T was trained alone on JOINT's EMA score. For every column N,
Predict-Project is drawn with the same score (JOINT's EMA network) and each of the two T's, and EM at N
for reference, all from the same prior draws and noise (the evaluation's per-batch seeds), and scored by
the run's metric (digits-FD). Per pair: the paired bootstrap interval of FD(PP, separate T) - FD(PP, joint
T) (the noise of sampling); over several pairs (training seeds): the mean of the per-pair differences with
its t-interval, which also holds the noise of training both networks.

    python train/run.py compare-projections --pair runs/digits-s0:runs/digits-T-s0 --doc docs/score_from_compare.md
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch

from wgfcore.sde import VPSDE

from ..engine.checkpoint import load_run
from ..engine.cli import at_least, ints, pos_int
from ..engine.distributed import Dist
from ..engine.errors import UsageError
from ..evaluation.draw import draw
from ..evaluation.fid import Stats, frechet_distance
from ..evaluation.references import features_and_reference
from ..evaluation.report import paired_difference, said, seed_interval, verdict
from ..evaluation.table import delta_p_for

CELLS = (("em", "euler_maruyama", "joint"), ("pp_joint", "predict_project", "joint"),
         ("pp_separate", "predict_project", "separate"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    p.add_argument("--pair", action="append", required=True, metavar="JOINT:SEPARATE",
                   help="a joint run and the --score-from run trained on its score (repeat for more seeds)")
    p.add_argument("--steps", type=ints, default=[100, 40, 20], help="columns N")
    p.add_argument("--samples", type=at_least(2), default=400, help="samples per cell")
    p.add_argument("--batch", type=pos_int, default=200)
    p.add_argument("--bootstrap", type=pos_int, default=200, help="paired bootstrap resamples")
    p.add_argument("--cache-dir", type=Path, default=None, help="digits classifier cache (default: <joint>/../.cache)")
    p.add_argument("--out", type=Path, default=None, help="also write the per-cell values as CSV here")
    p.add_argument("--doc", type=Path, default=None, help="write the markdown report here")
    p.add_argument("--threads", type=pos_int, default=1)
    p.add_argument("--no-progress", action="store_true")


def _pair(spec: str):
    joint, sep = spec.split(":", 1) if ":" in spec else (spec, "")
    if not joint or not sep:
        raise UsageError(f"--pair {spec!r}: expected JOINT:SEPARATE (two run folders)")
    cj, eps, t_joint, _ = load_run(joint)
    cs, _, t_sep, _ = load_run(sep)  # its frozen score, checked against its record
    src = cs.score_from or {}
    if cj.projection_only or src.get("kind") != "wgfcore" or Path(src["path"]) != Path(joint).resolve():
        raise UsageError(f"--pair {spec}: {sep} must be a --score-from run on {joint}'s score, and {joint} a joint run")
    return cj, eps, {"joint": t_joint, "separate": t_sep}


@torch.no_grad()
def _features(cfg, eps, proj, sampler, N, n, bs, feats, d, progress):
    out, sde = [], VPSDE()
    for b in range(math.ceil(n / bs)):  # the evaluation's seeds: sample i starts from the same draw in every cell
        x, _ = draw(eps, proj, sde, sampler, N, min(bs, n - b * bs), cfg, d, seed=int(cfg.seed) * 100_003 + 12_345 + b,
                    backend="auto", delta_p=delta_p_for(cfg.eval, N) if sampler == "predict_project" else None,
                    progress=progress and N >= 200)
        out.append(feats(x))
    return torch.cat(out)


def run(args) -> int:
    torch.set_num_threads(args.threads)
    d, rows, diffs = Dist(), [], {}
    pairs = [_pair(s) for s in args.pair]  # every run checked before any sampling
    for (cfg, eps, ts), spec in zip(pairs, args.pair):
        cache = args.cache_dir or Path(spec.split(":", 1)[0]).resolve().parent / ".cache"
        feats, ref, _, _ = features_and_reference(cfg, d, cache, not args.no_progress)
        for N in args.steps:
            t0, f = time.time(), {}
            for key, sampler, which in CELLS:
                f[key] = _features(cfg, eps, ts[which], sampler, N, args.samples, args.batch, feats, d,
                                   not args.no_progress)
            value = {k: frechet_distance(*Stats(feats.dims).add(v).mu_sigma(), *ref) for k, v in f.items()}
            for a, b in (("pp_separate", "pp_joint"), ("pp_separate", "em"), ("pp_joint", "em")):
                diff, se = paired_difference(f[a], f[b], ref, args.bootstrap, int(cfg.seed))
                lo, hi = diff - 1.96 * se, diff + 1.96 * se
                rows.append({"pair": spec, "seed": cfg.seed, "N": N, "a": a, "b": b, "value_a": value[a],
                             "value_b": value[b], "diff": diff, "se": se, "lo": lo, "hi": hi,
                             "verdict": verdict(diff, lo, hi, (value[a] + value[b]) / 2), "n": args.samples})
                diffs.setdefault((N, a, b), []).append((diff, (value[a] + value[b]) / 2))
            print(f"{spec} N={N}: " + ", ".join(f"{k} {v:.2f}" for k, v in value.items())
                  + f" ({time.time() - t0:.0f} s)", file=sys.stderr)
    text = report(rows, diffs, args)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "compare_projections.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if args.doc:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(text)
    print(text)
    return 0


LABEL = {"pp_separate": "PP, T trained alone", "pp_joint": "PP, T trained jointly", "em": "EM"}


def report(rows, diffs, args) -> str:
    lines = [f"Command: `python train/run.py {' '.join(getattr(args, 'argv', []))}`\n",
             f"digits-FD (lower is better), {args.samples} samples per cell, paired: every cell of a column starts "
             f"from the same prior draws and noise, with the joint run's EMA score. ± is the paired bootstrap sd "
             f"({args.bootstrap} resamples); the interval is ± 1.96 sd (sampling noise of these trained networks).\n",
             "| pair (seed) | N | a | b | FD(a) | FD(b) | a - b | 95% interval | verdict |",
             "|---|---:|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['pair'].split(':')[1]).name} ({r['seed']}) | {r['N']} | {LABEL[r['a']]} | "
                     f"{LABEL[r['b']]} | {r['value_a']:.2f} | {r['value_b']:.2f} | {r['diff']:+.2f} ± {r['se']:.2f} | "
                     f"[{r['lo']:+.2f}, {r['hi']:+.2f}] | {said(LABEL[r['a']], r['verdict'])} |")
    seeds = len(args.pair)
    if seeds >= 2:
        lines += ["", f"Over the {seeds} pairs (training seeds): the mean paired difference and its 95% t-interval, "
                      "which holds the noise of training as well as of sampling.", ""]
        for (N, a, b), v in diffs.items():
            m, lo, hi = seed_interval([x for x, _ in v])
            scale = sum(s for _, s in v) / len(v)
            lines.append(f"- N={N}: {LABEL[a]} minus {LABEL[b]} = {m:+.2f} [{lo:+.2f}, {hi:+.2f}]: "
                         f"{said(LABEL[a], verdict(m, lo, hi, scale))}.")
    else:
        lines += ["", "One pair: training-seed variance is not measured."]
    return "\n".join(lines) + "\n"


__all__ = ["add_arguments", "run", "report"]
