"""Fused kernels for wgfcore: Triton (GPU) and the C++ sampler steps (CPU, `cpu_steps`, built with
ninja at first use). Imports only torch and triton (and its own C++ build); `cpu_steps` needs no triton.

Without a CUDA device the Triton kernels run in Triton's interpreter: a correctness mode, not a
performance path. TRITON_INTERPRET must be set before any @triton.jit function is defined,
so it is decided here, when the package is first imported.
"""
import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = _os.environ.get("TRITON_INTERPRET", "0") == "1"
