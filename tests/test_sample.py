"""The public sampling API (ALGORITHMS §2, §4): samplers, NFE accounting, determinism, errors."""
import functools
import math
import re
import sys
import threading
import warnings

import numpy as np

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernels
import wgfcore.graphs as G
import wgfcore.sample as S
from wgfcore import ops
from wgfcore.loop import check_options, get_spec
from wgfcore.sample import eps_to_score, sample
from wgfcore.scores import gaussian
from wgfcore.sde import VPSDE

SDE = VPSDE()
# Where backend="triton" runs: the interpreter on CPU, compiled kernels on a GPU.
DEVICE = "cpu" if kernels.INTERPRETED else "cuda"


def iso_score(d, var=0.25, mean=0.5):
    """Analytic score of N(mean, var I) in R^d, at every VP time, for inputs of any shape (B, ...)."""
    return gaussian(torch.full((d,), mean), var * torch.eye(d)).score_fn(SDE)


def zero_proj(x, t):
    return torch.zeros_like(x)


def test_import_surface():
    import wgfcore.sample as mod
    assert callable(mod.sample) and set(mod.SAMPLERS) == {
        "euler_maruyama", "predict_project", "reverse_sde", "heun_ode", "langevin", "predict_project_tweedie"}


def proj_kw(sampler, proj_fn=None):
    """proj_fn for the samplers that take one (another sampler given proj_fn is an error)."""
    return {"proj_fn": proj_fn or zero_proj} if sampler == "predict_project" else {}


@settings(max_examples=15)
@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=4), sampler=st.sampled_from(sorted(S.SAMPLERS)),
       steps=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_every_sampler_runs_on_any_shape(shape, sampler, steps, dtype):
    d = math.prod(shape[1:]) if len(shape) > 1 else 1
    shape = tuple(shape) if len(shape) > 1 else (shape[0], 1)
    x, n = sample(iso_score(d), shape, steps, sampler=sampler, **proj_kw(sampler, iso_score(d)), seed=0, dtype=dtype,
                  return_nfe=True)
    assert x.shape == shape and x.dtype == dtype and torch.isfinite(x).all()
    assert n == S.nfe(sampler, steps)


def test_nfe_is_counted_not_assumed():
    calls = []

    def score(x, t):
        calls.append("s")
        return -x

    def proj(x, t):
        calls.append("T")
        return torch.zeros_like(x)

    _, n = sample(score, (4, 2), 20, proj_fn=proj, seed=0, return_nfe=True)
    assert n == 40 == len(calls) and calls[:4] == ["s", "T", "s", "T"]
    _, n = sample(score, (4, 2), 20, sampler="heun_ode", seed=0, return_nfe=True)
    assert n == 40


def test_zero_projection_is_euler_maruyama_bit_for_bit():
    score = iso_score(3)
    for denoise_last in (True, False):
        a = sample(score, (64, 3), 25, sampler="predict_project", proj_fn=zero_proj, seed=7,
                   denoise_last=denoise_last)
        b = sample(score, (64, 3), 25, sampler="euler_maruyama", seed=7, denoise_last=denoise_last)
        assert torch.equal(a, b)
    # and a non-zero projection does change the result (the comparison above can fail)
    c = sample(score, (64, 3), 25, sampler="predict_project", proj_fn=lambda x, t: -x, seed=7)
    assert not torch.equal(a, c)


def test_euler_maruyama_is_reverse_sde_with_a_1_and_seeded():
    score = iso_score(2)
    a = sample(score, (16, 2), 10, sampler="euler_maruyama", seed=3)
    b = sample(score, (16, 2), 10, sampler="reverse_sde", a=1.0, seed=3)
    c = sample(score, (16, 2), 10, sampler="reverse_sde", a=1.0, seed=4)
    g = torch.Generator().manual_seed(3)
    d = sample(score, (16, 2), 10, sampler="euler_maruyama", generator=g)
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)


