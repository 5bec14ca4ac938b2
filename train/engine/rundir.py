"""The run folder: who may write into it, and the files every job writes the same way.

A folder that holds a run (train.engine.runfiles: our marker proves it) is only continued
(`--resume`) or replaced on `--overwrite`, which deletes only what our runs wrote; a run that never
reached its first checkpoint holds nothing trained and is started afresh. A job holds an exclusive
lock on its folder (`.lock`, flock) for as long as it runs, so a second job on the same folder stops
at once instead of interleaving its rows with the first one's.
"""
from __future__ import annotations

import csv
import fcntl
import json
import os
import sys
from pathlib import Path

from .errors import UsageError
from .runfiles import (LOCK, checkpoint_files, holds_run, remove_run_files, remove_stale_temporaries,
                       write_marker)


class Lock:
    """Exclusive advisory lock on <folder>/.lock for the lifetime of a job (released on exit or kill)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.fd = None
        self.created = False  # this job made the lock file (so it may remove it when it leaves no run)
        self.created_folder = False  # claim_new made the folder itself

    def acquire(self) -> "Lock":
        path = self.folder / LOCK
        try:
            self.created = not path.exists()
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"cannot write in run folder {self.folder}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = ""
            try:
                other = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
            raise UsageError(f"run folder {self.folder} is in use by another job"
                             f"{f' (pid {other})' if other else ''}; wait for it or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def release(self, forget: bool = False) -> None:
        """Drop the lock; with `forget`, also remove the lock file this job created (a folder it leaves
        as it found it)."""
        if self.fd is not None:
            if forget and self.created:
                (self.folder / LOCK).unlink(missing_ok=True)
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def make_folder(folder: Path, what: str = "run folder", flag: str = "--out") -> None:
    """mkdir -p with a one-line error (read-only parent, a file in the way, no write permission)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {what} {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write in {what} {folder}: permission denied")


def claim_new(folder: Path, overwrite: bool, job: str = "image", resumable: bool = True) -> Lock:
    """Lock `folder` for a new run and mark it as ours. An empty or new folder is taken; a run folder
    that has trained (a checkpoint) only with `overwrite`, which deletes what our runs wrote there and
    nothing else; a run folder that never reached its first checkpoint is started afresh (said so);
    anything else is refused, and left as it was. Returns the held lock."""
    folder = Path(folder)
    lock = Lock(folder)
    lock.created_folder = not folder.exists()
    make_folder(folder)
    lock.acquire()  # first: a job running here is reported as such, whatever its files
    try:
        others = [p for p in folder.iterdir() if p.name != LOCK]
        if others and not holds_run(folder):
            raise UsageError(f"--out {folder} is not empty and holds no run of train/run.py (no run marker or "
                             "training checkpoint); nothing was changed: choose an empty or new folder")
        if others and checkpoint_files(folder) and not overwrite:
            again = f"continue it with --resume {folder}, or " if resumable else ""
            raise UsageError(f"--out {folder} already holds a run; {again}replace it with --overwrite")
        if others:
            trained = bool(checkpoint_files(folder))
            remove_run_files(folder)
            if not trained:
                print(f"note: {folder} held a run that never wrote its first checkpoint (nothing was trained): "
                      "starting it afresh", file=sys.stderr)
        write_marker(folder, job)
    except BaseException:
        lock.release(forget=True)
        if lock.created_folder:
            _remove_if_empty(folder)
        raise
    return lock


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def undo_new_run(folder: Path, lock: Lock) -> None:
    """A new run that stopped on a user error before its first checkpoint leaves the folder as it found
    it: its files removed (nothing was trained), the folder too when this job created it."""
    folder = Path(folder)
    if checkpoint_files(folder):
        return
    remove_run_files(folder)
    lock.release(forget=True)
    if getattr(lock, "created_folder", False):
        _remove_if_empty(folder)


def claim_existing(folder: Path) -> Lock:
    """Lock an existing run folder (resume, eval); temporaries of killed checkpoint writes are removed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"run folder {folder} does not exist")
    make_folder(folder)
    lock = Lock(folder).acquire()
    remove_stale_temporaries(folder)
    return lock


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_record(path: Path) -> dict:
    """A JSON object the run wrote earlier (run_info.json, timing.json), or {} when absent or damaged."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def update_record(path: Path, **fields) -> dict:
    """Merge `fields` into the JSON object at `path` (created when absent); returns the result."""
    obj = {**read_record(path), **fields}
    write_json(obj, Path(path))
    return obj


class LossLog:
    """losses.csv (rank 0), truncated to the resume step so a resumed run has no duplicate rows."""

    def __init__(self, path: Path, fields: list[str], resume_step: int | None, tb_dir: Path | None = None):
        self.path, self.fields = path, fields
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            w.writerows(rows)
        self.tb = None
        if tb_dir is not None:
            try:  # TensorBoard is optional
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(tb_dir))
            except Exception:
                self.tb = None

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)
        if self.tb is not None:
            for k in self.fields:
                if k not in ("step", "seconds"):
                    self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


__all__ = ["Lock", "claim_new", "claim_existing", "undo_new_run", "holds_run", "make_folder", "write_json",
           "read_record", "update_record", "LossLog"]
