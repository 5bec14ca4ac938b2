"""Atomic, weights-only checkpoints, RNG-state capture for exact resumption, the one format of a
training checkpoint (every job's), and loading a trained run back.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then moved
over the old one with os.replace (atomic on POSIX), so a process killed mid-write never corrupts
the last good checkpoint. Everything stored is a tensor or a container of primitives, so loading
works with torch.load(weights_only=True).
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from . import distributed as D
from .config import Config
from .errors import CheckpointError, UsageError, one_line
from .networks import build_nets, build_projection, frozen_score

LAST = "last.pt"
_SNAPSHOT = re.compile(r"^ckpt_(\d+)\.pt$")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_full(e: BaseException) -> bool:
    """Did a write fail for want of space? (torch reports it as "enforce fail at inline_container.cc",
    with the OSError ENOSPC in the exception's context)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def write_atomic(path, write, what: str = "file") -> Path:
    """write(f) into a temporary file beside `path`, fsync, then os.replace: `path` is either the old
    file or the complete new one, never a part. A failed write removes the temporary and raises a
    one-line CheckpointError (a full disk says so)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        kept = " (the previous one is kept)" if path.exists() else ""
        if _disk_full(e):
            try:
                free = f"{shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MiB free"
            except OSError:
                free = "no space left"
            raise CheckpointError(f"cannot write {what} {path}: the disk is full ({free}){kept}; free some space "
                                  "and run the command again") from None
        raise CheckpointError(f"cannot write {what} {path}{kept}: {one_line(e)}") from None
    _fsync_dir(path.parent)
    return path


def save_atomic(obj, path) -> Path:
    """torch.save(obj) to `path` atomically (`write_atomic`)."""
    return write_atomic(path, lambda f: torch.save(obj, f), "checkpoint")


def load(path, map_location="cpu", mmap: bool = False) -> dict:
    """torch.load(weights_only=True), with a readable error for a missing or damaged file (`mmap`: the
    tensors stay on disk until read, for a look at a checkpoint's keys)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def save_checkpoint(state: dict, ckpt_dir, step: int, keep_snapshot: bool = False) -> Path:
    """Write `ckpt_dir/last.pt` (atomically); with keep_snapshot also a permanent `ckpt_<step>.pt`."""
    ckpt_dir = Path(ckpt_dir)
    path = save_atomic(state, ckpt_dir / LAST)
    if keep_snapshot:
        save_atomic(state, ckpt_dir / f"ckpt_{step:08d}.pt")
    return path


def find_resumable(ckpt_dir) -> Path | None:
    """The newest readable checkpoint in `ckpt_dir` (last.pt first, then snapshots by step), or None."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    cands = []
    for p in ckpt_dir.iterdir():
        m = _SNAPSHOT.match(p.name)
        if m:
            cands.append((int(m.group(1)), p))
    best = None
    last = ckpt_dir / LAST
    if last.is_file():
        try:
            best = (int(load(last, mmap=True)["step"]), last)
        except (CheckpointError, KeyError):
            best = None
    for step, p in sorted(cands, reverse=True):
        if best is not None and best[0] >= step:
            break
        try:
            load(p, mmap=True)
            return p
        except CheckpointError:
            continue
    return None if best is None else best[1]


# --- RNG states as tensors ----------------------------------------------------------------------------

def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Global torch (CPU, every CUDA device), numpy and python RNG states, plus named generators."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch_cpu"].cpu())
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["torch_cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    for k, g in (generators or {}).items():
        if k not in state["generators"]:
            raise CheckpointError(f"checkpoint has no state for generator {k!r}")
        g.set_state(state["generators"][k].cpu())


# --- the training checkpoint of every job ---------------------------------------------------------------

TRAINING_STATE = ("step", "config", "world_size", "eps", "proj", "ema_eps", "ema_proj", "optimizer", "rng")
#: a projection-only run (--score-from) trains T alone: its score is the frozen source its config names
SCORE_STATE = ("eps", "ema_eps")


def training_state(step: int, cfg: Config, d: D.Dist, eps, proj, ema_eps, ema_proj, opt, generators: dict) -> dict:
    """Everything needed to continue exactly: the networks, their EMA copies, the optimizer, and the RNG
    states of every rank (gathered to rank 0; a collective, so every rank calls it). `eps` and `ema_eps`
    are None in a projection-only run, whose checkpoint holds T alone."""
    rng = capture_rng(generators)
    if d.enabled:
        box = [None] * d.world
        torch.distributed.all_gather_object(box, rng)
        rng = box
    else:
        rng = [rng]
    state = {"step": step, "config": cfg.data, "world_size": d.world, "eps": eps, "proj": proj.state_dict(),
             "ema_eps": ema_eps, "ema_proj": ema_proj.state_dict(), "optimizer": opt.state_dict(), "rng": rng}
    for k in SCORE_STATE:
        if state[k] is None:
            del state[k]
        else:
            state[k] = state[k].state_dict()
    return state


def load_training_state(path: Path, mmap: bool = False) -> dict:
    """A training checkpoint, or a one-line CheckpointError when the file is something else."""
    state = load(path, map_location="cpu", mmap=mmap)
    proj_only = isinstance(state, dict) and isinstance(state.get("config"), dict) and "score_from" in state["config"]
    missing = [k for k in TRAINING_STATE if not isinstance(state, dict) or k not in state
               and not (proj_only and k in SCORE_STATE)]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint of train/run.py (no {', '.join(missing)})")
    return state


def load_run(run_dir, map_location="cpu", make_nets=None):
    """(config, EMA score net, EMA projection net, step) from a run folder's newest checkpoint: the
    one way every command (eval, the experiments) gets a trained run back. The score net of a
    projection-only run is its frozen source (`wgfcore.pretrained.ScoreSource`, an epsilon model at our
    VP time like ours), refused if its weights changed since T was trained."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run folder {run_dir}: no such folder")
    path = find_resumable(run_dir / "checkpoints")
    if path is None:
        raise CheckpointError(f"no readable checkpoint in {run_dir / 'checkpoints'}")
    state = load_training_state(path)
    cfg = Config.from_dict(state["config"], f"the config inside {path}")
    if cfg.projection_only:
        eps_net = frozen_score(cfg.score_from["path"], record=cfg.score_from,
                               what=f"{run_dir}: its score (--score-from)")
        proj_net = build_projection(cfg)
    else:
        eps_net, proj_net = (make_nets or build_nets)(cfg)
    try:
        if not cfg.projection_only:
            eps_net.load_state_dict(state["ema_eps"])
        proj_net.load_state_dict(state["ema_proj"])
    except RuntimeError as e:
        raise UsageError(f"{path}: its weights do not fit its config's networks "
                         f"({str(e).splitlines()[0]})") from None
    return cfg, eps_net.eval(), proj_net.eval(), int(state["step"])


__all__ = ["SCORE_STATE", "CheckpointError", "save_atomic", "load", "save_checkpoint", "find_resumable", "capture_rng",
           "restore_rng", "LAST", "TRAINING_STATE", "training_state", "load_training_state", "load_run"]