def test_em_weak_error_shrinks_with_steps():
    # N(1, 0.25) in 1-D with its exact score: the error of the sample mean is EM's weak error
    # (order 1, so ~halving per doubling of N); the sampling error, sqrt(0.25 / 1e5) = 1.6e-3, is
    # far below the measured gaps (0.06 -> 0.03 -> 0.015).
    g = gaussian([1.0], [[0.25]])
    m_true = float(SDE.gaussian_marginal(g.means[0], g.covs[0], 1e-3)[0][0])
    errs = []
    for N in (10, 20, 40):
        x = sample(g.score_fn(SDE), (100_000, 1), N, sampler="euler_maruyama", seed=0, dtype=torch.float64)
        errs.append(abs(float(x.mean()) - m_true))
    assert errs[0] > errs[1] > errs[2]
    assert 1.4 < errs[0] / errs[1] < 2.8 and 1.4 < errs[1] / errs[2] < 2.8


def test_pf_ode_is_deterministic_given_the_prior_draw():
    score = iso_score(2)
    a = sample(score, (8, 2), 10, sampler="reverse_sde", a=0.0, seed=1)
    b = sample(score, (8, 2), 10, sampler="heun_ode", seed=1)
    # Heun (2nd order) and Euler (1st) agree only roughly at N=10 but are both smooth maps of x_1
    assert torch.allclose(a, b, atol=0.2)


def test_langevin_targets_the_fixed_law():
    g = gaussian([1.0, -1.0], 0.25 * torch.eye(2))
    x = sample(g.score_fn(SDE), (5_000, 2), 100, sampler="langevin", seed=0, dtype=torch.float64)
    # 5-sigma sampling bounds for n = 5000: mean sqrt(.25/n) -> 0.035, variance .25 sqrt(2/n) -> 0.025;
    # the last Langevin steps are tiny (beta(eps) dtau = 5e-4), so the step-size bias is negligible.
    assert torch.allclose(x.mean(0), torch.tensor([1.0, -1.0], dtype=torch.float64), atol=0.035)
    assert torch.allclose(x.var(0), torch.full((2,), 0.25, dtype=torch.float64), atol=0.025)


