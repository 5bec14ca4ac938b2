"""Training objectives (ALGORITHMS §1, §3)."""
import pytest
import torch

from wgfcore.losses import dsm_loss, joint_loss, projection_loss
from wgfcore.scores import gaussian
from wgfcore.sde import VPSDE

SDE = VPSDE()
M = torch.tensor([1.0, -0.5], dtype=torch.float64)
S = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
DATA = gaussian(M, S)


def test_dsm_is_lowest_at_the_analytic_score():
    g = torch.Generator().manual_seed(0)
    n = 20_000
    x0 = DATA.sample(n, g)
    t = 1e-5 + (1 - 1e-5) * torch.rand(n, generator=g, dtype=torch.float64)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)

    def eps_star(x, t):  # the analytic epsilon: -sigma_t * score
        return -SDE.sigma(t)[:, None] * DATA.score(x, t, SDE)

    def v(x, t):  # a fixed perturbation direction with E|v|^2 = O(1)
        return torch.sin(3 * x) + 0.5

    base = float(dsm_loss(eps_star, x0, SDE, t=t, z=z))
    x_t, _ = SDE.perturb(x0, t, z=z)
    norm2 = float(v(x_t, t).pow(2).sum(1).mean())  # E|v(x_t)|^2, where the loss evaluates v
    for delta in (0.05, 0.2, 1.0):
        pert = float(dsm_loss(lambda x, t: eps_star(x, t) + delta * v(x, t), x0, SDE, t=t, z=z))
        assert pert > base
        # excess = delta^2 E|v|^2 + 2 delta E<eps* - z, v>: the cross term has mean 0 because
        # eps* = E[z | x_t]; its sd is <= 2 delta sqrt(E|eps* - z|^2 E|v|^2 / n); allow 5 sd.
        sd = 2 * delta * (base * norm2 / n) ** 0.5
        assert pert - base == pytest.approx(delta ** 2 * norm2, abs=5 * sd)


def _closed_form_projection(t, dtau):
    """Optimal affine T for Gaussian data (ALGORITHMS §3): (x_pred, x_mean) are jointly Gaussian, so
    T*(u) = (E[x_mean | u] - u) / (1 + kappa), kappa = sqrt(beta(t)) / 2, with the exact score."""
    a, s2 = float(SDE.alpha(t)), float(SDE.sigma(t)) ** 2
    a_prev = float(SDE.alpha(t - dtau))
    b = float(SDE.beta(t))
    I = torch.eye(2, dtype=torch.float64)
    St = a * a * S + s2 * I
    Mt = (1 + b * dtau) * I - 2 * b * dtau * torch.linalg.inv(St)   # u = Mt x_t + v
    v = 2 * b * dtau * torch.linalg.solve(St, a * M)
    mu_u = Mt @ (a * M) + v
    C_uu = Mt @ St @ Mt.T
    C_mu = a * a_prev * S @ Mt.T                                      # Cov(x_mean, u)
    K = C_mu @ torch.linalg.inv(C_uu)
    kappa = b ** 0.5 / 2
    W = (K - I) / (1 + kappa)
    c = (a_prev * M - K @ mu_u) / (1 + kappa)
    return W, c


def test_projection_loss_minimiser_matches_closed_form():
    t_val, dtau, n = 0.35, 0.05, 50_000
    g = torch.Generator().manual_seed(1)
    x0 = DATA.sample(n, g)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.full((n,), t_val, dtype=torch.float64)
    T = torch.nn.Linear(2, 2).double()
    torch.nn.init.zeros_(T.weight)
    torch.nn.init.zeros_(T.bias)
    opt = torch.optim.LBFGS(T.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")
    score = DATA.score_fn(SDE)

    def closure():
        opt.zero_grad()
        loss = projection_loss(lambda x, tt: T(x), score, x0, SDE, delta_tau=dtau, t=t, z=z)
        loss.backward()
        return loss

    opt.step(closure)
    W, c = _closed_form_projection(t_val, dtau)
    # the fitted T is the least-squares solution on n samples; it differs from the population
    # optimum by O(1/sqrt(n)) = 4.5e-3 in relative terms, so 5 * that, times the entries' scale
    tol = 5 * n ** -0.5 * max(1.0, float(W.abs().max()), float(c.abs().max()))
    assert torch.allclose(T.weight.detach(), W, atol=tol)
    assert torch.allclose(T.bias.detach(), c, atol=tol)
    assert W.abs().max() > 10 * tol  # the optimum is not trivially zero


def test_projection_gradient_does_not_reach_the_score_network():
    eps_net = torch.nn.Linear(2, 2)
    proj_net = torch.nn.Linear(2, 2)
    x0 = torch.randn(16, 2)
    score = lambda x, t: -eps_net(x)  # noqa: E731
    projection_loss(lambda x, t: proj_net(x), score, x0).backward()
    assert eps_net.weight.grad is None and proj_net.weight.grad is not None


def test_joint_loss_parts_and_gradients():
    eps_net, proj_net = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    x0 = torch.randn(32, 2)
    loss, parts = joint_loss(lambda x, t: eps_net(x), lambda x, t: proj_net(x), x0, delta_tau=[20, 40, 100],
                             generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert set(parts) == {"dsm", "proj"} and not parts["dsm"].requires_grad
    assert eps_net.weight.grad is not None and proj_net.weight.grad is not None


def test_bad_inputs():
    x0 = torch.randn(4, 2)
    with pytest.raises(ValueError, match="eps_model returned shape"):
        dsm_loss(lambda x, t: x[:, :1], x0)
    with pytest.raises(ValueError, match="delta_tau"):
        projection_loss(lambda x, t: x, lambda x, t: x, x0, delta_tau=2.0)
    with pytest.raises(ValueError, match="step counts"):
        projection_loss(lambda x, t: x, lambda x, t: x, x0, delta_tau=[1])
