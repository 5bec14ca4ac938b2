"""EDM samplers over sigma, ODE-jump, trajectories, the VP <-> VE mapping and trajectory statistics
(ALGORITHMS §5, Chen et al.)."""
import math

import pytest
import torch

from wgfcore.denoisers import optimal_denoiser, optimal_vp_score
from wgfcore.edm import (edm_euler, edm_heun, ode_jump, trajectories, ve_denoiser_from_vp, vp_denoiser_from_score,
                         vp_score_from_ve_denoiser)
from wgfcore.geometry import deviation, nearest_neighbour, nn_distance_trajectory, turning_angle, typical_spacing
from wgfcore.ops import time_grid
from wgfcore.sample import heun_ode
from wgfcore.scores import GaussianMixture
from wgfcore.sde import VPSDE, karras_sigmas



M0, S0 = 0.3, 0.5  # data N(M0, S0^2 I)


def gauss_denoiser(x, sigma):
    """Exact D for Gaussian data: m + s0^2 / (s0^2 + sigma^2) (x - m)."""
    return M0 + S0 ** 2 / (S0 ** 2 + sigma[:, None] ** 2) * (x - M0)


def gauss_exact(x0, sigma0, sigma1):
    """The PF-ODE is linear here: x - m scales by sqrt((s0^2 + sigma^2) / (s0^2 + sigma0^2))."""
    return M0 + (x0 - M0) * math.sqrt((S0 ** 2 + sigma1 ** 2) / (S0 ** 2 + sigma0 ** 2))


def observed_orders(sampler, Ns):
    g = torch.Generator().manual_seed(0)
    x0 = 80.0 * torch.randn(16, 3, generator=g, dtype=torch.float64)
    errs = []
    for N in Ns:
        sig = karras_sigmas(N)[:-1]  # end at sigma_min > 0 so that every step is a Heun step
        x = sampler(gauss_denoiser, x0, sig)
        errs.append(float((x - gauss_exact(x0, 80.0, float(sig[-1]))).abs().max()))
    return errs, [math.log2(a / b) for a, b in zip(errs[:-1], errs[1:])]


def test_heun_is_second_order():
    # Heun's global error is C h^2 + O(h^3), so log2(e_N / e_2N) = 2 + O(1/N). On the Karras grid
    # (sigma 80 -> 0.002, rho = 7) the measured orders are 2.45, 2.20, 2.10, 2.05 from N = 8 to 128:
    # from N = 32 on they sit within 0.15 of 2; the band [1.8, 2.2] excludes orders 1 and 3.
    errs, orders = observed_orders(edm_heun, [32, 64, 128])
    assert all(1.8 <= p <= 2.2 for p in orders), (errs, orders)
    assert errs[-1] < 2e-3  # measured 1.0e-3 on endpoints of size ~1 (x_0 ~ 80 N(0, I) shrinks by s0/80)


def test_euler_is_first_order():
    # The same measurement on Euler gives ~1: the check above really distinguishes orders.
    errs, orders = observed_orders(edm_euler, [64, 128, 256])
    assert all(0.8 <= p <= 1.2 for p in orders), (errs, orders)