def test_callback_receives_the_trajectory():
    seen = []
    score = iso_score(2)
    x = sample(score, (5, 2), 6, proj_fn=zero_proj, seed=0, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    assert torch.equal(seen[-1]["x"], x)
    assert {"t", "t_next", "x_prev", "score", "denoised", "x_pred", "proj"} <= set(seen[0])
    assert seen[0]["t"] == 1.0 and seen[-1]["t_next"] == pytest.approx(1e-3)


def test_fp16_storage_runs():
    x = sample(iso_score(4), (8, 4), 10, proj_fn=zero_proj, seed=0, dtype=torch.float16)
    assert x.dtype == torch.float16 and torch.isfinite(x).all()


def test_default_delta_p_matches_the_paper():
    assert ops.default_delta_p(20) == 1.0
    assert ops.default_delta_p(40) == pytest.approx(0.4)
    assert ops.default_delta_p(100) == pytest.approx(0.1)
    assert 0.1 < ops.default_delta_p(60) < 0.4 and ops.default_delta_p(1000) < 0.01
    assert ops.default_delta_p(10) == 1.0


def test_eps_adapter():
    sde = VPSDE()
    t = torch.full((3,), 0.4)
    x = torch.randn(3, 2)
    score = eps_to_score(lambda x, t: 2 * x, sde)
    assert torch.allclose(score(x, t), -2 * x / sde.sigma(t).float()[:, None])


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.5), ValueError, "steps"),
    (dict(delta_p=-0.1), ValueError, "delta_p"),
    (dict(proj_fn=None), ValueError, "proj_fn"),
    (dict(sampler="ddim"), ValueError, "unknown sampler"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(a=-1.0, sampler="reverse_sde"), ValueError, "a must be"),
    (dict(shape=(0, 2)), ValueError, "shape"),
])
def test_bad_arguments(kwargs, exc, match):
    args = dict(score_fn=iso_score(2), shape=(4, 2), steps=5, proj_fn=zero_proj, seed=0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sample(**args)


def test_wrong_score_shape():
    with pytest.raises(ValueError, match=r"score_fn returned shape \(4, 3\), expected \(4, 2\)"):
        sample(lambda x, t: torch.zeros(4, 3), (4, 2), 5, sampler="euler_maruyama", seed=0)
    with pytest.raises(ValueError, match="proj_fn returned shape"):
        sample(iso_score(2), (4, 2), 5, proj_fn=lambda x, t: x[:, :1], seed=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("sampler", sorted(S.SAMPLERS))
def test_nan_from_a_network_is_reported_with_its_step(backend, sampler):
    def score(x, t):  # NaN from t_6 = 1 - 6 * 0.999 / 10 = 0.4006 on (langevin: t is fixed at t_N)
        return torch.where(t[:, None] < 0.45, torch.full_like(x, float("nan")), -x)

    # Heun's corrector at step 5 already evaluates the score at t_6.
    step, t = {"langevin": (0, 1.0), "heun_ode": (5, 0.5005)}.get(sampler, (6, 0.4006))
    who = "score_fn" if backend == "torch" else "a network"  # the torch re-run knows which network
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FloatingPointError, match=rf"{who} produced NaN or inf at step {step} \(t = {t:.4g}"):
            sample(score, (4, 2), 10, sampler=sampler, **proj_kw(sampler), seed=0, backend=backend, device=DEVICE)
        if sampler == "predict_project":
            with pytest.raises(FloatingPointError, match="NaN or inf at step 0"):
                sample(lambda x, t: -x, (4, 2), 5, proj_fn=lambda x, t: x / 0.0 * 0.0, seed=0, backend=backend,
                       device=DEVICE)


def test_seed_and_generator_together_is_an_error():
    with pytest.raises(ValueError, match="seed or generator"):
        sample(iso_score(2), (4, 2), 5, proj_fn=zero_proj, seed=0, generator=torch.Generator())


# --- one signature for every sampler --------------------------------------------------------------

def test_every_sampler_has_one_signature():
    import inspect
    sigs = {name: inspect.signature(fn) for name, fn in S.SAMPLERS.items()}
    names = {name: [p.name for p in sig.parameters.values()] for name, sig in sigs.items()}
    assert len({tuple(v) for v in names.values()}) == 1, names
    params = next(iter(sigs.values())).parameters.values()
    assert not any(p.kind is p.VAR_KEYWORD for p in params)
    assert "step_backend" in names["heun_ode"] and "steps" not in names["heun_ode"]


@pytest.mark.parametrize("sampler, kwargs, match", [
    ("heun_ode", dict(proj_fn=zero_proj), "heun_ode takes no proj_fn"),
    ("euler_maruyama", dict(delta_p=1.0), "euler_maruyama takes no delta_p"),
    ("langevin", dict(a=0.5), "langevin takes no a"),
    ("reverse_sde", dict(t_target=0.5), "reverse_sde takes no t_target"),
    ("predict_project", dict(proj_fn=zero_proj), "needs delta_p"),
    ("predict_project", dict(delta_p=1.0), "needs proj_fn"),
    ("reverse_sde", dict(a=float("nan")), "a must be a finite number"),
    ("predict_project", dict(proj_fn=zero_proj, delta_p=float("inf")), "delta_p must be a finite number"),
])
def test_unused_or_bad_sampler_options_are_errors(sampler, kwargs, match):
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=match):
        S.SAMPLERS[sampler](iso_score(2), x, ops.time_grid(4), **kwargs)


def test_samplers_take_a_step_backend():
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    ts = ops.time_grid(6)
    a = S.heun_ode(iso_score(2), x, ts, step_backend=S.TorchSteps())
    assert torch.equal(a, S.heun_ode(iso_score(2), x, ts))  # the default backend is TorchSteps


# --- backend parity at sample() entry (ALGORITHMS §2; issue 11 item 4) ----------------------------

