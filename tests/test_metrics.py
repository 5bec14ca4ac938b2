"""Metrics (ALGORITHMS §7): Bures W2, exact empirical W2 (POT), pytorch-fid's Frechet distance."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from scipy.optimize import linear_sum_assignment

from wgfcore.metrics import frechet_distance, frechet_distance_features, gaussian_fit, w2_empirical, w2_gaussian


@given(m1=st.floats(-3, 3), m2=st.floats(-3, 3), s1=st.floats(0.1, 3), s2=st.floats(0.1, 3))
def test_w2_gaussian_1d(m1, m2, s1, s2):
    assert w2_gaussian([m1], [[s1 ** 2]], [m2], [[s2 ** 2]]) == pytest.approx(
        np.hypot(m1 - m2, s1 - s2), abs=1e-9)


def test_w2_gaussian_commuting_covariances_and_symmetry():
    S1, S2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert w2_gaussian([0, 0], S1, [1, 0], S2) == pytest.approx(np.sqrt(1 + (1 - 3) ** 2 + (2 - 1) ** 2))
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    P, Q = A @ A.T, B @ B.T
    assert w2_gaussian(np.zeros(3), P, np.ones(3), Q) == pytest.approx(w2_gaussian(np.ones(3), Q, np.zeros(3), P))
    # the Frechet distance is the squared Bures W2
    assert frechet_distance(np.zeros(3), P, np.ones(3), Q) == pytest.approx(
        w2_gaussian(np.zeros(3), P, np.ones(3), Q) ** 2, rel=1e-6)


@given(n=st.integers(2, 30), d=st.integers(1, 4), seed=st.integers(0, 1000))
def test_w2_empirical_is_the_optimal_assignment(n, d, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 1
    C = ((x[:, None] - y[None]) ** 2).sum(-1)
    r, c = linear_sum_assignment(C)
    assert w2_empirical(x, y) == pytest.approx(np.sqrt(C[r, c].mean()), rel=1e-9)
    assert w2_empirical(torch.from_numpy(x), torch.from_numpy(x)) == 0.0


def test_w2_empirical_converges_to_bures_for_gaussians():
    g = np.random.default_rng(0)
    x = g.normal(size=(2000, 2))
    y = g.normal(size=(2000, 2)) * 2 + 3
    exact = w2_gaussian([0, 0], np.eye(2), [3, 3], 4 * np.eye(2))
    assert w2_empirical(x, y) == pytest.approx(exact, rel=0.05)


def test_fit_and_feature_frechet():
    f = np.random.default_rng(1).normal(size=(500, 4))
    m, S = gaussian_fit(f)
    assert m.shape == (4,) and S.shape == (4, 4)
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance_features(f, f + 1) == pytest.approx(4.0, rel=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="feature size"):
        w2_empirical(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        w2_empirical(np.full((3, 2), np.nan), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="shapes"):
        w2_gaussian([0], [[1]], [0, 0], np.eye(2))
