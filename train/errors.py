"""The two ways a job in train/ stops early on purpose, and the exit codes the CLI gives them.

`UsageError`: bad input or files (flags, configs, datasets, run folders): one line, exit 2, and
raised before any training wherever it can be known then. `Diverged`: training produced a
non-finite loss or weights: one line naming the step and the last good checkpoint, exit 3.
"""
from __future__ import annotations

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class UsageError(Exception):
    """A problem with the user's input or files: printed as one line, exit code 2."""


class Diverged(RuntimeError):
    """Training stopped on a non-finite loss or non-finite weights (exit code 3)."""


__all__ = ["UsageError", "Diverged", "EXIT_USAGE", "EXIT_DIVERGED"]
