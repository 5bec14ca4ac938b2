"""`train/run.py eval`: re-evaluate a trained image run, its own table again or pytorch-fid FID
(ALGORITHMS §7), with the EMA networks of its newest checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..engine.checkpoint import load_run
from ..engine.errors import UsageError
from ..engine.networks import check_compile, compiled, use_fused
from ..engine.rundir import claim_existing
from ..evaluation.evaluate import evaluate
from ..evaluation.fid import build_inception
from ..evaluation.references import features_and_reference
from ..evaluation.table import cells
from .common import set_threads


def eval_job(args, d) -> int:
    run = Path(args.run)
    if not (run / "checkpoints").is_dir():
        raise UsageError(f"--run {run}: expected a run folder with a checkpoints/ subfolder")
    progress = not args.no_progress
    inception = build_inception(args.inception_weights, device=d.device) if args.fid else None  # fails first
    cfg, eps_net, proj_net, step = load_run(run)
    if cfg.toy:
        raise UsageError(f"--run {run} is a gmm (toy) run; its evaluation is part of `--dataset gmm`")
    set_threads(args, cfg, d)
    changes, eval_changes = {}, {}
    if args.data_root:
        changes["data_root"] = str(Path(args.data_root).expanduser().resolve())
    if args.fid:
        # no bootstrap: each resample would need a 2048 x 2048 matrix square root
        eval_changes.update(rows=["em", "pp"], samples=50_000, batch=cfg.eval.batch or 500, bootstrap=0)
        if args.ref_samples:
            eval_changes["ref_samples"] = args.ref_samples
    for key, v in [("samples", args.samples), ("batch", args.batch), ("steps", args.steps), ("rows", args.rows)]:
        if v is not None:
            eval_changes[key] = v
    if args.steps is not None or args.rows is not None:
        eval_changes["skip"] = []  # cells asked for by name are run, whatever the config skips for its budget
    cfg = cfg.with_changes("eval", **changes, eval=eval_changes)
    if not cells(cfg.eval):
        raise UsageError("nothing to evaluate: every requested cell is skipped by the run's config; "
                         "name them with --steps/--rows")
    if not args.fid and cfg.eval.metric != "digits-fd":
        raise UsageError(f"this run's metric is {cfg.eval.metric!r}; evaluate it with --fid")
    backend_compile = args.compile if args.compile is not None else cfg.compile
    check_compile(backend_compile)
    lock = claim_existing(run) if d.main else None
    try:
        if args.fused:
            if d.device.type != "cuda" and d.main:
                print("warning: --fused on CPU runs the Triton kernels in the interpreter (slow)", file=sys.stderr)
            use_fused([eps_net, proj_net])
        eps_net, proj_net = compiled(eps_net, backend_compile), compiled(proj_net, backend_compile)
        cache_dir = Path(args.cache_dir) if args.cache_dir else run.parent / ".cache"
        feats, ref, extra, _ = features_and_reference(cfg, d, cache_dir, progress, inception, args.ref_stats)
        prefix = "fid_" if args.fid else ""
        evaluate(cfg, eps_net, proj_net, feats, ref, run, d, backend="triton" if args.fused else "auto",
                 progress=progress, prefix=prefix, extra_rows=extra, verdicts=not cfg.quick)
    finally:
        if lock is not None:
            lock.release()
    if d.main:
        print(f"checkpoint step {step}")
        print((run / f"{prefix}results.md").read_text())
    return 0


__all__ = ["eval_job"]
