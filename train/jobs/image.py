"""The image job behind `train/run.py`: train a run on an image dataset, then evaluate it.

ALGORITHMS §1-3 and §7. Everything a user can get wrong (flags, config, data, run folder, resume)
is checked before the first training step; the run folder is locked for the whole job.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from ..data.datasets import DIGITS_INFO, check_data, make_dataset
from ..data.order import check_batch
from ..engine import checkpoint as ckpt
from ..engine import config as C
from ..engine import distributed as D
from ..engine.errors import InceptionWeightsMissing, UsageError
from ..engine.networks import check_compile, compiled, use_fused
from ..engine.rundir import claim_existing, claim_new, write_json
from ..evaluation.evaluate import evaluate
from ..evaluation.fid import build_inception, find_weights
from ..evaluation.references import features_and_reference
from ..evaluation.table import cells
from .common import asked, overrides, resolve_resume, set_threads
from .image_training import train


def _prepare(args, d, runs_dir: Path):
    """On rank 0: the config, run folder (locked) and checkpoint of this job, after every check."""
    resume, run_dir = resolve_resume(args, runs_dir)
    dataset = args.dataset or "digits"
    changed = {}
    if resume is not None:
        state = ckpt.load_training_state(resume)
        cfg, changed = C.resume(state["config"], asked(args), int(state["step"]), f"--resume {resume}")
        for k, (old, new) in changed.items():
            print(f"note: resuming {resume} at step {state['step']} with {k} {old} -> {new}", file=sys.stderr)
    else:
        cfg = C.build(dataset, args.quick, args.config, overrides(args), args.seed)
        if run_dir is None:
            name = f"{cfg.dataset}{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir = Path(args.out) if args.out else runs_dir / name
    check_compile(cfg.compile)
    if not args.no_eval and not cells(cfg.eval):
        raise UsageError("nothing to evaluate: every cell is skipped by the config; name cells with --eval-steps/"
                         "--eval-rows, or pass --no-eval")
    data = make_dataset(cfg.dataset, cfg.data_root, cfg.resolution)  # fails early, exit 2
    check_batch(len(data), cfg)
    if cfg.eval.metric == "fid" and not args.no_eval:
        try:
            find_weights(args.inception_weights)  # before hours of training, not after
        except InceptionWeightsMissing as e:
            raise InceptionWeightsMissing(f"{e}\n  (or pass --no-eval to train now and run `train/run.py eval --fid` "
                                          "later)") from None
    if args.check_data:
        n = check_data(data, cfg.num_workers, progress=not args.no_progress)
        print(f"--check-data: all {n} images of {cfg.dataset} decode", file=sys.stderr)
    lock = claim_existing(run_dir) if resume is not None else claim_new(run_dir, args.overwrite)
    write_json(cfg.data, run_dir / "config.json")
    info = {"argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(d.device),
            "world_size": d.world, "torch": torch.__version__, "resumed_from": str(resume) if resume else None,
            "changed_on_resume": changed or None, "fused": args.fused, "compile": cfg.compile,
            "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if cfg.dataset == "digits":
        info["dataset"] = DIGITS_INFO
    write_json(info, run_dir / ("run_info.json" if resume is None else f"run_info_resume_{int(time.time())}.json"))
    print(f"run folder: {run_dir}", file=sys.stderr)
    return cfg, run_dir, resume, lock, data


def train_job(args, d) -> int:
    runs_dir = Path(args.runs_dir)
    found, lock, data = None, None, None
    if d.main:
        try:
            cfg, run_dir, resume, lock, data = _prepare(args, d, runs_dir)
            found = ("ok", (cfg.data, str(run_dir), None if resume is None else str(resume)))
        except Exception as e:  # every rank fails together, none waits forever
            found = ("error", e)
            if not d.enabled:
                raise
    status, payload = D.broadcast_object(d, found)
    if status == "error":
        raise payload if isinstance(payload, UsageError) else UsageError(str(payload))
    cfg, run_dir, resume = payload
    cfg, run_dir, resume = C.Config.from_dict(cfg), Path(run_dir), None if resume is None else Path(resume)
    try:
        return _train_and_evaluate(args, d, cfg, run_dir, resume, runs_dir, data)
    finally:
        if lock is not None:
            lock.release()


def _train_and_evaluate(args, d, cfg: C.Config, run_dir, resume, runs_dir, dataset=None) -> int:
    set_threads(args, cfg, d)
    cache_dir = Path(args.cache_dir) if args.cache_dir else runs_dir / ".cache"
    progress = not args.no_progress
    if args.fused and d.device.type != "cuda" and d.main:
        print("warning: --fused on CPU runs the Triton kernels in the interpreter (slow; a correctness "
              "check, not a speed-up)", file=sys.stderr)
    if dataset is None:  # ranks > 0 (rank 0 built it while checking the input)
        dataset = make_dataset(cfg.dataset, cfg.data_root, cfg.resolution)
    D.barrier(d)

    t0 = time.time()
    eps_ema, proj_ema, _ = train(cfg, run_dir, d, resume=resume, fused=args.fused, dataset=dataset,
                                 progress=progress)
    t_train = time.time() - t0
    if args.fused:
        use_fused([eps_ema, proj_ema])
    if args.no_eval:
        if d.main:
            print(f"trained in {t_train:.0f} s; evaluation skipped (--no-eval)", file=sys.stderr)
        return 0
    eps_ema, proj_ema = compiled(eps_ema, cfg.compile), compiled(proj_ema, cfg.compile)

    t1 = time.time()
    inception = build_inception(args.inception_weights, device=d.device) if cfg.eval.metric == "fid" else None
    feats, ref, extra, metric_info = features_and_reference(cfg, d, cache_dir, progress, inception)
    evaluate(cfg, eps_ema, proj_ema, feats, ref, run_dir, d, backend="triton" if args.fused else "auto",
             progress=progress, extra_rows=extra, verdicts=not cfg.quick)
    t_eval = time.time() - t1
    if d.main:
        timing = {"train_seconds": round(t_train, 1), "eval_seconds": round(t_eval, 1), "device": str(d.device),
                  "world_size": d.world, "threads": torch.get_num_threads(), **metric_info}
        write_json(timing, run_dir / "timing.json")
        print((run_dir / "results.md").read_text())
        print(f"train {t_train:.0f} s, evaluation {t_eval:.0f} s; results in {run_dir}", file=sys.stderr)
    return 0


__all__ = ["train_job"]
