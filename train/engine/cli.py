"""What every command of train/ shares on the command line: an argparse parser whose errors are one
line with exit code 2, the argument types (ranges checked where the value is read), and `guarded`,
which turns every user error raised inside a job into one line and exit code 2 (a diverged training
run: exit 3), also inside a torchrun process group.
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import distributed as D
from .errors import EXIT_DIVERGED, EXIT_USAGE, Diverged, InceptionWeightsMissing, UsageError, one_line


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of the usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see --help)\n")


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
    except InceptionWeightsMissing as e:  # several lines on purpose: where to get the file
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Diverged as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            print(f"error: --compile failed: {type(e).__name__}: {one_line(e)[:300]}", file=sys.stderr)
            return EXIT_USAGE
        raise
    finally:
        if d is not None:
            D.shutdown(d)


__all__ = ["Parser", "typed", "pos_int", "nonneg_int", "pos_float", "decay", "at_least", "ints", "names", "device",
           "guarded"]
