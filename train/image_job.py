"""The image jobs behind `train/run.py`: train (then evaluate) a run, and re-evaluate a finished one.

ALGORITHMS §1-3 and §7. Everything a user can get wrong (flags, config, data, run folder, resume)
is checked before the first training step; the run folder is locked for the whole job.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import config as C
from . import distributed as D
from .datasets import DIGITS_INFO, check_data, make_dataset
from .errors import UsageError
from .evaluate import evaluate, load_run
from .fid import InceptionFeatures, InceptionWeightsMissing, build_inception, find_weights, load_stats
from .generate import cells
from .networks import check_compile, compiled, use_fused
from .references import digits_metric, fid_reference
from .rundir import claim_existing, claim_new, holds_run, write_json
from .training_loop import load_training_state, train

#: command-line options that override config keys (config key -> argparse dest)
OVERRIDES = {"iterations": "iterations", "batch_size": "batch_size", "lr": "lr", "ema_decay": "ema_decay",
             "delta_tau": "delta_tau", "num_workers": "num_workers", "log_every": "log_every",
             "ckpt_every": "ckpt_every", "sample_every": "sample_every", "preset": "preset", "data_root": "data_root",
             "hidden": "hidden", "compile": "compile"}
EVAL_OVERRIDES = {"samples": "eval_samples", "steps": "eval_steps", "rows": "eval_rows", "batch": "eval_batch",
                  "delta_p": "delta_p", "seeds": "eval_seeds"}


def overrides(args) -> dict:
    """The config keys the user set explicitly on the command line."""
    o = {}
    for key, attr in OVERRIDES.items():
        v = getattr(args, attr, None)
        if v is not None:
            o[key] = str(Path(v).expanduser().resolve()) if key == "data_root" else v
    e = {key: getattr(args, attr) for key, attr in EVAL_OVERRIDES.items() if getattr(args, attr, None) is not None}
    if e:
        o["eval"] = e
    return o


def asked(args) -> dict:
    """Everything the user asked for explicitly (--config file, then flags, --dataset, --seed): what a
    resumed run compares against its checkpoint."""
    a = {}
    if args.config:
        a = C.validate(C.read_json(args.config, "--config"), f"--config {args.config}", partial=True)
        a.pop("_doc", None)
    a = C.merge(a, overrides(args))
    if args.dataset is not None:
        a["dataset"] = args.dataset
    if args.seed is not None:
        a["seed"] = args.seed
    return a


def set_threads(args, cfg: dict, d) -> None:
    """--threads, else the config's cpu_threads on CPU (the digits job: 1), else torch's default."""
    n = args.threads or (cfg.get("cpu_threads") if d.device.type == "cpu" else None)
    if n:
        torch.set_num_threads(int(n))


def _runs_of(runs_dir: Path, dataset: str, quick: bool):
    prefix = dataset + ("-quick-" if quick else "-")
    return sorted((p for p in runs_dir.glob(prefix + "*") if p.is_dir()
                   and (quick or not p.name.startswith(dataset + "-quick-"))),
                  key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_resume(args, runs_dir: Path):
    """(checkpoint path, run folder) to continue, or (None, folder or None) for a new run."""
    dataset = args.dataset or "digits"
    if not args.resume:
        return None, None
    if args.overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it: choose one")
    if args.resume == "auto":
        folders = [Path(args.out)] if args.out else _runs_of(runs_dir, dataset, args.quick)
        for f in folders:
            c = ckpt.find_resumable(f / "checkpoints")
            if c is not None:
                return c, f
            if holds_run(f):
                raise UsageError(f"--resume auto: {f} holds a run but no readable checkpoint in {f / 'checkpoints'}; "
                                 "replace it with --overwrite (without --resume), or choose another --out")
        print("--resume auto: no checkpoint found, starting a new run", file=sys.stderr)
        return None, None
    p = Path(args.resume)
    if p.is_file():
        folder = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    elif p.is_dir():
        folder = p.parent if p.name == "checkpoints" else p
        c = ckpt.find_resumable(folder / "checkpoints")
        if c is None:
            raise UsageError(f"--resume {p}: no readable checkpoint in {folder / 'checkpoints'}")
        p = c
    else:
        raise UsageError(f"--resume {p}: no such file or folder")
    if args.out and Path(args.out).resolve() != folder.resolve():
        raise UsageError(f"--resume continues the run in its own folder {folder}; --out {args.out} differs "
                         "(drop --out, or copy the run folder first)")
    return p, folder


def _prepare(args, d, runs_dir: Path):
    """On rank 0: the config, run folder (locked) and checkpoint of this job, after every check."""
    resume, run_dir = resolve_resume(args, runs_dir)
    dataset = args.dataset or "digits"
    changed = {}
    if resume is not None:
        state = load_training_state(resume)
        cfg, changed = C.resume(state["config"], asked(args), int(state["step"]), f"--resume {resume}")
        for k, (old, new) in changed.items():
            print(f"note: resuming {resume} at step {state['step']} with {k} {old} -> {new}", file=sys.stderr)
    else:
        cfg = C.build(dataset, args.quick, args.config, overrides(args), args.seed)
        if run_dir is None:
            name = f"{cfg['dataset']}{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir = Path(args.out) if args.out else runs_dir / name
    check_compile(cfg.get("compile"))
    if not args.no_eval and not cells(cfg["eval"]):
        raise UsageError("nothing to evaluate: every cell is skipped by the config; name cells with --eval-steps/"
                         "--eval-rows, or pass --no-eval")
    data = make_dataset(cfg["dataset"], cfg.get("data_root"), cfg["resolution"])  # fails early, exit 2
    if len(data) < cfg["batch_size"]:
        raise UsageError(f"the {cfg['dataset']} set has {len(data)} images, fewer than one batch of "
                         f"{cfg['batch_size']}: lower --batch-size")
    if cfg["eval"]["metric"] == "fid" and not args.no_eval:
        try:
            find_weights(args.inception_weights)  # before hours of training, not after
        except InceptionWeightsMissing as e:
            raise InceptionWeightsMissing(f"{e}\n  (or pass --no-eval to train now and run `train/run.py eval --fid` "
                                          "later)") from None
    if args.check_data:
        n = check_data(data, cfg["num_workers"], progress=not args.no_progress)
        print(f"--check-data: all {n} images of {cfg['dataset']} decode", file=sys.stderr)
    lock = claim_existing(run_dir) if resume is not None else claim_new(run_dir, args.overwrite)
    write_json(cfg, run_dir / "config.json")
    info = {"argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(d.device),
            "world_size": d.world, "torch": torch.__version__, "resumed_from": str(resume) if resume else None,
            "changed_on_resume": changed or None, "fused": args.fused, "compile": cfg.get("compile") or False,
            "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if cfg["dataset"] == "digits":
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
            found = ("ok", (cfg, str(run_dir), None if resume is None else str(resume)))
        except Exception as e:  # every rank fails together, none waits forever
            found = ("error", e)
            if not d.enabled:
                raise
    status, payload = D.broadcast_object(d, found)
    if status == "error":
        raise payload if isinstance(payload, UsageError) else UsageError(str(payload))
    cfg, run_dir, resume = payload
    run_dir, resume = Path(run_dir), None if resume is None else Path(resume)
    try:
        return _train_and_evaluate(args, d, cfg, run_dir, resume, runs_dir, data)
    finally:
        if lock is not None:
            lock.release()


def _train_and_evaluate(args, d, cfg, run_dir, resume, runs_dir, dataset=None) -> int:
    set_threads(args, cfg, d)
    cache_dir = Path(args.cache_dir) if args.cache_dir else runs_dir / ".cache"
    progress = not args.no_progress
    if args.fused and d.device.type != "cuda" and d.main:
        print("warning: --fused on CPU runs the Triton kernels in the interpreter (slow; a correctness "
              "check, not a speed-up)", file=sys.stderr)
    if dataset is None:  # ranks > 0 (rank 0 built it while checking the input)
        dataset = make_dataset(cfg["dataset"], cfg.get("data_root"), cfg["resolution"])
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
    eps_ema, proj_ema = compiled(eps_ema, cfg.get("compile")), compiled(proj_ema, cfg.get("compile"))

    t1 = time.time()
    backend = "triton" if args.fused else "auto"
    metric_info = {}
    if cfg["eval"]["metric"] == "digits-fd":
        feats, ref, extra, acc = digits_metric(cfg, cache_dir, d, progress and d.main,
                                               n_floor=sorted({c["n"] for c in cells(cfg["eval"])}))
        metric_info = {"digits_classifier_test_accuracy": round(acc, 4)}
        if d.main:
            print(f"digits classifier (features of digits-FD): test accuracy {acc:.3f}", file=sys.stderr)
        evaluate(cfg, eps_ema, proj_ema, feats, ref, run_dir, d, backend=backend, progress=progress,
                 extra_rows=extra, verdicts=not cfg.get("quick"))
    else:
        feats = InceptionFeatures(build_inception(args.inception_weights, device=d.device), d.device)
        ref = fid_reference(cfg, feats, d, cache_dir, int(cfg["eval"].get("ref_samples", 50_000)), progress)
        evaluate(cfg, eps_ema, proj_ema, feats, ref, run_dir, d, backend=backend, progress=progress,
                 verdicts=not cfg.get("quick"))
    t_eval = time.time() - t1
    if d.main:
        timing = {"train_seconds": round(t_train, 1), "eval_seconds": round(t_eval, 1), "device": str(d.device),
                  "world_size": d.world, "threads": torch.get_num_threads(), **metric_info}
        write_json(timing, run_dir / "timing.json")
        print((run_dir / "results.md").read_text())
        print(f"train {t_train:.0f} s, evaluation {t_eval:.0f} s; results in {run_dir}", file=sys.stderr)
    return 0


# --- re-evaluating a finished run ------------------------------------------------------------------------

def eval_job(args, d) -> int:
    run = Path(args.run)
    if not (run / "checkpoints").is_dir():
        raise UsageError(f"--run {run}: expected a run folder with a checkpoints/ subfolder")
    progress = not args.no_progress
    if args.fid:
        model = build_inception(args.inception_weights, device=d.device)  # fails first if the weights are missing
    cfg, eps_net, proj_net, step = load_run(run)
    if cfg.get("dataset") == "gmm":
        raise UsageError(f"--run {run} is a gmm (toy) run; its evaluation is part of `--dataset gmm`")
    set_threads(args, cfg, d)
    if args.data_root:
        cfg["data_root"] = str(Path(args.data_root).expanduser().resolve())
    ecfg = dict(cfg["eval"])
    if args.fid:
        # no bootstrap: each resample would need a 2048 x 2048 matrix square root
        ecfg.update(rows=["em", "pp"], samples=50_000, batch=ecfg.get("batch", 500), bootstrap=0)
    for key, v in [("samples", args.samples), ("batch", args.batch), ("steps", args.steps), ("rows", args.rows)]:
        if v is not None:
            ecfg[key] = v
    if args.steps is not None or args.rows is not None:
        ecfg["skip"] = []  # cells asked for by name are run, whatever the config skips for its budget
    cfg["eval"] = ecfg
    C.validate(cfg, "eval")
    if not cells(ecfg):
        raise UsageError("nothing to evaluate: every requested cell is skipped by the run's config; "
                         "name them with --steps/--rows")
    if not args.fid and ecfg["metric"] != "digits-fd":
        raise UsageError(f"this run's metric is {ecfg['metric']!r}; evaluate it with --fid")
    backend_compile = args.compile if args.compile is not None else cfg.get("compile")
    check_compile(backend_compile)
    lock = claim_existing(run) if d.main else None
    try:
        if args.fused:
            if d.device.type != "cuda" and d.main:
                print("warning: --fused on CPU runs the Triton kernels in the interpreter (slow)", file=sys.stderr)
            use_fused([eps_net, proj_net])
        eps_net, proj_net = compiled(eps_net, backend_compile), compiled(proj_net, backend_compile)
        cache_dir = Path(args.cache_dir) if args.cache_dir else run.parent / ".cache"
        backend = "triton" if args.fused else "auto"
        if args.fid:
            feats = InceptionFeatures(model, d.device)
            if args.ref_stats:
                try:
                    ref = load_stats(args.ref_stats)
                except (OSError, ValueError, KeyError) as e:
                    raise UsageError(f"--ref-stats {args.ref_stats}: {e}") from None
            else:
                n_ref = args.ref_samples or int(ecfg.get("ref_samples", 50_000))
                ref = fid_reference(cfg, feats, d, cache_dir, n_ref, progress)
            evaluate(cfg, eps_net, proj_net, feats, ref, run, d, ecfg=ecfg, backend=backend, progress=progress,
                     prefix="fid_", verdicts=not cfg.get("quick"))
            out = run / "fid_results.md"
        else:
            feats, ref, extra, _ = digits_metric(cfg, cache_dir, d, progress and d.main,
                                                 n_floor=sorted({c["n"] for c in cells(ecfg)}))
            evaluate(cfg, eps_net, proj_net, feats, ref, run, d, ecfg=ecfg, backend=backend, progress=progress,
                     extra_rows=extra, verdicts=not cfg.get("quick"))
            out = run / "results.md"
    finally:
        if lock is not None:
            lock.release()
    if d.main:
        print(f"checkpoint step {step}")
        print(out.read_text())
    return 0


__all__ = ["train_job", "eval_job", "overrides", "asked", "resolve_resume"]