def _both(fn):
    """fn(backend) on both backends: (result, None) or (None, (type, message))."""
    out = {}
    for backend in ("torch", "triton"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the interpreter warning
            try:
                out[backend] = (fn(backend), None)
            except Exception as e:  # noqa: BLE001 - the test compares what each backend raises
                out[backend] = (None, (type(e), str(e)))
    return out


def _nonfinite_free(res):
    return all(r is not None and torch.isfinite(r).all() for r, _ in res.values())


PARITY_CASES = {
    "float64 score": dict(score=lambda x, t: (-x).double()),
    "non-contiguous score": dict(score=lambda x, t: (-x).t().contiguous().t()),
    "float16 score": dict(score=lambda x, t: (-x).half()),
    "seed=-1": dict(seed=-1),
    "dtype=float64": dict(dtype=torch.float64),
    "numpy steps and seed": dict(steps=np.int64(3), seed=np.uint32(5)),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
@pytest.mark.parametrize("sampler", ["predict_project", "heun_ode"])
def test_what_torch_accepts_triton_accepts(case, sampler):
    c = PARITY_CASES[case]
    score = c.get("score", lambda x, t: -x)

    def run(backend):
        return sample(score, (3, 5), c.get("steps", 3), sampler=sampler, **proj_kw(sampler), seed=c.get("seed", 0),
                      dtype=c.get("dtype", torch.float32), backend=backend, device=DEVICE)

    res = _both(run)
    assert res["torch"][1] is None and res["triton"][1] is None, res
    assert _nonfinite_free(res)
    tor, tri = res["torch"][0], res["triton"][0]
    assert tor.dtype == tri.dtype == c.get("dtype", torch.float32)
    if sampler == "heun_ode":  # no noise: the same prior draw and the same update in fp32
        # The torch corrector uses fused multiply-adds (ops._heun), the kernel (and the interpreter)
        # rounds each product: a few fp32 ulps per step apart, as a GPU's own FMA contraction is.
        torch.testing.assert_close(tor, tri, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(delta_p=float("inf")), ValueError, "delta_p must be a finite number"),
    (dict(delta_p=float("nan")), ValueError, "delta_p must be a finite number"),
    (dict(a=float("nan"), sampler="reverse_sde"), ValueError, "a must be a finite number"),
    (dict(a=float("inf")), ValueError, "a must be a finite number"),
    (dict(seed=2**64), ValueError, "seed must lie in"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(score_fn=lambda x, t: (-x).int()), TypeError, "score_fn returned dtype torch.int32"),
    (dict(score_fn=lambda x, t: -x.to("meta")), ValueError, "score_fn returned a tensor on meta"),
    (dict(dtype=torch.int64), TypeError, "dtype must be float32"),
])
def test_input_errors_are_the_same_on_both_backends(kwargs, exc, match):
    args = dict(score_fn=lambda x, t: -x, shape=(3, 4), steps=3, proj_fn=zero_proj, seed=0, device=DEVICE)
    args.update(kwargs)
    res = _both(lambda backend: sample(**args, backend=backend))
    for backend, (_, err) in res.items():
        assert err is not None and err[0] is exc and re.search(match, err[1]), (backend, err)
    assert res["torch"][1] == res["triton"][1]


# --- CUDA graphs: errors and the cache (CPU), capture and replay (CUDA) ---------------------------

def test_cuda_graph_errors():
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device, got device=cpu"):
        sample(iso_score(2), (4, 2), 3, proj_fn=zero_proj, seed=0, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="callback= and progress=True cannot run inside it"):
        sample(iso_score(2), (4, 2), 3, proj_fn=zero_proj, seed=0, callback=print, cuda_graph=True)
    with pytest.raises(ValueError, match="callback= and progress=True cannot run inside it"):
        sample(iso_score(2), (4, 2), 3, proj_fn=zero_proj, seed=0, progress=True, cuda_graph=True)


def _capture_on_cpu(entry):
    """Stand-in for CUDA-graph capture on CPU: "replay" reruns the planned loop on the static buffers.

    Everything else of the graph path runs as on a GPU (key, cache, lock, static input, noise key
    or generator written before each replay, guard, output copy); like a real capture, it runs the
    body once (that is where the NFE of a replay is counted).
    """
    run = entry.run
    entry.x_out = run.spec.body(run, entry.x_in).clone()

    class Replay:
        def replay(self):
            if run.flag is not None:
                run.flag.fill_(S.FLAG_CLEAR)
            entry.x_out.copy_(run.spec.body(run, entry.x_in))

    entry.graph = Replay()


@pytest.fixture
def eager_graphs(monkeypatch):
    monkeypatch.setattr(G, "_capture", _capture_on_cpu)
    S.release_graphs()
    yield G
    S.release_graphs()


def _graph_sample(score, sampler="predict_project", seed=0, backend="triton", shape=(3, 5), steps=4, proj_fn=None,
                  delta_p=None, generator=None):
    """sample(..., cuda_graph=True) as it runs on a GPU, here on the CPU (the device check is skipped)."""
    spec = get_spec(sampler)
    opts = dict(proj_fn=proj_fn or (zero_proj if sampler == "predict_project" else None),
                delta_p=(delta_p or 1.0) if "delta_p" in spec.options else None)
    opts = check_options(spec, opts)
    ts = ops.time_grid(steps)

    def eager(gen):
        return sample(score, shape, steps, sampler=sampler, seed=None if gen is not None else seed, generator=gen,
                      backend=backend, device=DEVICE, return_nfe=True, proj_fn=opts.get("proj_fn"),
                      delta_p=opts.get("delta_p"))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="backend='triton' on CPU runs the Triton interpreter")
        return G.sample_graph(spec, score, shape, torch.float32, torch.device(DEVICE), backend, ts, opts, SDE, True,
                              seed, generator, eager)


