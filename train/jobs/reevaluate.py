"""`train/run.py eval`: re-evaluate a trained image run, its own table again or pytorch-fid FID
(ALGORITHMS §7), with the EMA networks of its newest checkpoint.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..engine import config as C
from ..engine.checkpoint import load_run
from ..engine.errors import UsageError
from ..engine.networks import all_finite, check_compile, compiled, kernels_for, use_fused
from ..engine.rundir import claim_existing, make_folder, update_record
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
    for flag, given in (("--inception-weights", args.inception_weights), ("--ref-stats", args.ref_stats),
                        ("--ref-samples", args.ref_samples)):
        if given is not None and not args.fid:
            raise UsageError(f"{flag} is only used with --fid (pytorch-fid FID); add --fid or drop it")
    if args.ref_stats and args.ref_samples:
        raise UsageError("--ref-stats gives the reference statistics and --ref-samples computes them: choose one")
    inception = build_inception(args.inception_weights, device=d.device) if args.fid else None  # fails first
    cfg, eps_net, proj_net, step = load_run(run)
    if not bool(all_finite([eps_net, proj_net])):
        raise UsageError(f"--run {run}: the EMA weights of its checkpoint (step {step}) are not finite; "
                         "evaluate an earlier snapshot (checkpoints/ckpt_*.pt) or train again")
    if cfg.toy:
        raise UsageError(f"--run {run} is a gmm (toy) run; its evaluation is part of `--dataset gmm`")
    set_threads(args, cfg, d)
    changes, eval_changes = {}, {}
    if args.quick:  # the --quick config's small table: a pipeline check, reported without verdicts
        eval_changes.update(C.build(cfg.dataset, True, None, {}, None).data["eval"])
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
    kernels = kernels_for(args.fused, d.device, args.triton_interpreter)
    cache_dir = Path(args.cache_dir) if args.cache_dir else run.parent / ".cache"
    make_folder(cache_dir, "cache folder", "--cache-dir")
    lock = claim_existing(run) if d.main else None
    t0 = time.time()
    try:
        if kernels.nets:
            if d.device.type != "cuda" and d.main:
                print("warning: --triton-interpreter runs the Triton kernels in the interpreter (slow)",
                      file=sys.stderr)
            use_fused([eps_net, proj_net])
        eps_net, proj_net = compiled(eps_net, backend_compile), compiled(proj_net, backend_compile)
        feats, ref, extra, info = features_and_reference(cfg, d, cache_dir, progress, inception, args.ref_stats)
        prefix = "fid_" if args.fid else ""
        evaluate(cfg, eps_net, proj_net, feats, ref, run, d, backend=kernels.steps,
                 progress=progress, prefix=prefix, extra_rows=extra, verdicts=not (cfg.quick or args.quick))
        if d.main:  # what export reads; the training time recorded before stays
            update_record(run / "timing.json", **{f"{prefix}eval_seconds": round(time.time() - t0, 1)},
                          device=str(d.device), world_size=d.world, threads=torch.get_num_threads(), **info)
    finally:
        if lock is not None:
            lock.release()
    if d.main:
        print(f"checkpoint step {step}")
        print((run / f"{prefix}results.md").read_text())
    return 0


__all__ = ["eval_job"]
