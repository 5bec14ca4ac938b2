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

from wgfcore.backends import resolve_backend

from ..data.datasets import DIGITS_INFO, check_data, make_dataset
from ..data.order import check_batch
from ..engine import checkpoint as ckpt
from ..engine import config as C
from ..engine import distributed as D
from ..engine.errors import InceptionWeightsMissing, UsageError
from ..engine.networks import check_compile, compiled, kernels_for, use_fused
from ..engine.networks import build_nets
from ..engine.rundir import (claim_existing, claim_new, make_folder, read_record, undo_new_run, update_record,
                             write_json)
from ..evaluation.evaluate import evaluate
from ..evaluation.fid import build_inception
from ..evaluation.references import features_and_reference
from ..evaluation.table import cells
from .common import asked, overrides, resolve_resume, set_threads
from .image_training import train
from .projection import projection_setup, train_projection


def cache_dir(args, runs_dir: Path) -> Path:
    return Path(args.cache_dir) if args.cache_dir else runs_dir / ".cache"


def _prepare(args, d, runs_dir: Path):
    """On rank 0: the config, run folder (locked) and checkpoint of this job, after every check."""
    resume, run_dir = resolve_resume(args, runs_dir)
    dataset = args.dataset or "digits"
    changed = {}
    if resume is not None:
        state = ckpt.load_training_state(resume)
        step = int(state["step"])
        if C.Config.from_dict(state["config"], f"the config inside {resume}").toy:
            raise UsageError(f"--resume {resume} is a checkpoint of the gmm (toy) job, which does not resume")
        pending = not args.no_eval and "eval_seconds" not in read_record(run_dir / "timing.json")
        cfg, changed = C.resume(state["config"], asked(args), step, f"--resume {resume}", evaluation_pending=pending)
        said = [f"note: resuming {resume} at step {step} with {k} {old} -> {new}" for k, (old, new) in changed.items()]
        said.append(f"resuming {resume} at step {step} of {cfg.iterations}"
                    + (": training is complete, finishing its evaluation" if step == cfg.iterations else ""))
    else:
        cfg = C.build(dataset, args.quick, args.config, overrides(args), args.seed)
        if run_dir is None:
            name = f"{cfg.dataset}{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir = Path(args.out) if args.out else runs_dir / name
    cfg, score = projection_setup(args, cfg, resume)  # T's --proj-width; --score-from's frozen score
    check_compile(cfg.compile)
    kernels = kernels_for(args.fused, d.device, args.triton_interpreter)  # e.g. no C++ compiler: exit 2 now
    with torch.device("meta"):  # every network argument checked now, without allocating weights
        build_nets(cfg)
    if not args.no_eval and not cells(cfg.eval):
        raise UsageError("nothing to evaluate: every cell is skipped by the config; name cells with --eval-steps/"
                         "--eval-rows, or pass --no-eval")
    data = make_dataset(cfg.dataset, cfg.data_root, cfg.resolution)  # fails early, exit 2
    check_batch(len(data), cfg)
    if not args.no_eval:  # the evaluation's own inputs, before hours of training, not after
        make_folder(cache_dir(args, runs_dir), "cache folder", "--cache-dir")
        if cfg.eval.metric == "fid":
            try:
                build_inception(args.inception_weights)
            except InceptionWeightsMissing as e:
                raise InceptionWeightsMissing(f"{e} (or pass --no-eval to train now and run `train/run.py eval --fid` "
                                              "later)") from None
    for flag, given in (("--inception-weights", args.inception_weights), ("--cache-dir", args.cache_dir)):
        if given and (args.no_eval or flag == "--inception-weights" and cfg.eval.metric != "fid"):
            raise UsageError(f"{flag} is not used by this run ({'--no-eval' if args.no_eval else cfg.eval.metric}"
                             f"{'' if args.no_eval else ' evaluation'}); drop it")
    if args.check_data:
        n = check_data(data, cfg.num_workers, progress=not args.no_progress)
        print(f"--check-data: all {n} images of {cfg.dataset} decode", file=sys.stderr)
    lock = claim_existing(run_dir) if resume is not None else claim_new(run_dir, args.overwrite)
    if resume is not None:
        print("\n".join(said), file=sys.stderr)
    try:
        write_json(cfg.data, run_dir / "config.json")
        info = {"argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(d.device),
                "world_size": d.world, "torch": torch.__version__, "resumed_from": str(resume) if resume else None,
                "changed_on_resume": changed or None, "fused": args.fused,
                "step_backend": resolve_backend(kernels.steps, d.device), "compile": cfg.compile,
                "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
        if cfg.dataset == "digits":
            info["dataset"] = DIGITS_INFO
        if resume is None:
            write_json(info, run_dir / "run_info.json")
        else:  # each resume: its own record, and a line in the run's own
            write_json(info, run_dir / f"run_info_resume_{int(time.time())}.json")
            first = read_record(run_dir / "run_info.json")
            update_record(run_dir / "run_info.json", resumes=[*first.get("resumes", []), {
                "from": str(resume), "at_step": step, "started": info["started"], "changed": changed or None}])
    except OSError as e:
        lock.release()
        raise UsageError(f"cannot write in run folder {run_dir}: {e.strerror}") from None
    if args.resume == "auto" and resume is None:
        print(f"--resume auto: nothing to resume in {args.out or runs_dir}: a new run", file=sys.stderr)
    print(f"run folder: {run_dir}", file=sys.stderr)
    return cfg, run_dir, resume, lock, (data, score)


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
    data, score = data or (None, None)
    try:
        return _train_and_evaluate(args, d, cfg, run_dir, resume, runs_dir, data, score)
    except UsageError:
        if lock is not None and resume is None:  # a failed start leaves nothing that blocks the folder
            undo_new_run(run_dir, lock)
        raise
    finally:
        if lock is not None:
            lock.release()


def _train_and_evaluate(args, d, cfg: C.Config, run_dir, resume, runs_dir, dataset=None, score=None) -> int:
    set_threads(args, cfg, d)
    progress = not args.no_progress
    kernels = kernels_for(args.fused, d.device, args.triton_interpreter)
    if kernels.nets and d.device.type != "cuda" and d.main:
        print("warning: --triton-interpreter runs the Triton kernels in the interpreter (slow; a correctness "
              "check, not a speed-up)", file=sys.stderr)
    if dataset is None:  # ranks > 0 (rank 0 built it while checking the input)
        dataset = make_dataset(cfg.dataset, cfg.data_root, cfg.resolution)
    D.barrier(d)

    t0 = time.time()
    if cfg.projection_only:  # T alone; "eps_ema" is the frozen score, an epsilon model at our VP time
        eps_ema, proj_ema, rows = train_projection(cfg, run_dir, d, resume=resume, kernels=kernels,
                                                   dataset=dataset, progress=progress, score=score)
    else:
        eps_ema, proj_ema, rows = train(cfg, run_dir, d, resume=resume, kernels=kernels, dataset=dataset,
                                        progress=progress)
    t_train = time.time() - t0
    if d.main and rows:  # recorded now (an earlier evaluation's no longer holds), for --resume after a kill
        write_json({"train_seconds": round(t_train, 1)}, run_dir / "timing.json")
    if not rows:  # resumed only to finish the evaluation: the training time is the one recorded before
        t_train = read_record(run_dir / "timing.json").get("train_seconds")
    if kernels.nets:
        use_fused([eps_ema, proj_ema])
    if args.no_eval:
        if d.main:
            print(f"trained in {time.time() - t0:.0f} s; evaluation skipped (--no-eval)", file=sys.stderr)
        return 0
    eps_ema, proj_ema = compiled(eps_ema, cfg.compile), compiled(proj_ema, cfg.compile)

    t1 = time.time()
    inception = build_inception(args.inception_weights, device=d.device) if cfg.eval.metric == "fid" else None
    feats, ref, extra, metric_info = features_and_reference(cfg, d, cache_dir(args, runs_dir), progress, inception)
    evaluate(cfg, eps_ema, proj_ema, feats, ref, run_dir, d, backend=kernels.steps,
             progress=progress, extra_rows=extra, verdicts=not cfg.quick)
    t_eval = time.time() - t1
    if d.main:
        timing = {"train_seconds": None if t_train is None else round(t_train, 1), "eval_seconds": round(t_eval, 1),
                  "device": str(d.device), "world_size": d.world, "threads": torch.get_num_threads(), **metric_info}
        write_json(timing, run_dir / "timing.json")
        print((run_dir / "results.md").read_text())
        print(f"train {'?' if t_train is None else f'{t_train:.0f}'} s, evaluation {t_eval:.0f} s; results in "
              f"{run_dir}", file=sys.stderr)
    return 0


__all__ = ["train_job"]
