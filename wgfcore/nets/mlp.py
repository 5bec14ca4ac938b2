"""Small time-conditioned MLPs for toy data (Kwon et al.'s 3x64 softplus network, ALGORITHMS §6)."""
from __future__ import annotations

import math

import torch
from torch import nn

_ACTS = {"softplus": nn.Softplus, "silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """f(x, t) -> R^dim: x and a sinusoidal embedding of forward time t, through `depth` hidden layers.

    Serves as an epsilon-network or a projection network T for data of shape (B, dim).
    """

    def __init__(self, dim: int, hidden: int = 64, depth: int = 3, act: str = "softplus", t_embed: int = 16):
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
        if dim < 1 or hidden < 1 or depth < 1 or t_embed < 2 or t_embed % 2:
            raise ValueError("need dim, hidden, depth >= 1 and an even t_embed >= 2")
        self.dim, self.t_embed = dim, t_embed
        layers, width = [], dim + t_embed
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), _ACTS[act]()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)
        freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), t_embed // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
        ang = t[:, None] * self.freqs.to(x.dtype)[None]
        return self.net(torch.cat([x, torch.sin(ang), torch.cos(ang)], dim=1))


__all__ = ["MLP"]
