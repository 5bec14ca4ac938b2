"""Checks that every kernel launcher shares: where a kernel may run, and in which dtypes.

One home for them (ARCHITECTURE: "the checks that every launcher needs belong in one shared
helper module inside `kernels/`"), so that the step and attention kernels fail alike.
"""
from __future__ import annotations

import torch

from . import INTERPRETED

# Storage dtypes every kernel accepts on a GPU (the interpreter has no bfloat16).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_device(op: str, x: torch.Tensor) -> None:
    """Raise if `x` cannot be handed to a Triton kernel in this process.

    CUDA tensors need compiled kernels; CPU tensors need TRITON_INTERPRET=1 set before `kernels`
    was first imported, and no bfloat16 (the interpreter runs numpy, which has none).
    """
    if x.device.type == "cuda":
        if INTERPRETED:
            raise ValueError(f"{op}: TRITON_INTERPRET=1 runs kernels on CPU tensors; got CUDA tensors")
    elif x.device.type == "cpu":
        if not INTERPRETED:
            raise ValueError(f"{op}: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before "
                             "`kernels` is first imported); put the tensors on CUDA")
        if x.dtype == torch.bfloat16:
            raise TypeError(f"{op}: the Triton interpreter has no bfloat16; use float32/float16 on CPU")
    else:
        raise ValueError(f"{op}: tensors must be on CUDA (or CPU under the interpreter), got {x.device}")


def check_dtype(op: str, dtype: torch.dtype, supported: tuple = SUPPORTED_DTYPES) -> None:
    """Raise unless `dtype` is one of `supported` (default: the set every kernel accepts)."""
    if dtype not in supported:
        names = ", ".join(str(d).replace("torch.", "") for d in supported)
        raise TypeError(f"{op}: dtype must be one of {names}, got {dtype}")
