"""How a job in train/ stops early on purpose, and the exit codes the CLI gives each way.

`UsageError` and its kinds (a dataset, a checkpoint, the FID weights): bad input or files, printed
as one line with exit code 2, raised before any training wherever it can be known then.
`Diverged`: training produced a non-finite loss or weights (exit code 3).
"""
from __future__ import annotations

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class UsageError(Exception):
    """A problem with the user's input or files: printed as one line, exit code 2."""


class DatasetError(UsageError):
    """A dataset is missing or unreadable; the message names the expected layout and path."""


class CheckpointError(UsageError):
    """A checkpoint is missing, unreadable or not one of ours."""


class InceptionWeightsMissing(UsageError):
    """The FID Inception weights are missing or unusable; the message says where to get them and where to
    put them."""


class Diverged(RuntimeError):
    """Training stopped on a non-finite loss or non-finite weights (exit code 3)."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


__all__ = ["UsageError", "DatasetError", "CheckpointError", "InceptionWeightsMissing", "Diverged", "EXIT_USAGE",
           "EXIT_DIVERGED", "one_line"]