def test_last_step_to_zero_is_euler_and_callback_carries_both_trajectories():
    calls = []

    def den(x, sigma):
        calls.append(sigma.clone())
        return gauss_denoiser(x, sigma)

    sig = karras_sigmas(10)
    x0 = 80.0 * torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    infos = []
    x = edm_heun(den, x0, sig, callback=infos.append)
    assert len(calls) == 2 * 10 - 1  # no correction on the step to sigma = 0
    assert all(float(c.min()) > 0 for c in calls) and all(c.shape == (5,) for c in calls)
    assert [i["i"] for i in infos] == list(range(10)) and sum(i["nfe"] for i in infos) == 19
    last = infos[-1]
    assert last["sigma_next"] == 0.0 and "x_pred" not in last
    assert torch.equal(x, last["x"]) and torch.allclose(x, last["denoised"], atol=1e-12)  # x_N = D(x_{N-1})
    for a, b in zip(infos[:-1], infos[1:]):
        assert torch.equal(a["x"], b["x_prev"])
    for info in infos:
        sigma_b = torch.full((5,), info["sigma"], dtype=torch.float64)
        assert torch.allclose(info["denoised"], gauss_denoiser(info["x_prev"], sigma_b), atol=1e-12)

    tr = trajectories(gauss_denoiser, x0, sig)
    assert tr["x"].shape == (11, 5, 3) and tr["denoised"].shape == (10, 5, 3)
    assert torch.equal(tr["x"][-1], x) and torch.equal(tr["x"][0], x0)
    # ODE-jump at step k is D(x_k; sigma_k) on that same trajectory
    for k in (0, 4, 9):
        assert torch.allclose(ode_jump(gauss_denoiser, x0, sig, k), tr["denoised"][k], atol=1e-12)
    assert torch.allclose(ode_jump(gauss_denoiser, x0, sig, 10), x, atol=1e-12)
    with pytest.raises(ValueError, match="k must be"):
        ode_jump(gauss_denoiser, x0, sig, 11)


def test_sigma_grid_and_denoiser_output_are_checked():
    x = torch.randn(2, 3)
    for bad in (torch.tensor([1.0, 2.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0]),
                torch.tensor([[1.0, 0.5]]), torch.tensor([1.0, -0.5])):
        with pytest.raises(ValueError, match="sigmas"):
            edm_heun(gauss_denoiser, x, bad)
    with pytest.raises(ValueError, match="denoiser returned"):
        edm_euler(lambda x, s: x[:, :2], x, karras_sigmas(3))
    with pytest.raises(FloatingPointError):
        edm_euler(lambda x, s: x * float("nan"), x, karras_sigmas(3))


def test_memorisation_optimal_denoiser_lands_on_training_samples():
    # Chen et al.: with the exact empirical score the PF-ODE reproduces training samples. 400 digits
    # (8x8 in [-1, 1]) have median nearest-neighbour spacing ~2.1; Heun (N = 18, Karras sigma 80 -> 0.002)
    # lands within 1e-12 of a training image (measured: ~2e-16, float64 rounding).
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    data = torch.tensor(load_digits().images[:400], dtype=torch.float64) / 8.0 - 1.0
    spacing = typical_spacing(data)
    g = torch.Generator().manual_seed(2)
    x0 = 80.0 * torch.randn(32, 8, 8, generator=g, dtype=torch.float64)
    tr = trajectories(lambda x, s: optimal_denoiser(x, s, data, chunk=128), x0, karras_sigmas(18))
    nn, idx = nearest_neighbour(tr["x"][-1], data)
    assert float(spacing.median()) > 1.5
    assert float(nn.max()) < 1e-12 * float(spacing.median())
    assert idx.unique().numel() > 16  # different noises go to different training images, not one mode
    # the denoising trajectory reaches the training sample before the sampling trajectory does
    d_nn = nn_distance_trajectory(tr["denoised"], data)
    x_nn = nn_distance_trajectory(tr["x"][:-1], data)
    assert bool((d_nn <= x_nn + 1e-12).all())
    # Chen et al.'s quasi-linear sampling trajectory: deviation small against the chord |x_N - x_0|
    chord = (tr["x"][-1] - tr["x"][0]).flatten(1).norm(dim=1)
    assert float((deviation(tr["x"]).max(0).values / chord).max()) < 0.05


def _mixture():
    return GaussianMixture(torch.tensor([[1.0, 0.5], [-1.0, -0.5]]), stds=torch.tensor([0.3, 0.2]),
                           weights=torch.tensor([0.3, 0.7]))


