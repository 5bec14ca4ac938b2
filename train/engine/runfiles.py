"""What our runs write into a run folder, the marker that proves a folder is one of our runs, and the
one function that deletes a run's files (for --overwrite) without touching anything else.

A folder is a run when it holds our marker (`.wgfcore-run`, written the moment a job claims the
folder) or, for runs made before the marker existed, a readable training checkpoint of ours. File
names alone prove nothing: a user's config.json beside their thesis is not a run. Deletion removes
only regular files whose names our jobs write, in the run folder and in the subfolders our jobs
make; symbolic links, unknown files and folders, hidden files and everything inside unknown folders
stay. When anything in the way cannot be removed safely, nothing is removed.
"""
from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

from .checkpoint import load_training_state
from .errors import UsageError

MARKER = ".wgfcore-run"
LOCK = ".lock"
_MAGIC = "wgfcore train/run.py run folder"

#: regular files our jobs write at the top of a run folder (image, eval --fid, gmm jobs)
TOP_FILES = re.compile(r"^(config\.json|run_info\.json|run_info_resume_\d+\.json|losses\.csv|losses\.png"
                       r"|(fid_)?results\.(csv|md)|timing\.json|(fid_)?samples_overview\.png|[a-z0-9_]*vs_nfe\.png"
                       r"|samples(_analytic)?\.png|paired_seeds_[a-z]+\.json|" + re.escape(MARKER) + r")$")
#: subfolders our jobs make, and the files they write there (analytic/: the gmm job's second training)
SUBFOLDERS = {
    "checkpoints": re.compile(r"^(last\.pt|ckpt_\d+\.pt|\.(last|ckpt_\d+)\.pt\.tmp-\d+)$"),
    "samples": re.compile(r"^((fid_)?[a-z0-9_]+_N\d+|train_step\d{8}_pp20)\.png$"),
    "tensorboard": re.compile(r"^events\.out\.tfevents\.[\w.\-]+$"),
    "analytic": None,  # a run folder of its own: the same rules
    "projection": re.compile(r"^(config\.json|model\.safetensors|model\.pt)$"),  # --score-from: T, exported
}
TMP = re.compile(r"^\.(last|ckpt_\d+)\.pt\.tmp-\d+$")


def write_marker(folder: Path, job: str) -> None:
    (Path(folder) / MARKER).write_text(json.dumps({"marker": _MAGIC, "job": job,
                                                    "created": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")


def has_marker(folder: Path) -> bool:
    p = Path(folder) / MARKER
    try:
        if p.is_symlink() or not p.is_file():
            return False
        return json.loads(p.read_text()).get("marker") == _MAGIC
    except (OSError, ValueError, AttributeError):
        return False


def checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoint files (not temporaries) of a run folder: what it has trained, readable or not."""
    d = Path(folder) / "checkpoints"
    if d.is_symlink() or not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if SUBFOLDERS["checkpoints"].match(p.name) and not TMP.match(p.name)
                  and p.is_file() and not p.is_symlink())


def _legacy_proof(folder: Path) -> bool:
    """A run of the code before the marker: a checkpoint that loads as one of our training states."""
    for p in checkpoint_files(folder):
        try:
            load_training_state(p, mmap=True)
            return True
        except UsageError:
            continue
    return False


def holds_run(folder: Path) -> bool:
    """Is `folder` one of our run folders (marker, or a training checkpoint of ours)?"""
    folder = Path(folder)
    return folder.is_dir() and (has_marker(folder) or _legacy_proof(folder))


def remove_stale_temporaries(folder: Path) -> None:
    """Checkpoint temporaries of killed writes (.last.pt.tmp-PID): stale once we hold the folder's lock."""
    for sub in (Path(folder), Path(folder) / "analytic"):
        d = sub / "checkpoints"
        if d.is_dir() and not d.is_symlink():
            for p in d.iterdir():
                if TMP.match(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)


def _plan(folder: Path, names, doomed: list, dirs: list) -> None:
    """Collect what to delete under `folder` (files matching `names`, our subfolders by their rules);
    a UsageError when something of ours is in a shape our runs never write (nothing deleted yet)."""
    for p in sorted(folder.iterdir()):
        ours_file = names is not None and bool(names.match(p.name))
        ours_dir = names is TOP_FILES and p.name in SUBFOLDERS
        if not (ours_file or ours_dir) or p.name == LOCK:
            continue
        mode = p.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise UsageError(f"cannot replace the run: {p} is a symbolic link, which no run writes; nothing was "
                             "removed (move it away, or choose another --out)")
        if ours_dir and stat.S_ISDIR(mode):
            rule = SUBFOLDERS[p.name]
            _plan(p, TOP_FILES if rule is None else rule, doomed, dirs)
            dirs.append(p)
        elif ours_file and stat.S_ISREG(mode):
            doomed.append(p)
        else:
            raise UsageError(f"cannot replace the run: {p} is not the kind of file a run writes there; nothing was "
                             "removed (move it away, or choose another --out)")


def remove_run_files(folder: Path) -> int:
    """Delete what our runs wrote into `folder` (a run folder whose lock we hold); returns the count.
    Everything else stays; our subfolders are removed only when that leaves them empty."""
    folder = Path(folder)
    doomed, dirs = [], []
    _plan(folder, TOP_FILES, doomed, dirs)
    for parent in {p.parent for p in doomed} | {d.parent for d in dirs}:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"cannot replace the run: cannot remove files in {parent}: permission denied; nothing "
                             "was removed")
    for p in doomed:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UsageError(f"cannot replace the run: cannot remove {p}: {e.strerror}") from None
    for d in dirs:  # deepest first: _plan appends a folder after its contents
        try:
            d.rmdir()
        except OSError:
            pass  # not empty: it holds files that are not ours
    return len(doomed)


__all__ = ["MARKER", "LOCK", "write_marker", "has_marker", "holds_run", "checkpoint_files", "remove_run_files",
           "remove_stale_temporaries"]
