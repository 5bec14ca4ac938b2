"""What the jobs share between the command line and a run: the config keys a user set explicitly,
CPU threads, and which run and checkpoint `--resume` means (ALGORITHMS §7's runs are resumed exactly).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..engine import checkpoint as ckpt
from ..engine import config as C
from ..engine.errors import UsageError
from ..engine.runfiles import checkpoint_files, holds_run

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


def set_threads(args, cfg: C.Config, d) -> None:
    """--threads, else the config's cpu_threads on CPU (the digits job: 1), else torch's default."""
    n = args.threads or (cfg.cpu_threads if d.device.type == "cpu" else None)
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
                if checkpoint_files(f):  # written, but none reads back: never replaced without being asked
                    raise UsageError(f"--resume auto: {f} holds a run but no readable checkpoint in "
                                     f"{f / 'checkpoints'}; replace it with --overwrite (without --resume), or "
                                     "choose another --out")
                return None, f  # stopped before its first checkpoint: the new run starts afresh there
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


__all__ = ["overrides", "asked", "set_threads", "resolve_resume", "OVERRIDES", "EVAL_OVERRIDES"]
