"""Chen et al.'s statistics on a trained model (`train/run.py chen`, train/experiments/chen_trajectories.py,
ALGORITHMS §5): the score deviation, the path statistics against closed forms, ODE-jump outputs, the run
loader and its errors, and one end-to-end run on a tiny untrained U-Net. Also the memorising study
(`train/run.py chen-optimal`)."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from train.engine.checkpoint import save_checkpoint, training_state
from train.engine.config import Config
from train.engine.distributed import Dist
from train.engine.networks import build_nets
from train.experiments import chen_trajectories as ct
from train.run import main
from wgfcore.denoisers import optimal_denoiser
from wgfcore.edm import ode_jump, trajectories
from wgfcore.geometry import score_deviation
from wgfcore.sde import VPSDE, karras_sigmas

TINY_NET = {"model_channels": 8, "head_channels": 8, "channel_mult": [1, 2]}


def tiny_run(path, step=3, iterations=3, weights_net=None, **cfg_over):
    """A run folder in train/run.py's layout (config.json, checkpoints/last.pt, a training checkpoint)
    holding untrained tiny U-Nets (with `weights_net`, the weights of a U-Net of those `net` arguments)."""
    cfg = {"dataset": "digits", "preset": "tiny", "net": TINY_NET, "resolution": 16, "channels": 1,
           "iterations": iterations, "batch_size": 8, "lr": 1e-3, "ema_decay": 0.9, "delta_tau": 0.05,
           "proj_weight": 1.0, "num_workers": 0, "log_every": 1, "ckpt_every": 1, "grad_clip": 1.0, "seed": 0,
           "eval": {"metric": "digits-fd", "rows": ["em"], "steps": [2], "samples": 4, "batch": 4,
                    "classifier_epochs": 1}, **cfg_over}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    c = Config.from_dict(cfg)
    eps, proj = build_nets(c if weights_net is None else c.with_changes(net=weights_net))
    opt = torch.optim.Adam(list(eps.parameters()) + list(proj.parameters()))
    save_checkpoint(training_state(step, c, Dist(), eps, proj, eps, proj, opt, {}), path / "checkpoints", step)
    return path, eps


# --- score deviation --------------------------------------------------------------------------------

def test_score_deviation_closed_form():
    # D_a = D_b + c: rms = |c| / sqrt(d) exactly, and relative = |s_a - s_b| / |s_b| with s = (D - x) / sigma^2
    g = torch.Generator().manual_seed(1)
    x, Db = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    c = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    rms, rel = score_deviation(Db + c, Db, x)
    assert rms.shape == (5,) and torch.allclose(rms, c.norm().expand(5) / math.sqrt(18), rtol=1e-13)
    sigma = 0.37
    s_a, s_b = (Db + c - x) / sigma ** 2, (Db - x) / sigma ** 2
    expect = (s_a - s_b).flatten(1).norm(dim=1) / s_b.flatten(1).norm(dim=1)
    assert torch.allclose(rel, expect, rtol=1e-12)
    # (T, B, ...) stacks with batch_dims=2 give the same numbers per state
    rms2, rel2 = score_deviation((Db + c)[None].expand(3, -1, -1, -1, -1), Db[None].expand(3, -1, -1, -1, -1),
                                 x[None].expand(3, -1, -1, -1, -1), batch_dims=2)
    assert rms2.shape == (3, 5) and torch.allclose(rms2[2], rms) and torch.allclose(rel2[1], rel)
    with pytest.raises(ValueError, match="one shape"):
        score_deviation(Db, Db[:4], x)
    with pytest.raises(ValueError, match="batch_dims"):
        score_deviation(Db, Db, x, batch_dims=3)


# --- path statistics against closed forms -----------------------------------------------------------------

def test_path_statistics_single_training_sample_is_an_exact_straight_line():
    # With one training sample y, D*(x; sigma) = y at every x, so the PF-ODE dx/dsigma = (x - y)/sigma has
    # the solution x(sigma) = y + (sigma / sigma_0)(x_0 - y): linear in sigma, so Heun (and the final Euler
    # step to sigma = 0) are exact. Closed forms: deviation 0, |x_i - x_N| = (sigma_i / sigma_0)|x_0 - y|,
    # D(x_i) = y = x_N, and x_N is a copy of y.
    y = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    sig = karras_sigmas(7)
    g = torch.Generator().manual_seed(2)
    x0 = 80.0 * torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    tr = trajectories(lambda x, s: optimal_denoiser(x, s, y), x0, sig)
    st = ct.path_statistics(tr, y)
    eps = torch.finfo(torch.float64).eps
    assert np.abs(st["rel_dev"]).max() < 100 * eps
    r0 = ((x0 - y).flatten(1).norm(dim=1) / 4.0).numpy()  # rms over d = 16 coordinates
    expect = (sig.numpy()[:, None] / 80.0) * r0[None]
    assert np.allclose(st["x_to_end"], expect, rtol=1e-12, atol=1e-12 * r0.max())
    assert np.abs(st["d_to_end"]).max() < 1e-12 and np.abs(st["nn_end"]).max() < 1e-12
    assert np.abs(st["angle"]).max() < 1e-5  # arccos near 1 resolves angles only to ~sqrt(eps)


def test_path_statistics_turning_and_deviation_on_a_known_corner():
    # x: 0 -> (1, 0) -> (1, 1): relative deviation of the middle state 1/sqrt(2) / sqrt(2) = 1/2, angle 90 deg
    X = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 1.0]]], dtype=torch.float64)
    tr = {"x": X, "denoised": X[1:], "sigmas": torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)}
    st = ct.path_statistics(tr, torch.tensor([[1.0, 1.0], [5.0, 5.0]], dtype=torch.float64))
    assert np.allclose(st["rel_dev"][:, 0], [0.0, 0.5, 0.0]) and np.allclose(st["angle"], 90.0)
    assert np.allclose(st["x_to_end"][:, 0], [1.0, 1 / math.sqrt(2), 0.0])  # rms over 2 coordinates
    assert st["nn_end"][0] == 0.0 and st["spacing"] == pytest.approx(4 * math.sqrt(2))


# --- the trained-model denoiser, ODE jumps ------------------------------------------------------------------

def test_unet_denoiser_is_tweedie_at_the_matching_vp_time(tmp_path):
    _, net = tiny_run(tmp_path / "r")
    D = ct.unet_denoiser(net.eval(), batch=2)
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(5, 1, 16, 16, generator=g), torch.tensor([80.0, 3.0, 0.5, 0.05, 0.002])
    # independent reference: the VP time whose sigma_t / alpha_t is sigma, found by bisection, then
    # E[x_0 | x_t] = (x_t - sigma_t eps) / alpha_t at x_t = alpha_t x
    sde = VPSDE()
    lo, hi = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    for _ in range(80):
        mid = (lo + hi) / 2
        big = sde.ve_sigma(mid) > sigma.double()
        hi, lo = torch.where(big, mid, hi), torch.where(big, lo, mid)
    t = ((lo + hi) / 2).float()
    a, s = sde.alpha(t).float()[:, None, None, None], sde.sigma(t).float()[:, None, None, None]
    with torch.no_grad():
        ref = (a * x - s * net(a * x, t)) / a
    out = D(x, sigma)
    # float32 network: the two t's agree to float32 rounding; compare at a few float32 ulps of |D|
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_jumps_are_the_denoising_trajectory_and_the_last_jump_is_the_full_sample(tmp_path):
    _, net = tiny_run(tmp_path / "r")
    D = ct.unet_denoiser(net.eval())
    sig = karras_sigmas(4)
    x0 = 80.0 * torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    tr = trajectories(D, x0, sig)
    for k in range(4):  # the same Heun steps then one D: the same floating-point operations
        assert torch.equal(ode_jump(D, x0, sig, k), tr["denoised"][k]), k
    # the last step to sigma = 0 is Euler: x_N = x + (0 - s)(x - D)/s = D up to rounding of x - (x - D)
    xN, last = tr["x"][-1], tr["denoised"][-1]
    ulp = torch.finfo(torch.float32).eps * float(tr["x"][-2].abs().max() + last.abs().max())
    assert (xN - last).abs().max() <= 2 * ulp


# --- digits-FD with noise ---------------------------------------------------------------------------------------

def test_fd_bootstrap_is_paired_and_finds_the_first_jump_within_noise():
    g = torch.Generator().manual_seed(5)
    ref_f = torch.randn(400, 3, generator=g, dtype=torch.float64)
    a = torch.randn(200, 3, generator=g, dtype=torch.float64) * 1.5
    c = torch.tensor([0.4, 0.0, 0.0], dtype=torch.float64)
    q = ct.fd_with_noise({"a": a, "copy": a.clone(), "shift": a + c}, ct.gaussian_fit(ref_f), 20, 0, paired_to="a")
    # the same trajectories resampled together: a copy differs by exactly 0 in every resample
    assert q["copy"]["diff"] == 0 and q["copy"]["lo"] == 0 and q["copy"]["hi"] == 0
    # a shift leaves the covariance alone: FD rises by |mu + c - mu_r|^2 - |mu - mu_r|^2 exactly
    mu, mu_r = a.mean(0), ref_f.mean(0)
    expect = float((mu + c - mu_r).norm() ** 2 - (mu - mu_r).norm() ** 2)
    assert q["shift"]["diff"] == pytest.approx(expect, rel=1e-8, abs=1e-10)
    assert q["shift"]["lo"] <= q["shift"]["diff"] <= q["shift"]["hi"] and q["a"]["se"] > 0
    q2 = {k: {"lo": lo} for k, lo in zip("pqrs", (0.5, -0.1, 0.2, -0.3))}
    assert ct.first_within_noise(q2, list("pqrs")) == 3
    assert ct.first_within_noise({"p": {"lo": 0.1}}, ["p"]) is None


# --- the command ---------------------------------------------------------------------------------------------------

def _main_err(argv, capsys):
    try:
        rc = main(["chen", *argv])
    except SystemExit as e:  # argparse's own errors (one line: train.engine.cli.Parser)
        rc = e.code
    err = capsys.readouterr().err.strip()
    return rc, err


def test_command_errors_are_one_line_exit_2(tmp_path, capsys):
    cases = [([], "--run"), (["--run", str(tmp_path / "nope")], "no such folder"),
             (["--run", str(tmp_path)], "no readable checkpoint")]
    r, _ = tiny_run(tmp_path / "unfinished", step=1, iterations=3)
    cases.append((["--run", str(r)], "not finished"))
    empty = tmp_path / "starting"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"preset": "tiny", "resolution": 16, "channels": 1, "iterations": 3}))
    cases.append((["--run", str(empty)], "no readable checkpoint"))
    rgb, _ = tiny_run(tmp_path / "rgb", dataset="svhn", channels=3,
                      eval={"metric": "fid", "rows": ["em"], "steps": [2], "samples": 4, "batch": 4})
    cases.append((["--run", str(rgb)], "digits-FD is defined for the 1x16x16 digits"))
    wide, _ = tiny_run(tmp_path / "wide", weights_net={**TINY_NET, "model_channels": 16})
    cases.append((["--run", str(wide)], "do not fit"))  # the checkpoint's weights are not its config's network
    cases.append((["--run", str(r), "--steps", "1"], "--steps"))
    for argv, needle in cases:
        rc, err = _main_err(argv, capsys)
        assert rc == 2 and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
    cfg, net, step = ct.load_digits_run(r, allow_unfinished=True)
    assert step == 1 and cfg.iterations == 3


def test_command_end_to_end_on_a_tiny_untrained_unet(tmp_path, monkeypatch):
    from train.evaluation import digits_classifier

    # an untrained feature net stands in for the classifier (its training is train/'s business, and slow)
    monkeypatch.setattr(digits_classifier, "train_classifier", lambda *a, **k: (digits_classifier.DigitsNet(1, 16), 0.1))
    run, _ = tiny_run(tmp_path / "runs" / "tiny")
    out, figs, md = tmp_path / "out", tmp_path / "figs", tmp_path / "docs" / "chen.md"
    N = 3
    rc = main(["chen", "--run", str(run), "--out", str(out), "--figures", str(figs), "--markdown", str(md),
               "--samples", "40", "--steps", str(N), "--bootstrap", "5", "--floor-draws", "3", "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "chen.csv")))
    assert [int(r["k"]) for r in rows] == list(range(N + 1))
    # the jump at the last step (k = N - 1, NFE 2N - 1) is the full sample: the same FD up to rounding
    last, full = rows[N - 1], rows[N]
    assert int(last["jump_nfe"]) == int(full["jump_nfe"]) == 2 * N - 1
    assert float(last["fd_jump"]) == pytest.approx(float(full["fd_xk"]), rel=1e-6)
    assert abs(float(last["fd_jump_minus_final"])) <= 1e-6 * float(full["fd_xk"])
    assert float(rows[0]["rel_dev_median"]) == 0.0 and float(rows[N]["rel_dev_median"]) < 1e-12  # endpoints on the chord
    # the optimal denoiser memorises: its final samples are training digits
    summ = json.loads((out / "chen_summary.json").read_text())
    assert summ["nn_end_median_spacings"]["opt"] < 1e-9 and summ["step"] == 3
    text = md.read_text()
    assert text == (out / "chen_results.md").read_text() and text.count("\n| ") == N + 2  # header + N + 1 rows
    # the two measures of D_theta's departure from D* are both named, with the sigma where each is extreme
    rms = [float(r["dtheta_dstar_rms_median"]) for r in rows[:N]]
    line = next(ln for ln in text.splitlines() if ln.startswith("- How far D_θ is from D*"))
    assert f"largest at σ = {float(rows[int(max(range(N), key=rms.__getitem__))]['sigma']):.3g}" in line
    assert "holds only for the relative measure" in line and "not tested here" in line
    for name in ct.FIGURES:
        assert (figs / name).stat().st_size > 1000
    assert (tmp_path / "runs" / ".cache").is_dir()  # the classifier cache is the one train/run.py uses


def test_chen_optimal_memorises_on_digits_and_2d(tmp_path):
    from train.experiments import chen_optimal
    from train.run import parser

    S = chen_optimal.study(parser().parse_args(["chen-optimal", "--out", str(tmp_path), "--steps", "4", "--n-digits",
                                                "3", "--n-2d-data", "20", "--n-2d", "3", "--no-progress"]))
    # at sigma_{N-1} = 0.002 the mean-shift weights are one-hot, and the last Euler step lands on D*: a
    # training sample to float64 rounding
    for s in S.values():
        assert s["nn_x"][-1].max() < 1e-9 * s["spacing"]
    assert (tmp_path / "geometry.csv").is_file()
