"""The empirical optimal denoiser (mean shift) of Chen et al., and the scores it defines.

ALGORITHMS §5: for a dataset {y_i}, D*(x; sigma) = sum_i w_i y_i with w = softmax_i(-|x - y_i|^2 / 2 sigma^2),
an attention over the dataset. It is streamed over the dataset with an online softmax, so its memory
does not grow with the dataset size, and it is the exact score of the empirical law at every sigma.
"""
from __future__ import annotations

from typing import Callable

import torch

from .sde import VPSDE, as_time, bcast, vp_score_from_ve_denoiser

#: default working-memory budget of one chunk (logits + the chunk of data in the compute dtype)
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def _flat_data(data: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(data) or data.ndim < 2 or data.shape[0] < 1:
        raise ValueError(f"data must be a tensor of shape (M, ...) with M >= 1, got "
                         f"{tuple(data.shape) if torch.is_tensor(data) else type(data).__name__}")
    if not data.is_floating_point():
        raise TypeError(f"data must be floating point, got {data.dtype}")
    return data.reshape(data.shape[0], -1)


def _check_sigma(sigma, B: int, device) -> torch.Tensor:
    """sigma as a 0-d or (B,) float64 tensor on `device`; positivity checked without a device sync."""
    if torch.is_tensor(sigma):
        if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] != B):
            raise ValueError(f"sigma must be a scalar or have shape ({B},) (one per x), got shape {tuple(sigma.shape)}")
        if sigma.device.type == "cpu":
            if not bool((sigma > 0).all()):
                raise ValueError(f"sigma must be > 0 (D* at sigma = 0 is the nearest neighbour, not defined here), "
                                 f"got min {float(sigma.min())}")
        else:  # a device assert, not a host sync: this runs inside sampling loops
            torch._assert_async((sigma > 0).all(), "optimal_denoiser: sigma must be > 0")
        return sigma.to(device=device, dtype=torch.float64)
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (D* at sigma = 0 is the nearest neighbour, not defined here), got {sigma}")
    return torch.tensor(sigma, dtype=torch.float64, device=device)


