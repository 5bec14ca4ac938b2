"""wgfcore: score-based diffusion seen as Wasserstein gradient flows (Ghimire et al.).

Reference PyTorch implementations of the mathematics in ALGORITHMS.md. The public sampling API
is the module `wgfcore.sample` (`from wgfcore.sample import sample`); it is deliberately not
re-exported here, so that `import wgfcore.sample` always names the module. Fused Triton
kernels live in the separate `kernels` package and are used lazily (wgfcore runs without Triton).
"""
from . import ops, sde
from .sde import VESDE, VPSDE

__all__ = ["sde", "ops", "VPSDE", "VESDE"]
__version__ = "0.1.0"
