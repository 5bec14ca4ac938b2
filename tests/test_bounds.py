"""Kwon et al.'s score-matching objective J against the analytic mixture score (ALGORITHMS §6)."""
import math

import pytest
import torch

from wgfcore.bounds import score_matching_objective
from wgfcore.scores import kwon_mixture
from wgfcore.sde import VPSDE



SDE, MIX = VPSDE(), kwon_mixture()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_analytic_score_gives_zero():
    J, se = score_matching_objective(MIX.score_fn(SDE), MIX, SDE, n_t=64, n_x=64, generator=gen(),
                                     dtype=torch.float64)
    assert J == 0.0 and se == 0.0
    # in float32 the model's output is the float32 rounding of the truth: |err| ~ 1e-7 |s|, and
    # lambda |s|^2 = sigma_t^2 |s|^2 ~ d, so J ~ 1e-14
    J32, _ = score_matching_objective(MIX.score_fn(SDE), MIX, SDE, n_t=64, n_x=64, generator=gen())
    assert 0.0 <= J32 < 1e-11


@pytest.mark.parametrize("lam", ["sigma2", "g2"])
def test_constant_offset_matches_closed_form(lam):
    # s_theta = s + b makes the integrand lambda(t) |b|^2 for every x, so J = |b|^2 / 2 int_eps^T lambda dt:
    # for g2 the integral is 2 (B(T) - B(eps)), B = int beta; for sigma2, int (1 - exp(-2 B)) by
    # Simpson's rule on 2001 points (error ~1e-12). Monte Carlo over t only: within 4 standard errors.
    b = torch.tensor([0.3, -0.4], dtype=torch.float64)
    eps, T = 1e-3, 1.0
    if lam == "g2":
        integral = float(2 * (SDE.int_beta(T) - SDE.int_beta(eps)))
    else:
        t = torch.linspace(eps, T, 2001, dtype=torch.float64)
        f = SDE.sigma(t) ** 2
        h = (T - eps) / 2000
        integral = float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))
    exact = 0.5 * float(b @ b) * integral
    J, se = score_matching_objective(lambda x, t: MIX.score(x, t, SDE) + b, MIX, SDE, n_t=400, n_x=8, lam=lam,
                                     eps=eps, T=T, generator=gen(1), dtype=torch.float64)
    assert 0 < se < 0.1 * exact
    assert abs(J - exact) < 4 * se, (J, exact, se)


def test_grows_quadratically_with_the_perturbation():
    # With the same random draws, s_theta = s + c v gives J(c) = c^2 J(1) up to rounding: monotone in c.
    def v(x, t):
        return torch.stack([torch.sin(3 * x[:, 1]), x[:, 0] * t], dim=1)

    Js = []
    for c in (0.03, 0.1, 0.3, 1.0, 3.0):
        J, _ = score_matching_objective(lambda x, t, c=c: MIX.score(x, t, SDE) + c * v(x, t), MIX, SDE,
                                        n_t=32, n_x=32, generator=gen(2), dtype=torch.float64)
        Js.append((c, J))
    assert all(a[1] < b[1] for a, b in zip(Js[:-1], Js[1:]))
    J1 = dict(Js)[1.0]
    assert J1 > 0
    for c, J in Js:
        assert math.isclose(J, c * c * J1, rel_tol=1e-10)


def test_input_checks():
    good = MIX.score_fn(SDE)
    with pytest.raises(ValueError, match="lam"):
        score_matching_objective(good, MIX, SDE, lam="unit")
    with pytest.raises(ValueError, match="n_t"):
        score_matching_objective(good, MIX, SDE, n_t=1)
    with pytest.raises(ValueError, match="eps"):
        score_matching_objective(good, MIX, SDE, eps=1.0)
    with pytest.raises(ValueError, match="score_fn returned"):
        score_matching_objective(lambda x, t: x[:, :1], MIX, SDE, n_t=4, n_x=4)
    # a callable weight is used as given: lambda = 1 with s + b gives |b|^2 (T - eps) / 2 exactly
    J, se = score_matching_objective(lambda x, t: MIX.score(x, t, SDE) + 1.0, MIX, SDE, n_t=4, n_x=4,
                                     lam=lambda t: torch.ones_like(t), generator=gen(), dtype=torch.float64)
    assert math.isclose(J, 0.5 * 2 * (1 - 1e-3), rel_tol=1e-12) and se < 1e-12


# --- Kwon et al.'s bound: the constant, L_s, the per-time profile, and the experiment's small version ---

from wgfcore.bounds import kwon_bound_constant, one_sided_lipschitz, score_error_profile  # noqa: E402
from wgfcore.scores import gaussian  # noqa: E402