def _eager(score, sampler, seed, backend="triton", shape=(3, 5), steps=4, proj_fn=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sample(score, shape, steps, sampler=sampler, **proj_kw(sampler, proj_fn), seed=seed, backend=backend,
                      device=DEVICE, **({"delta_p": 1.0} if "delta_p" in get_spec(sampler).options else {}))


def test_graph_key_names_everything_that_changes_the_captured_work():
    def key(**over):
        kw = dict(spec_name="predict_project", shape=(4, 2), dtype=torch.float32, device=torch.device("cpu"),
                  backend="triton", ts=ops.time_grid(5), options={"delta_p": 1.0}, sde=SDE, denoise_last=True,
                  nets=(iso_score, zero_proj))
        kw.update(over)
        return G.graph_key(**kw)

    base = key()
    assert base == key()
    changes = dict(spec_name="euler_maruyama", shape=(8, 2), dtype=torch.float16, device=torch.device("meta"),
                   backend="torch", ts=ops.time_grid(6), sde=VPSDE(b_max=10.0), denoise_last=False,
                   options={"delta_p": 0.5}, nets=(zero_proj, iso_score))
    for name, value in changes.items():
        assert key(**{name: value}) != base, name
    assert key(ts=ops.time_grid(5, eps=1e-2)) != base
    assert key(options={"a": 0.5}) != key(options={"a": 1.0})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert key() != base


def test_net_key_follows_what_a_graph_reads_of_a_module():
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    k0 = G.net_key(net)
    assert G.net_key(net) == k0  # nothing changed: the same key (a replay)
    steps = [
        ("in-place update (new version)", lambda: torch.no_grad()(net[0].weight.add_)(0.0)),
        ("net.to(float64) (new storage)", lambda: net.to(torch.float64)),
        ("load_state_dict(assign=True) (new storage)",
         lambda: net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)),
        ("train/eval", lambda: net.eval()),
        ("a python flag on a submodule", lambda: setattr(net[1], "mode", "fused")),
        ("a plain tensor attribute", lambda: setattr(net, "table", torch.ones(3))),
    ]
    seen = {k0}
    for what, change in steps:
        change()
        k = G.net_key(net)
        assert k not in seen, what
        seen.add(k)


SCALE = 1.0
NET = torch.nn.Linear(2, 2)


def _global_score(x, t):
    return -SCALE * x + NET(x) * 0


def test_net_key_follows_closures_globals_and_bound_methods(monkeypatch):
    k0 = G.net_key(_global_score)
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 2.0)  # a rebound global python value
    k1 = G.net_key(_global_score)
    monkeypatch.setattr(sys.modules[__name__], "NET", torch.nn.Linear(2, 2))  # a rebound global module
    k2 = G.net_key(_global_score)
    assert len({k0, k1, k2}) == 3

    net = torch.nn.Linear(2, 2)

    def make():
        def score(x, t):
            return -x + 0 * net(x)
        return score

    f = make()
    a = G.net_key(f)
    net = torch.nn.Linear(2, 2)  # noqa: F841 - the closure cell now holds another module
    assert G.net_key(f) != a
    wrapped = functools.partial(lambda m, x, t: m(x), torch.nn.Linear(2, 2))
    b = G.net_key(wrapped)
    with torch.no_grad():
        wrapped.args[0].weight.mul_(1.0)
    assert G.net_key(wrapped) != b
    lin = torch.nn.Linear(2, 2)
    m = G.net_key(lin.forward)  # a bound method reaches its module
    lin.to(torch.float64)
    assert G.net_key(lin.forward) != m


@pytest.mark.parametrize("sampler", sorted(S.SAMPLERS))
def test_graph_path_captures_on_second_sight_then_replays_and_equals_eager(eager_graphs, sampler):
    def score(x, t):
        return 0.5 - x
    for k, seed in enumerate((3, 4, 3, 5)):
        x, n = _graph_sample(score, sampler, seed=seed)
        assert torch.equal(x, _eager(score, sampler, seed)), seed  # a new seed reaches the kernels by the device key
        assert n == S.nfe(sampler, 4)
        assert G.graph_stats() == dict(replays=max(0, k - 1), captures=int(k >= 1), eager_first=1, eager_full=0,
                                       eager_uncapturable=0, released_stale=0, cached=int(k >= 1))


