"""The step kernels' in-kernel Gaussian noise, written out in torch: its specification and CPU reference.

ALGORITHMS §2 (the c_z z term of a noisy step). z for element e of step `step` under `seed` comes from
Philox4x32-10 keyed by (seed, step); any backend that draws this noise must match `normal` here.
"""
from __future__ import annotations

import torch

__all__ = ["NOISE_R", "philox4x32", "normal", "transform_for"]

#: Counters per group: one Philox call yields four normals, which go to elements g*4R + k*R + r
#: (k = 0..3) of counter c = g*R + r, so a group holds 4R elements (see kernels/sampler_step.py).
NOISE_R = 1024

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers (Salmon et al. 2011)
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85      # Weyl increments of the key


def _mulhilo(a: int, b: torch.Tensor):
    """(high, low) 32-bit words of a * b, a a 32-bit constant, b int64 values in [0, 2**32)."""
    t = a * (b & 0xFFFF)   # < 2**48: no int64 overflow
    u = a * (b >> 16)      # < 2**48; a * b = u * 2**16 + t
    return (u + (t >> 16)) >> 16, (((u & 0xFFFF) << 16) + t) & _M32


def philox4x32(counter: torch.Tensor, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 on counters (counter, 0, 0, 0) with key (k0, k1): four int64 tensors of 32-bit words,
    exactly as triton.language.randint4x (c0 = the counter's low word, c1 = c2 = c3 = 0 for int32 counters)."""
    c0 = counter.to(torch.int64) & _M32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _randn4x_pair(w_r, w_a):
    """Triton's randn4x transform (fp32 and fp64 states): 31-bit uniforms, full-accuracy functions."""
    def uniform(w):
        x = torch.where(w >= 2**31, _M32 - w, w)  # int32(w) < 0 -> ~int32(w)
        return x.to(torch.float32) * _f32(4.6566127342e-10)
    u1 = torch.clamp_min(uniform(w_r), _f32(1.0e-7))
    theta = _f32(6.283185307179586) * uniform(w_a)
    r = torch.sqrt(_f32(-2.0) * torch.log(u1))
    return r * torch.cos(theta), r * torch.sin(theta)


def _box_muller16_pair(w_r, w_a):
    """The 16-bit states' transform: 24-bit uniforms, angle in [-pi, pi), log2."""
    u = ((w_r >> 8) + 1).to(torch.float32) * _f32(2.0**-24)                      # (0, 1]
    t = (torch.where(w_a >= 2**31, w_a - 2**32, w_a) >> 8).to(torch.float32) * _f32(2.0**-24)  # [-1/2, 1/2)
    theta = t * _f32(6.283185307179586)
    r = torch.sqrt(torch.clamp_min(torch.log2(u) * _f32(-1.3862943611198906), 0.0))
    return r * torch.cos(theta), r * torch.sin(theta)


def transform_for(dtype: torch.dtype) -> str:
    """"randn4x" for fp32/fp64 storage, "box_muller16" for fp16/bf16 storage."""
    if dtype in (torch.float32, torch.float64):
        return "randn4x"
    if dtype in (torch.float16, torch.bfloat16):
        return "box_muller16"
    raise TypeError(f"noise: no transform for storage dtype {dtype}; expected a float dtype")


def normal(seed: int, step: int, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """z for elements 0 .. numel-1 of a state stored in `dtype`, in float32, before rounding to `dtype`.

    The kernel stores round(c_z z) (plus the rest of the update) in the state's dtype; with c_z = 1
    and a zero rest, its output is `normal(...).to(dtype)` up to the last bits of log/sin/cos (and,
    for 16-bit states on a GPU, the hardware's approximate log2/sin/cos: about 2**-21).
    """
    if not (0 <= seed < 2**32 and 0 <= step < 2**32):
        raise ValueError(f"noise: seed and step must lie in [0, 2**32), got seed={seed}, step={step}")
    e = torch.arange(numel, dtype=torch.int64)
    g, k, r = e // (4 * NOISE_R), (e // NOISE_R) % 4, e % NOISE_R
    # Key (k0, k1) = (seed, step): the kernels pass seed | step << 32 as Philox's 64-bit seed.
    w = philox4x32(g * NOISE_R + r, seed, step)
    pair = _randn4x_pair if transform_for(dtype) == "randn4x" else _box_muller16_pair
    n0, n1 = pair(w[0], w[1])
    n2, n3 = pair(w[2], w[3])
    return torch.stack([n0, n1, n2, n3]).gather(0, k[None]).squeeze(0)
