"""Trajectory statistics of Chen et al., *A Geometric Perspective on Diffusion Models* (ALGORITHMS §5).

Inputs are stacked trajectories of shape (N+1, B, ...) as returned by `wgfcore.edm.trajectories`:
deviation from the straight line through the endpoints, per-step turning angle, and the distance
of any set of points (e.g. the denoising outputs) to their nearest training sample.
"""
from __future__ import annotations

import torch


def _flat_traj(traj: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(traj) or traj.ndim < 3 or traj.shape[0] < 2:
        raise ValueError(f"a trajectory must have shape (N+1, B, ...) with N >= 1, got "
                         f"{tuple(traj.shape) if torch.is_tensor(traj) else type(traj).__name__}")
    return traj.reshape(traj.shape[0], traj.shape[1], -1).to(torch.float64)


def deviation(traj: torch.Tensor) -> torch.Tensor:
    """Perpendicular distance of each x_i from the line through x_0 and x_N (Chen et al. §3), (N+1, B), float64.

    Chen et al. find it small relative to |x_N - x_0| (a quasi-linear trajectory); divide by
    `(traj[-1] - traj[0]).flatten(1).norm(dim=1)` for the relative deviation.
    """
    X = _flat_traj(traj)
    chord = X[-1] - X[0]  # (B, D)
    u = chord / chord.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    v = X - X[0]
    along = (v * u).sum(-1, keepdim=True)
    return (v - along * u).norm(dim=-1)


def turning_angle(traj: torch.Tensor) -> torch.Tensor:
    """Angle (radians) between successive steps x_{i+1} - x_i and x_{i+2} - x_{i+1}, shape (N-1, B).

    A discrete curvature that does not depend on the step length, so it can be compared across the
    very unequal steps of a Karras grid; 0 for a straight trajectory.
    """
    X = _flat_traj(traj)
    if X.shape[0] < 3:
        raise ValueError("turning_angle needs at least 2 steps (N+1 >= 3 states)")
    d = X[1:] - X[:-1]
    a, b = d[:-1], d[1:]
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.arccos(cos.clamp(-1.0, 1.0))


def nearest_neighbour(points: torch.Tensor, data: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance (float64) and index of the nearest row of data (M, ...) for each of points (P, ...).

    The dataset is streamed in chunks of `chunk` rows through `torch.cdist` (exact mode, no matmul
    trick, so distances near 0 stay accurate: memorised samples are what this measures).
    """
    if points.shape[1:] != data.shape[1:]:
        raise ValueError(f"points have feature shape {tuple(points.shape[1:])}, data {tuple(data.shape[1:])}")
    if isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    P = points.reshape(points.shape[0], -1).to(torch.float64)
    best = torch.full((P.shape[0],), torch.inf, dtype=torch.float64, device=P.device)
    idx = torch.zeros(P.shape[0], dtype=torch.long, device=P.device)
    Y = data.reshape(data.shape[0], -1)
    for start in range(0, Y.shape[0], int(chunk)):
        y = Y[start:start + chunk].to(device=P.device, dtype=torch.float64)
        dist = torch.cdist(P, y, compute_mode="donot_use_mm_for_euclid_dist")
        dmin, j = dist.min(1)
        better = dmin < best
        best = torch.where(better, dmin, best)
        idx = torch.where(better, j + start, idx)
    return best, idx


def nn_distance_trajectory(traj: torch.Tensor, data: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Nearest-training-sample distance of every state of a trajectory (T, B, ...) -> (T, B)."""
    T, B = traj.shape[:2]
    d, _ = nearest_neighbour(traj.reshape(T * B, *traj.shape[2:]), data, chunk)
    return d.reshape(T, B)


def typical_spacing(data: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Distance from each training sample to its nearest *other* training sample, (M,) float64.

    Its median is the scale against which memorisation (NN distance of samples ~ 0) is judged.
    """
    Y = data.reshape(data.shape[0], -1).to(torch.float64)
    out = torch.empty(Y.shape[0], dtype=torch.float64, device=Y.device)
    for start in range(0, Y.shape[0], int(chunk)):
        q = Y[start:start + chunk]
        dist = torch.cdist(q, Y, compute_mode="donot_use_mm_for_euclid_dist")
        rows = torch.arange(q.shape[0], device=Y.device)
        dist[rows, rows + start] = torch.inf
        out[start:start + q.shape[0]] = dist.min(1).values
    return out


__all__ = ["deviation", "turning_angle", "nearest_neighbour", "nn_distance_trajectory", "typical_spacing"]
