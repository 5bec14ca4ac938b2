"""The run folder: what may be written into it, by whom, and the files every job writes the same way.

A folder that holds a run is only continued (`--resume`) or replaced on `--overwrite`; a job holds
an exclusive lock on it (`.lock`, flock) for as long as it runs, so a second job on the same folder
stops at once instead of interleaving its rows with the first one's.
"""
from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
from pathlib import Path

from .errors import UsageError

LOCK = ".lock"
#: files whose presence makes a folder a run folder (of any job in train/)
RUN_MARKERS = ("config.json", "checkpoints", "losses.csv", "results.md", "results.csv", "model.pt")


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / m).exists() for m in RUN_MARKERS)


class Lock:
    """Exclusive advisory lock on <folder>/.lock for the lifetime of a job (released on exit or kill)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.fd = None

    def acquire(self) -> "Lock":
        path = self.folder / LOCK
        try:
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

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def make_folder(folder: Path) -> None:
    """mkdir -p with a one-line error (read-only parent, a file in the way)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create run folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write in run folder {folder}: permission denied")


def claim_new(folder: Path, overwrite: bool) -> Lock:
    """Lock `folder` for a new run: refused if it already holds a run (or other files), unless
    `overwrite`, which empties it first. Returns the held lock."""
    folder = Path(folder)
    make_folder(folder)
    lock = Lock(folder).acquire()  # first: a job running here is reported as such, whatever its files
    try:
        others = [p for p in folder.iterdir() if p.name != LOCK]
        if others and not holds_run(folder):
            raise UsageError(f"--out {folder} is not empty and holds no run; choose an empty or new folder")
        if others and not overwrite:
            raise UsageError(f"--out {folder} already holds a run; continue it with --resume {folder}, "
                             "or replace it with --overwrite")
        for p in others:  # only reached with --overwrite
            try:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError as e:
                raise UsageError(f"--overwrite: cannot remove {p}: {e.strerror}") from None
    except BaseException:
        lock.release()
        raise
    return lock


def claim_existing(folder: Path) -> Lock:
    """Lock an existing run folder (resume, eval)."""
    if not Path(folder).is_dir():
        raise UsageError(f"run folder {folder} does not exist")
    make_folder(Path(folder))
    return Lock(Path(folder)).acquire()


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


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


__all__ = ["Lock", "claim_new", "claim_existing", "holds_run", "make_folder", "write_json", "LossLog"]
