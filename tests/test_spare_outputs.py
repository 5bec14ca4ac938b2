"""The sampling loop's spared network outputs (wgfcore.loop.Run.spare, CppSteps' `out=`).

A step may write its result into the network output it has just read, saving a fresh tensor per
update, but only into an output no one else holds: the network kept no reference (not even a weak
one, nor a view, nor in C++), the memory is torch's own, and no callback is shown it. The first
test proves the reuse happens (so the speed-up cannot silently vanish) and changes no bit; the
others hold a network's output in each of those ways and check that it is never written.
"""
import weakref

import numpy as np
import pytest
import torch

from kernels import cpu_steps as cs
from wgfcore import ops
from wgfcore.sample import TorchSteps, euler_maruyama, sample

SHAPE, N = (4, 3, 8, 8), 6
SAMPLERS = {"euler_maruyama": {}, "reverse_sde": {"a": 0.0}, "heun_ode": {},
            "predict_project": {"proj_fn": lambda x, t: -0.5 * x}}


pytestmark = pytest.mark.usefixtures("cpp_steps_built")


class Recorder:
    """A network wrapper recording (input memory, output memory) per call, holding neither."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t):
        out = self.fn(x, t)
        self.calls.append((x.data_ptr(), out.data_ptr()))
        return out


def _run(sampler, score, backend="cpp", callback=None, proj=None):
    kw = dict(SAMPLERS[sampler])
    if proj is not None:
        kw["proj_fn"] = proj
    return sample(score, SHAPE, N, sampler=sampler, seed=3, backend=backend, callback=callback, **kw)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_a_sole_output_takes_the_next_state_and_changes_no_bit(sampler):
    score = Recorder(lambda x, t: torch.neg(x))
    proj = Recorder(lambda x, t: -0.5 * x) if sampler == "predict_project" else None
    got = _run(sampler, score, proj=proj)
    s = score.calls
    if sampler == "predict_project":  # predict writes x_pred into s, project x_next into T
        T = proj.calls
        assert [c[1] for c in s] == [c[0] for c in T]
        assert [c[1] for c in T[:-1]] == [c[0] for c in s[1:]]
    elif sampler == "heun_ode":  # s is read again by the corrector; the corrector writes into s'
        assert all(s[2 * i + 1][1] == s[2 * i + 2][0] for i in range(N - 1))
        assert all(s[2 * i][1] != s[2 * i + 1][0] for i in range(N))
    else:
        assert [c[1] for c in s[:-1]] == [c[0] for c in s[1:]]
    # A callback sees every output, so nothing is spared: the same bits from fresh tensors.
    want = _run(sampler, lambda x, t: torch.neg(x), callback=lambda info: None)
    assert torch.equal(got, want)


def _never_reused(calls):
    return all(a[1] != b[0] for a, b in zip(calls, calls[1:]))


def test_an_output_the_network_keeps_is_not_written():
    kept = []

    def score(x, t):
        out = torch.neg(x)
        kept.append((x.clone(), out))
        return out

    _run("euler_maruyama", score)
    assert all(torch.equal(out, -x) for x, out in kept)


def test_an_output_under_a_weak_reference_is_not_written():
    refs, score = [], Recorder(lambda x, t: torch.neg(x))

    def weakly(x, t):
        out = score(x, t)
        refs.append(weakref.ref(out))
        return out

    _run("reverse_sde", weakly)
    assert _never_reused(score.calls)


def test_a_view_of_the_networks_buffer_is_not_written():
    buf = torch.empty(SHAPE)
    inputs = []

    def score(x, t):
        inputs.append(x.clone())
        torch.neg(x, out=buf)
        return buf.view(SHAPE)  # a new tensor object, sharing the network's storage

    _run("reverse_sde", score)
    assert torch.equal(buf, -inputs[-1])


def test_numpy_memory_is_not_written():
    arr = np.empty(SHAPE, dtype=np.float32)
    inputs = []

    def score(x, t):
        inputs.append(x.clone())
        arr[...] = -x.numpy()
        return torch.from_numpy(arr)  # a new tensor over memory torch did not allocate

    _run("reverse_sde", score)
    assert np.array_equal(arr, -inputs[-1].numpy())


class Scripted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.last = torch.zeros(SHAPE)

    def forward(self, x, t):
        self.last = -x  # made and kept in C++
        return self.last


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_an_output_held_in_cpp_is_not_written():
    """A TorchScript attribute: the module holds the tensor in C++ (what the C++ rule checks; today's
    torch also keeps the Python object alive then, which the loop's refcount test sees)."""
    net = torch.jit.script(Scripted())
    inputs = []

    def score(x, t):
        inputs.append(x.clone())
        return net(x, t)

    _run("reverse_sde", score)
    assert torch.equal(net.last, -inputs[-1])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_the_memory_rule_in_cpp():
    ext = cs.require()
    like = torch.empty(3, 4)
    assert ext.writable(torch.neg(torch.randn(3, 4)), like, 0)
    net = torch.jit.script(Scripted())
    net(torch.randn(SHAPE), None)
    assert not ext.writable(net.last, torch.empty(SHAPE), 0)  # another holder in C++
    t = torch.randn(3, 4)
    view = t[:]
    assert not ext.writable(t, like, 0)  # a view shares the storage
    del view
    assert ext.writable(t, like, 0)
    storage = t.untyped_storage()
    assert not ext.writable(t, like, 0)  # so does a storage object
    del storage
    assert not ext.writable(torch.from_numpy(np.zeros((3, 4), np.float32)), like, 0)  # not torch's memory
    assert not ext.writable(torch.randn(3, 4, dtype=torch.float64), like, 0)  # another dtype
    assert not ext.writable(torch.randn(4, 3).t(), like, 0)  # not dense in order
    assert not ext.writable(torch.randn(12), like, 0)  # another shape
    assert not ext.writable(torch.randn(4, 4)[1:], like, 0)  # an offset into its storage
    assert not ext.writable(torch.randn(3, 4, requires_grad=True), like, 0)  # the result would carry its grad_fn


def test_an_output_with_autograd_history_is_not_written():
    """A sampler function called with grad enabled: the state must not take on the network's grad_fn."""
    w = torch.ones((), requires_grad=True)
    got = euler_maruyama(lambda x, t: -w * x, torch.randn(SHAPE), ops.time_grid(N), step_backend=cs.CppSteps(0))
    assert got.grad_fn is None and not got.requires_grad


def test_a_network_returning_its_input_and_a_callback_see_their_own_values():
    score = Recorder(lambda x, t: x)  # the identity: the output is the state itself
    _run("euler_maruyama", score)
    assert _never_reused(score.calls)
    seen = []
    _run("euler_maruyama", lambda x, t: torch.neg(x), callback=lambda info: seen.append(info))
    assert all(torch.equal(info["score"], -info["x_prev"]) for info in seen)


def test_the_torch_backend_takes_out_as_a_hint_only():
    x, s = torch.randn(SHAPE), torch.randn(SHAPE)
    B = TorchSteps().plan(x, {"em": torch.tensor([[0.5, 0.25, 0.0]] * 2, dtype=torch.float64)})
    s_before = s.clone()
    got = B.em(x, s, "em", 0, False, out=s)
    assert torch.equal(s, s_before) and torch.equal(got, ops.em_step(x, s_before, None, 0.5, 0.25, 0.0))