@pytest.mark.parametrize("L", [-3.0, -0.5, 0.0, 2.0, 40.0])
def test_bound_constant_closed_form(L):
    # constant L_s = L: log I(t) = (1 + 2L)(B(t) - B(eps)), B = int beta, and
    # int I^2 g^2 dt = 2 int exp(2 (1 + 2L)(B - B0)) dB = (exp(2 (1 + 2L) dB) - 1) / (1 + 2L)
    eps, T = 1e-3, 1.0
    dB = float(SDE.int_beta(T) - SDE.int_beta(eps))
    k = 1 + 2 * L
    x = 2 * k * dB
    log_integral = math.log(2 * dB) if k == 0 else \
        (x + math.log(-math.expm1(-x)) - math.log(k) if x > 0 else math.log(math.expm1(x) / k))
    for M in (1, 7, 60):  # a constant L makes the piecewise formula exact on any grid
        ts = torch.linspace(eps, T, M + 1, dtype=torch.float64)
        c = kwon_bound_constant(ts, torch.full((M,), L), SDE)
        assert math.isclose(c["log_IT"], k * dB, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(c["log_C"], 0.5 * (math.log(2) + log_integral), rel_tol=1e-10)
    # no overflow where the constant itself does not fit in float64
    big = kwon_bound_constant(torch.tensor([eps, 0.5, T], dtype=torch.float64), torch.tensor([1e4, 1e4]), SDE)
    assert math.isfinite(big["log_C"]) and big["log_C"] > 1000
    with pytest.raises(ValueError, match="increasing"):
        kwon_bound_constant(torch.tensor([0.5, 0.1]), torch.tensor([1.0]), SDE)
    with pytest.raises(ValueError, match="M values"):
        kwon_bound_constant(torch.tensor([0.1, 0.5]), torch.tensor([1.0, 2.0]), SDE)


def test_one_sided_lipschitz_of_known_fields():
    A = torch.tensor([[1.0, 3.0], [-1.0, -2.0]], dtype=torch.float64)  # sym part [[1, 1], [1, -2]]
    x = torch.randn(50, 2, dtype=torch.float64, generator=gen(3))
    expect = float(torch.linalg.eigvalsh(0.5 * (A + A.T))[-1])
    assert math.isclose(one_sided_lipschitz(lambda x, t: x @ A.T, x, 0.3), expect, rel_tol=1e-12)
    # a Gaussian N(0, v I) at time t: s = -x / (alpha^2 v + sigma^2), L_s = -1 / (alpha^2 v + sigma^2)
    v, t = 0.2, 0.3
    g = gaussian(torch.zeros(2), v * torch.eye(2, dtype=torch.float64))
    var = float(SDE.alpha(t) ** 2 * v + SDE.sigma(t) ** 2)
    assert math.isclose(one_sided_lipschitz(g.score_fn(SDE), x, t), -1 / var, rel_tol=1e-10)
    # for the narrow Kwon mixture the score expands between modes at small t: L_s >> 0
    mid = torch.zeros(1, 2, dtype=torch.float64)
    assert one_sided_lipschitz(MIX.score_fn(SDE), mid, 1e-3) > 100


def test_score_error_profile():
    ts = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    m, se = score_error_profile(MIX.score_fn(SDE), MIX, SDE, ts, n_x=64, generator=gen(), dtype=torch.float64)
    assert bool((m == 0).all()) and bool((se == 0).all())
    b = torch.tensor([0.3, -0.4], dtype=torch.float64)
    m, se = score_error_profile(lambda x, t: MIX.score(x, t, SDE) + b, MIX, SDE, ts, n_x=64, generator=gen(),
                                dtype=torch.float64)
    assert torch.allclose(m, torch.full((3,), 0.25, dtype=torch.float64), rtol=1e-12) and float(se.max()) < 1e-12


@pytest.mark.slow
def test_kwon_experiment_small(tmp_path):
    # the seconds-long version of `train/run.py kwon`: both configurations, every output written
    import csv

    from train.experiments import kwon_bound
    from train.run import main, parser

    def experiment(*argv):
        args = parser().parse_args(["kwon", *argv])
        args.argv = ["kwon", *argv]  # as train/run.py's main sets it
        return kwon_bound.experiment(args)

    res = experiment("--small", "--out", str(tmp_path / "out"), "--doc", str(tmp_path / "doc.md"),
                     "--figures", str(tmp_path / "fig"))
    rows = list(csv.DictReader(open(tmp_path / "out" / "kwon_bound.csv")))
    assert {r["config"] for r in rows} == {"kwon", "ours"} and len(rows) == 2 * 3
    assert all(float(r["J_g2"]) > 0 and float(r["J_sigma2"]) > 0 for r in rows)
    doc = (tmp_path / "doc.md").read_text()
    assert "## `kwon`" in doc and "## `ours`" in doc and "log10 bound" in doc
    for name in ("kwon_w2_vs_j.png", "kwon_bound.png"):
        assert (tmp_path / "fig" / name).stat().st_size > 10_000
    assert set(res) == {"kwon", "ours"}
    # the stratified W2 removes the mode-mass noise that dominates the plain W2 of true samples
    fl = res["ours"][0]
    assert fl["iid_W2_modes"][0] < 0.2 * fl["iid_W2_all"][0]
    # Kwon et al.'s notebook schedule by default: sigmoid 1e-5 .. 1e-2 (alpha_bar_T 0.951)
    assert "sigmoid beta 1e-05..0.01 (alpha_bar_T = 0.9510)" in doc
    # the slope per regime, with intervals that respect the checkpoints' serial dependence
    assert "Theil–Sen slope [block bootstrap 95%]" in doc and "per-run slopes" in doc and "upper bound" in doc
    # --render rebuilds the table from the run's own record (options, CSV, floors) without training ...
    again = experiment("--render", str(tmp_path / "out"), "--doc", str(tmp_path / "re.md"))
    assert again["kwon"][2]["fit"] == res["kwon"][2]["fit"]
    re_doc = (tmp_path / "re.md").read_text()
    assert sum(line.startswith(("| 0 | ascent |", "| 0 | descent |")) for line in re_doc.splitlines()) == len(rows)
    assert "--small" in re_doc and "re-rendered from the run's record" in re_doc
    assert "minimised for 60 " in re_doc  # --small's length, from the record
    # ... and refuses flags that would describe another run
    assert main(["kwon", "--render", str(tmp_path / "out"), "--iters", "20000", "--doc", str(tmp_path / "x.md")]) == 2
    assert not (tmp_path / "x.md").exists()
    assert main(["kwon", "--render", str(tmp_path / "nothing"), "--doc", str(tmp_path / "x.md")]) == 2
    assert main(["kwon", "--configs", "kwon,nope", "--out", str(tmp_path / "bad")]) == 2