def test_a_new_lambda_per_call_never_captures(eager_graphs):
    for seed in range(5):
        x, _ = _graph_sample(lambda x, t: 0.5 - x, "euler_maruyama", seed=seed, backend="torch")
        assert torch.equal(x, _eager(lambda x, t: 0.5 - x, "euler_maruyama", seed, backend="torch"))
    assert G.graph_stats()["eager_first"] == 5 and G.graph_stats()["captures"] == 0


def test_swapped_parameters_mean_a_new_capture_never_a_stale_replay(eager_graphs):
    net = torch.nn.Linear(5, 5)
    torch.nn.init.zeros_(net.bias)

    def score(x, t):
        return -x + 0.1 * net(x)

    for _ in range(3):
        _graph_sample(score, "euler_maruyama", seed=1, backend="torch")  # eager, capture, replay
    net.load_state_dict({"weight": torch.full((5, 5), 0.3), "bias": torch.zeros(5)}, assign=True)
    x, _ = _graph_sample(score, "euler_maruyama", seed=1, backend="torch")  # new storage: a new key, run eagerly
    assert torch.equal(x, _eager(score, "euler_maruyama", 1, backend="torch"))
    stats = G.graph_stats()
    assert stats["released_stale"] == 1 and stats["cached"] == 0 and stats["eager_first"] == 2
    with torch.no_grad():
        net.weight.mul_(2.0)  # in place: same storage, new version
    for _ in range(3):
        x, _ = _graph_sample(score, "euler_maruyama", seed=1, backend="torch")
        assert torch.equal(x, _eager(score, "euler_maruyama", 1, backend="torch"))
    assert G.graph_stats()["captures"] == 2


def test_the_cache_is_bounded_and_runs_eagerly_beyond(eager_graphs, monkeypatch):
    monkeypatch.setattr(G, "GRAPH_CACHE_SIZE", 2)
    f1, f2, f3 = (lambda x, t: -x), (lambda x, t: -0.5 * x), (lambda x, t: -2.0 * x)
    for f in (f1, f1, f2, f2, f3, f3, f3):
        x, _ = _graph_sample(f, "euler_maruyama", backend="torch")
        assert torch.equal(x, _eager(f, "euler_maruyama", 0, backend="torch"))
    assert G.graph_stats() == dict(replays=0, captures=2, eager_first=3, eager_full=2, eager_uncapturable=0,
                                  released_stale=0, cached=2)
    assert S.release_graphs() == 2 and S.cached_graphs() == [] and G.graph_stats()["cached"] == 0


def test_a_loop_that_cannot_be_captured_runs_eagerly_with_one_warning(eager_graphs, monkeypatch):
    def refuse(entry):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(G, "_capture", refuse)

    def score(x, t):
        return 0.5 - x

    _graph_sample(score, "euler_maruyama", seed=2, backend="torch")
    with pytest.warns(RuntimeWarning, match="could not be captured .*not permitted"):
        x, _ = _graph_sample(score, "euler_maruyama", seed=2, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, _ = _graph_sample(score, "euler_maruyama", seed=3, backend="torch")
    assert torch.equal(x, _eager(score, "euler_maruyama", 2, backend="torch")) and torch.equal(y, _eager(score, "euler_maruyama", 3, backend="torch"))
    assert G.graph_stats()["eager_uncapturable"] == 2 and G.graph_stats()["cached"] == 0


def test_concurrent_calls_are_serialised(eager_graphs):
    def score(x, t):
        return 0.5 - x

    _graph_sample(score, "predict_project", seed=0, backend="torch")
    _graph_sample(score, "predict_project", seed=0, backend="torch")  # captured
    out = {}

    def work(seed):
        out[seed] = _graph_sample(score, "predict_project", seed=seed, backend="torch")[0]

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for seed, x in out.items():  # each replay used its own seed's prior and noise, none another's
        assert torch.equal(x, _eager(score, "predict_project", seed, backend="torch")), seed
    assert G.graph_stats()["replays"] == 8


def test_graph_path_reports_nonfinite_output_with_its_step(eager_graphs):
    def score(x, t):
        return torch.where(t[:, None] < 0.45, torch.full_like(x, float("nan")), -x)

    for backend in ("triton", "torch"):  # eager (first sight), then the captured loop's guard
        for _ in range(2):
            with pytest.raises(FloatingPointError, match=r"NaN or inf at step 6"):
                _graph_sample(score, "euler_maruyama", steps=10, backend=backend)
    x, _ = _graph_sample(lambda x, t: -x, "euler_maruyama", steps=10)
    assert torch.isfinite(x).all()


def test_graph_path_torch_backend_is_deterministic_per_seed(eager_graphs):
    def score(x, t):  # one function object: one capture
        return 0.5 - x

    a = [_graph_sample(score, "euler_maruyama", seed=1, backend="torch")[0] for _ in range(3)]
    c, _ = _graph_sample(score, "euler_maruyama", seed=2, backend="torch")
    assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2]) and not torch.equal(a[0], c)
    assert G.graph_stats()["captures"] == 1