def auto_chunk(B: int, D: int, M: int, itemsize: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Rows of data per chunk so that a chunk's logits and weights (B, c) and two (c, D) copies of its
    data (the cast chunk and a temporary) fit in `memory_budget` bytes."""
    per_row = itemsize * (2 * D + 2 * B)
    return int(max(1, min(M, memory_budget // per_row)))


def optimal_denoiser(x: torch.Tensor, sigma, data: torch.Tensor, chunk: int | None = None, *,
                     compute_dtype: torch.dtype = torch.float64, center: torch.Tensor | None = None,
                     memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """D*(x; sigma) = sum_i softmax_i((x . y_i - |y_i|^2 / 2) / sigma^2) y_i  (ALGORITHMS §5, Chen et al. eq. mean shift).

    x: (B, ...); sigma: python float, 0-d tensor or (B,); data: (M, ...) with the same feature shape,
    on any device (chunks are moved to x's device as they stream, so the dataset may stay on the host).
    The dataset is read in chunks of `chunk` rows (None: from `memory_budget`) with an online softmax
    (running max, running sum, running weighted sum), so memory is O(B * (D + chunk)), not O(B * M).

    Precision: the logits are large (|y|^2 / sigma^2 ~ 1e9 at sigma = 0.002 for images) and the
    softmax depends only on their differences, so they are computed in `compute_dtype` (float64 by
    default) after subtracting `center` (default: the data mean) from x and y, which leaves every
    |x - y_i| unchanged but shrinks the magnitudes that cancel. Returns x's shape and dtype.
    """
    if not torch.is_tensor(x) or x.ndim < 2:
        raise ValueError(f"x must be a tensor of shape (B, ...), got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    Y = _flat_data(data)
    if tuple(data.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"x has feature shape {tuple(x.shape[1:])} but data has {tuple(data.shape[1:])}")
    if compute_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
    B, M = x.shape[0], Y.shape[0]
    D = Y.shape[1]
    dev = x.device
    itemsize = torch.finfo(compute_dtype).bits // 8
    if chunk is None:
        chunk = auto_chunk(B, D, M, itemsize, memory_budget)
    elif isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
    chunk = int(chunk)
    sig = _check_sigma(sigma, B, dev)
    inv_s2 = (1.0 / sig ** 2).to(compute_dtype)
    inv_s2 = inv_s2[:, None] if inv_s2.ndim == 1 else inv_s2

    if center is None:
        center = Y.mean(0, dtype=torch.float64) if Y.dtype != torch.float64 else Y.mean(0)
    c = center.reshape(-1).to(device=dev, dtype=compute_dtype)
    xq = x.reshape(B, -1).to(compute_dtype) - c
    run_max = torch.full((B, 1), -torch.inf, dtype=compute_dtype, device=dev)
    run_sum = torch.zeros((B, 1), dtype=compute_dtype, device=dev)
    acc = torch.zeros((B, D), dtype=compute_dtype, device=dev)
    for start in range(0, M, chunk):
        y = Y[start:start + chunk].to(device=dev, dtype=compute_dtype) - c
        logits = (xq @ y.T - 0.5 * (y * y).sum(1)[None]) * inv_s2  # (B, c)
        new_max = torch.maximum(run_max, logits.amax(1, keepdim=True))
        rescale = torch.exp(run_max - new_max)  # exp(-inf) = 0 on the first chunk
        p = torch.exp(logits - new_max)
        run_sum = run_sum * rescale + p.sum(1, keepdim=True)
        acc = acc * rescale + p @ y
        run_max = new_max
    out = acc / run_sum + c
    return out.reshape(x.shape).to(x.dtype)


def optimal_score(data: torch.Tensor, chunk: int | None = None, **kw) -> Callable:
    """VE score of the empirical law blurred by N(0, sigma^2 I): s(x, sigma) = (D*(x; sigma) - x) / sigma^2."""
    def score_fn(x, sigma):
        sig = as_time(sigma).to(x.device)
        return (optimal_denoiser(x, sigma, data, chunk, **kw) - x) / bcast(sig * sig, x)

    return score_fn


def optimal_vp_score(data: torch.Tensor, sde: VPSDE | None = None, chunk: int | None = None, **kw) -> Callable:
    """The exact VP score of the empirical law at forward time t (ALGORITHMS §5 mapping), as a `score_fn(x, t)`.

    x_VP = alpha_t x_VE with sigma = sigma_t / alpha_t, and x_VP | x_0 ~ N(alpha_t x_0, sigma_t^2 I), so by
    Tweedie s_VP(x, t) = (alpha_t D*(x / alpha_t; sigma_t / alpha_t) - x) / sigma_t^2. Usable by
    `wgfcore.sample` directly (t of shape (B,) in (0, 1]).
    """
    return vp_score_from_ve_denoiser(lambda x, sigma: optimal_denoiser(x, sigma, data, chunk, **kw), sde)


def optimal_vp_denoiser(data: torch.Tensor, sde: VPSDE | None = None, chunk: int | None = None, **kw) -> Callable:
    """E[x_0 | x_t = x] for the empirical law in VP coordinates: D*(x / alpha_t; sigma_t / alpha_t)."""
    sde = sde or VPSDE()

    def denoiser(x, t):
        t = as_time(t).to(x.device)
        a = sde.alpha(t)
        return optimal_denoiser(x / bcast(a, x), sde.sigma(t) / a, data, chunk, **kw)

    return denoiser


__all__ = ["optimal_denoiser", "optimal_score", "optimal_vp_score", "optimal_vp_denoiser", "auto_chunk",
           "DEFAULT_MEMORY_BUDGET"]
