"""Trajectory statistics of Chen et al., *A Geometric Perspective on Diffusion Models* (ALGORITHMS §5).

Inputs are stacked trajectories of shape (N+1, B, ...) as returned by `wgfcore.edm.trajectories`:
deviation from the straight line through the endpoints, per-step turning angle, the distance of any
set of points (e.g. the denoising outputs) to their nearest training sample, and the score deviation
between two denoisers evaluated at the same states.
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


def score_deviation(D_a: torch.Tensor, D_b: torch.Tensor, x: torch.Tensor,
                    batch_dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Chen et al.'s score deviation between two denoisers evaluated at the same states x.

    x, D_a = D_a(x; sigma), D_b = D_b(x; sigma) share one shape whose first `batch_dims` dims index
    states ((B, ...) batches: 1; (T, B, ...) trajectories: 2) and whose other dims are one state's
    features (d of them). Returns (rms, relative), float64, of shape x.shape[:batch_dims]:

    - rms = |D_a - D_b| / sqrt(d): the difference of the two denoising outputs per coordinate, in
      data units. The score difference is |D_a - D_b| / sigma^2 (s = (D - x) / sigma^2), which spans
      decades across sigma; the rms stays readable.
    - relative = |D_a - D_b| / |D_b - x| = |s_a - s_b| / |s_b|: sigma cancels, so it is the relative
      error of score a against the reference score b at that state.
    """
    if D_a.shape != x.shape or D_b.shape != x.shape:
        raise ValueError(f"D_a {tuple(D_a.shape)}, D_b {tuple(D_b.shape)} and x {tuple(x.shape)} must have one shape")
    if isinstance(batch_dims, bool) or batch_dims not in (1, 2) or x.ndim <= batch_dims:
        raise ValueError(f"batch_dims must be 1 or 2 and leave feature dims, got {batch_dims!r} for shape {tuple(x.shape)}")
    lead = x.shape[:batch_dims]
    a, b, xx = (t.reshape(*lead, -1).to(torch.float64) for t in (D_a, D_b, x))
    diff = (a - b).norm(dim=-1)
    ref = (b - xx).norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    return diff / a.shape[-1] ** 0.5, diff / ref


__all__ = ["deviation", "turning_angle", "nearest_neighbour", "nn_distance_trajectory", "typical_spacing",
           "score_deviation"]