def test_graph_path_refuses_autocast_with_its_weight_cache(eager_graphs):
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="cache_enabled=False"):
        _graph_sample(lambda x, t: -x, "euler_maruyama")


on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture and replay")


def _conv_net(seed, dtype=torch.float32, device="cuda"):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    return net.to(device=device, dtype=dtype).eval()


@on_cuda
@pytest.mark.parametrize("sampler", sorted(S.SAMPLERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_is_bitwise_eager_on_triton(sampler, dtype):
    S.release_graphs()
    s_net, t_net = _conv_net(0, dtype), _conv_net(1, dtype)

    def score(x, t):
        return -x + 0.1 * s_net(x)

    def proj(x, t):
        return 0.1 * t_net(x)

    kw = dict(sampler=sampler, **proj_kw(sampler, proj), device="cuda", dtype=dtype, backend="triton")
    # Bitwise equality needs the networks to be deterministic too: no cuDNN autotuning.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        for seed in (0, 1, 0):  # eager (first sight), capture + replay, replay
            g = sample(score, (4, 3, 16, 16), 6, seed=seed, cuda_graph=True, **kw)
            e = sample(score, (4, 3, 16, 16), 6, seed=seed, **kw)
            assert g.dtype == dtype and torch.isfinite(g.float()).all()
            assert torch.equal(g, e), (sampler, seed)
    assert len(S.cached_graphs()) == 1 and G.graph_stats()["replays"] == 1
    S.release_graphs()


@on_cuda
def test_cuda_graph_torch_backend_and_guard():
    S.release_graphs()

    def score(x, t):
        return 0.5 - x

    kw = dict(sampler="euler_maruyama", device="cuda", backend="torch", cuda_graph=True)
    first = sample(score, (64, 4), 10, seed=5, **kw)  # eager, with the graph's noise scheme
    a = sample(score, (64, 4), 10, seed=5, **kw)  # capture + replay
    assert torch.equal(a, sample(score, (64, 4), 10, seed=5, **kw))
    assert not torch.equal(a, sample(score, (64, 4), 10, seed=6, **kw))
    # the same generator stream as the eager first run: equal where CUDA's graph-safe Philox
    # reproduces eager draws, which is its design; to fp32 rounding in any case
    torch.testing.assert_close(first, a)

    def bad(x, t):
        return torch.where(t[:, None] < 0.45, torch.full_like(x, float("nan")), -x)

    for _ in range(2):
        with pytest.raises(FloatingPointError, match=r"NaN or inf at step 6"):
            sample(bad, (4, 2), 10, sampler="euler_maruyama", seed=0, device="cuda", backend="triton", cuda_graph=True)
    assert S.release_graphs() == 2


@on_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_cuda_graph_on_another_device():
    S.release_graphs()
    net = _conv_net(0, device="cuda:1")

    def score(x, t):
        return -x + 0.1 * net(x)

    for _ in range(3):
        g = sample(score, (2, 3, 8, 8), 4, sampler="euler_maruyama", seed=0, device="cuda:1", cuda_graph=True)
        assert g.device == torch.device("cuda:1")
        assert torch.equal(g, sample(score, (2, 3, 8, 8), 4, sampler="euler_maruyama", seed=0, device="cuda:1"))
    S.release_graphs()