def test_vp_ve_denoiser_mapping_is_exact():
    # Independent route: the VE marginal of the mixture is sum_k w_k N(m_k, S_k + sigma^2 I), whose score
    # at "VP time 0" (alpha = 1, sigma_t = 0) is its own score; D = x + sigma^2 s_VE (Tweedie in VE).
    sde, gm = VPSDE(), _mixture()
    g = torch.Generator().manual_seed(3)
    via_score = vp_denoiser_from_score(gm.score_fn(sde), sde)
    via_den = ve_denoiser_from_vp(lambda x, t: gm.denoiser(x, t, sde), sde)
    for sigma in (0.01, 0.3, 2.0, 50.0):
        x = math.sqrt(1 + sigma ** 2) * torch.randn(64, 2, generator=g, dtype=torch.float64)
        ve = GaussianMixture(gm.means, gm.covs + sigma ** 2 * torch.eye(2, dtype=torch.float64), gm.weights)
        ref = x + sigma ** 2 * ve.score(x, 0.0)
        s_b = torch.full((64,), sigma, dtype=torch.float64)
        tol = 1e-13 * (1 + sigma ** 2)  # float64 rounding of x_VP = alpha x and of the division by alpha
        assert (via_score(x, s_b) - ref).abs().max() < tol
        assert (via_den(x, s_b) - ref).abs().max() < tol


def test_vp_pf_ode_and_edm_heun_reach_the_same_endpoints():
    # The same ODE in two coordinates: VP Heun (wgfcore.sample.heun_ode) on t_i, EDM Heun on
    # sigma_i = sigma_{t_i} / alpha_{t_i} from x_VE = x_VP / alpha_1; compare alpha_eps x_VE with x_VP.
    # The gap is the difference of two O(h^2) discretisation errors: it must shrink ~4x per doubling
    # (measured 1.1e-3, 2.9e-4, 6.9e-5 at N = 100, 200, 400).
    sde, gm = VPSDE(), _mixture()
    x1 = torch.randn(128, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    den = vp_denoiser_from_score(gm.score_fn(sde), sde)
    gaps = []
    for N in (100, 200):
        ts = time_grid(N, 1e-3)
        x_vp = heun_ode(gm.score_fn(sde), x1, ts, sde=sde)
        x_ve = edm_heun(den, x1 / sde.alpha(ts[0]), sde.ve_sigma(ts))
        gaps.append(float((sde.alpha(ts[-1]) * x_ve - x_vp).abs().max()))
    assert gaps[1] < 1e-3
    assert 3.0 < gaps[0] / gaps[1] < 5.0, gaps


def test_vp_score_from_ve_denoiser_round_trip():
    sde = VPSDE()
    g = torch.Generator().manual_seed(5)
    data = torch.randn(40, 3, generator=g, dtype=torch.float64)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    s1 = vp_score_from_ve_denoiser(lambda x, s: optimal_denoiser(x, s, data), sde)(x, t)
    s2 = optimal_vp_score(data, sde)(x, t)
    assert (s1 - s2).abs().max() < 1e-10 * (1 + s2.abs().max())
    # and back: the denoiser rebuilt from that score is D* again
    D = vp_denoiser_from_score(optimal_vp_score(data, sde), sde)(x, sde.ve_sigma(t))
    assert (D - optimal_denoiser(x, sde.ve_sigma(t), data)).abs().max() < 1e-9


def test_trajectory_statistics_on_known_paths():
    # A straight path: zero deviation and zero turning; a right-angled path: known values.
    line = torch.linspace(0, 1, 6, dtype=torch.float64)[:, None, None] * torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    assert deviation(line).abs().max() < 1e-12 and turning_angle(line).abs().max() < 1e-6
    corner = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 1.0]]], dtype=torch.float64)
    assert torch.allclose(deviation(corner)[:, 0], torch.tensor([0.0, 1 / math.sqrt(2), 0.0], dtype=torch.float64))
    assert torch.allclose(turning_angle(corner)[:, 0], torch.tensor([math.pi / 2], dtype=torch.float64))
    g = torch.Generator().manual_seed(6)
    pts, data = torch.randn(7, 2, 3, generator=g), torch.randn(50, 2, 3, generator=g)
    d, i = nearest_neighbour(pts, data, chunk=8)
    full = torch.cdist(pts.flatten(1).double(), data.flatten(1).double())
    assert torch.allclose(d, full.min(1).values) and torch.equal(i, full.argmin(1))
    with pytest.raises(ValueError, match="feature shape"):
        nearest_neighbour(pts, data.flatten(1))
