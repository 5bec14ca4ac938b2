"""What every command of train/ shares on the command line: an argparse parser whose errors are one
line with exit code 2, the argument types (ranges checked where the value is read), and `guarded`,
which turns every user error raised inside a job into one line and exit code 2 (a diverged training
run: exit 3), also inside a torchrun process group.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from . import distributed as D
from .errors import EXIT_DIVERGED, EXIT_USAGE, Diverged, UsageError, one_line


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of the usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see --help)\n" if os.environ.get("RANK", "0") == "0"
                  else None)


# --- argument types -------------------------------------------------------------------------------------

def typed(conv, ok, what):
    """An argparse type: `conv(s)`, accepted when `ok(value)`, else "expected <what>, got <s>"."""
    def parse(s):
        try:
            v = conv(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return parse


pos_int = typed(int, lambda v: v >= 1, "a positive integer")
nonneg_int = typed(int, lambda v: v >= 0, "an integer >= 0")
pos_float = typed(float, lambda v: v > 0 and v != float("inf"), "a positive finite number")
decay = typed(float, lambda v: 0 <= v < 1, "a decay in [0, 1)")


def at_least(n: int):
    return typed(int, lambda v: v >= n, f"an integer >= {n}")


#: seeds are multiplied by up to ~1e6 and offset inside 64-bit generator seeds (data order, sampling)
MAX_SEED = 2 ** 32 - 1
seed = typed(int, lambda v: 0 <= v <= MAX_SEED, f"a seed in [0, {MAX_SEED}]")
threads = typed(int, lambda v: 1 <= v <= (os.cpu_count() or 1),
                f"a thread count in [1, {os.cpu_count() or 1}] (this machine's CPUs)")


def path_str(s: str) -> str:
    """A path as given (an empty one is an error, not the current folder)."""
    if not s.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return s


def path(s: str) -> Path:
    return Path(path_str(s))


def ints(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}") from None
    if not v or any(x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    return v


def names(s: str) -> list[str]:
    v = [x.strip() for x in s.split(",") if x.strip()]
    if not v:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {s!r}")
    return v


def device(s: str) -> str:
    if s == "auto":
        return s
    try:
        dev = torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:K or auto, got {s!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:K or auto, got {s!r}")
    return s


# --- the guard -----------------------------------------------------------------------------------------

def _say(message: str) -> None:
    """A user error's line, printed once: by rank 0 only under torchrun (every rank stops with it)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def guarded(job, args, device_name: str | None = None) -> int:
    """Run a job (inside the process group when `device_name` is given); user errors become one line
    and exit code 2, also when raised deep inside as SystemExit with a message; a diverged training
    run exits 3."""
    d = None
    try:
        if device_name is not None:
            d = D.init(device_name)
            return job(args, d)
        return job(args)
    except UsageError as e:
        _say(f"error: {one_line(e)}")
        return EXIT_USAGE
    except Diverged as e:
        _say(f"error: {one_line(e)}")
        return EXIT_DIVERGED
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        _say(f"error: {one_line(e)}")
        return EXIT_USAGE
    except Exception as e:
        if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            _say(f"error: --compile failed: {type(e).__name__}: {one_line(e)[:300]}")
            return EXIT_USAGE
        raise
    finally:
        if d is not None:
            D.shutdown(d)


__all__ = ["Parser", "typed", "pos_int", "nonneg_int", "pos_float", "decay", "at_least", "ints", "names", "device",
           "seed", "threads", "path", "path_str", "MAX_SEED", "guarded"]
