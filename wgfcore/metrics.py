"""Distances between distributions (ALGORITHMS §7).

W2 between Gaussians in closed form (Bures), exact empirical W2 by optimal transport (POT's
`ot.emd2`), and the Frechet distance of feature statistics through pytorch-fid's own
`calculate_frechet_distance` (not rewritten). FID itself (Inception features) is in train/fid.py.
"""
from __future__ import annotations

import numpy as np
import torch


def _np64(a) -> np.ndarray:
    if torch.is_tensor(a):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def _sqrtm_psd(S: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh(0.5 * (S + S.T))
    return (V * np.sqrt(np.clip(w, 0.0, None))) @ V.T


def _check_covariance(name: str, S: np.ndarray) -> None:
    """S must be finite, symmetric and positive semi-definite, up to float64 rounding of its entries."""
    if not np.isfinite(S).all():
        raise ValueError(f"w2_gaussian: {name} holds NaN or inf")
    scale = max(float(np.abs(S).max()), np.finfo(np.float64).tiny)
    if np.abs(S - S.T).max() > 1e-8 * scale:
        raise ValueError(f"w2_gaussian: {name} is not symmetric (max |S - S^T| = {np.abs(S - S.T).max():.3g}), "
                         "so it is not a covariance")
    w_min = float(np.linalg.eigvalsh(0.5 * (S + S.T)).min())
    if w_min < -1e-10 * S.shape[0] * scale:
        raise ValueError(f"w2_gaussian: {name} is not positive semi-definite (smallest eigenvalue {w_min:.4g}), "
                         "so it is not a covariance")


def w2_gaussian(m1, S1, m2, S2) -> float:
    """W2(N(m1, S1), N(m2, S2)) = sqrt(|m1 - m2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2))."""
    m1, S1, m2, S2 = map(_np64, (m1, S1, m2, S2))
    if m1.shape != m2.shape or S1.shape != S2.shape or S1.shape != (m1.size, m1.size):
        raise ValueError(f"shapes do not match: m1 {m1.shape}, S1 {S1.shape}, m2 {m2.shape}, S2 {S2.shape}")
    if not (np.isfinite(m1).all() and np.isfinite(m2).all()):
        raise ValueError("w2_gaussian: the means hold NaN or inf")
    _check_covariance("S1", S1)
    _check_covariance("S2", S2)
    r1 = _sqrtm_psd(S1)
    cross = _sqrtm_psd(r1 @ S2 @ r1)
    d2 = float(np.sum((m1 - m2) ** 2) + np.trace(S1) + np.trace(S2) - 2.0 * np.trace(cross))
    return float(np.sqrt(max(d2, 0.0)))


def gaussian_fit(x) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean and covariance (float64) of x with shape (n, d) or (n, ...)."""
    x = _np64(x).reshape(len(x), -1)
    if x.shape[0] < 2:
        raise ValueError("need at least 2 samples to fit a covariance")
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def w2_empirical(x, y, *, num_itermax: int = 1_000_000) -> float:
    """Exact W2 between the empirical measures of x (n, d) and y (m, d) with uniform weights (POT)."""
    import ot
    from scipy.spatial.distance import cdist

    x, y = _np64(x), _np64(y)
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature size, got {x.shape[1]} and {y.shape[1]}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("w2_empirical got non-finite samples")
    M = cdist(x, y, "sqeuclidean")  # direct differences: exact zeros where x_i = y_j (ot.dist expands)
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    return float(np.sqrt(max(ot.emd2(a, b, M, numItermax=num_itermax), 0.0)))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance of two feature Gaussians, via pytorch-fid's `calculate_frechet_distance`."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    return float(calculate_frechet_distance(_np64(mu1), _np64(sigma1), _np64(mu2), _np64(sigma2)))


def frechet_distance_features(f1, f2) -> float:
    """Frechet distance between two sets of features (n, k), fitting a Gaussian to each."""
    return frechet_distance(*gaussian_fit(f1), *gaussian_fit(f2))


__all__ = ["w2_gaussian", "gaussian_fit", "w2_empirical", "frechet_distance", "frechet_distance_features"]
