"""The two configurations of the Kwon et al. study (`train/run.py kwon`, ALGORITHMS §6) and the W2 that
separates mode-mass noise from score error: what each configuration trains against (its DSM loss),
how it samples, its J, and where its Lipschitz profile is taken.
"""
from __future__ import annotations

import math

import numpy as np
import ot
import torch

from wgfcore import ops
from wgfcore.adapters import DiscreteVP, ddpm_betas
from wgfcore.bounds import score_error_profile, score_matching_objective
from wgfcore.losses import dsm_loss
from wgfcore.metrics import w2_empirical
from wgfcore.sample import eps_to_score, sample
from wgfcore.scores import GaussianMixture
from wgfcore.sde import VPSDE

# --- W2 that separates mode-mass noise from score error -------------------------------------------

def stratified_sample(mix: GaussianMixture, counts, generator) -> torch.Tensor:
    """Draws with exactly counts[k] points in component k (float64)."""
    counts = torch.as_tensor(counts, dtype=torch.long)
    k = torch.repeat_interleave(torch.arange(mix.K), counts)
    z = torch.randn(int(counts.sum()), mix.d, generator=generator, dtype=torch.float64)
    root = mix.U * mix.lam.sqrt()[:, None, :]
    return mix.means[k] + torch.einsum("nij,nj->ni", root[k], z)


def exact_counts(mix: GaussianMixture, n: int) -> torch.Tensor:
    counts = torch.floor(mix.weights * n).long()
    counts[: n - int(counts.sum())] += 1
    return counts


def w2_report(x: torch.Tensor, mix: GaussianMixture, generator) -> dict:
    """W2_all, W2_modes and W2_mass of generated points x against the mixture (see the module doc)."""
    x = x.detach().to(torch.float64)
    n = len(x)
    if not bool(torch.isfinite(x).all()):
        return {"W2_all": float("nan"), "W2_modes": float("nan"), "W2_mass": float("nan")}
    ref = stratified_sample(mix, exact_counts(mix, n), generator)
    w_all = w2_empirical(x, ref)
    lab = torch.cdist(x, mix.means).argmin(1)
    counts = torch.bincount(lab, minlength=mix.K)
    sq = 0.0
    for k in range(mix.K):
        if counts[k] == 0:
            continue
        own = stratified_sample(mix, torch.nn.functional.one_hot(torch.tensor(k), mix.K) * counts[k], generator)
        sq += float(counts[k]) / n * w2_empirical(x[lab == k], own) ** 2
    M = torch.cdist(mix.means, mix.means).pow(2).numpy()
    mass = float(ot.emd2((counts.double() / n).numpy(), mix.weights.numpy(), M))
    return {"W2_all": w_all, "W2_modes": math.sqrt(sq), "W2_mass": math.sqrt(max(mass, 0.0))}


# --- the two configurations --------------------------------------------------------------------------

class Ours:
    """This project's VP-SDE, Euler-Maruyama from the prior."""

    name, label = "ours", "ours: VP-SDE b 0.1..20, EM from N(0, I)"

    def __init__(self, args):
        self.args, self.sde, self.eps = args, VPSDE(), 1e-3
        self.desc = (f"VP-SDE (b 0.1..20), reverse-SDE Euler-Maruyama N={args.em_steps} from N(0, I), "
                     f"t in [1e-3, 1], J by Monte Carlo over t ({args.n_t}) and x ({args.n_x})")

    def loss(self, net, x0, g):
        return dsm_loss(net, x0, self.sde, generator=g)

    def score_fn(self, net):
        return eps_to_score(net, self.sde)

    def generate(self, score_fn, mix, n, seed, trajectory=None):
        """Samples; with a dict `trajectory`, also the states x_prev at each step's time t (forward time)."""
        def keep(info):
            trajectory[info["t"]] = info["x_prev"][:256].detach().clone()
        with torch.no_grad():
            return sample(score_fn, (n, mix.d), self.args.em_steps, sampler="euler_maruyama", eps=self.eps,
                          seed=seed, backend="torch", dtype=torch.float32,
                          callback=keep if trajectory is not None else None)

    def J(self, score_fn, mix, seed):
        out = {}
        for lam in ("g2", "sigma2"):  # same seed: the same (t, x) draws for both weights
            J, se = score_matching_objective(score_fn, mix, self.sde, n_t=self.args.n_t, n_x=self.args.n_x,
                                             lam=lam, eps=self.eps, generator=torch.Generator().manual_seed(seed))
            out[f"J_{lam}"], out[f"J_{lam}_se"] = J, se
        return out

    def lip_grid(self):
        return torch.cat([torch.tensor([self.eps], dtype=torch.float64),
                          torch.from_numpy(np.geomspace(2 * self.eps, 1.0, self.args.lip_times))])

    def w2_T(self, mix):
        # W2(p_1, N(0, I)) <= the coupling x_1 = alpha x_0 + sigma z against z
        a, s = float(self.sde.alpha(1.0)), float(self.sde.sigma(1.0))
        m2 = float((mix.cov() + mix.mean()[:, None] * mix.mean()[None]).trace())
        return math.sqrt(a * a * m2 + (1 - s) ** 2 * mix.d)


class Kwon:
    """Kwon et al.'s notebook: a short DDPM with the sigmoid beta schedule, from the noised batch."""

    name, label = "kwon", "Kwon: 10-step DDPM, sigmoid beta, from the noised batch"

    def __init__(self, args):
        self.args = args
        betas = ddpm_betas(args.ddpm_steps, "sigmoid", args.beta_start, args.beta_end)
        self.sde = DiscreteVP.from_betas(betas)
        self.N, self.betas, self.ab = args.ddpm_steps, betas, self.sde.alphas_cumprod
        # the score is -eps / sqrt(1 - alpha_bar_i) on this table, so DDPM's mean step is c_x x + c_s s
        self.coefficients = [(1 / math.sqrt(1 - float(b)), float(b) / math.sqrt(1 - float(b)), math.sqrt(float(b)))
                             for b in betas]
        self.label = f"Kwon: {self.N}-step DDPM, sigmoid beta, from the noised batch"
        self.desc = (f"{self.N}-step DDPM, sigmoid beta {args.beta_start:g}..{args.beta_end:g} "
                     f"(alpha_bar_T = {float(self.ab[-1]):.4f}), ancestral sampling (variance beta_i, no noise on "
                     f"the last step) from x_T ~ q(x_T | x_0) of a fresh data batch, J as the exact sum over the "
                     f"{self.N} timesteps ({args.n_x} x draws each)")

    def loss(self, net, x0, g):
        i = torch.randint(0, self.N, (x0.shape[0],), generator=g)
        return dsm_loss(net, x0, self.sde, t=self.sde.step_time(i).to(x0.dtype), generator=g)

    def score_fn(self, net):
        return eps_to_score(net, self.sde)

    @torch.no_grad()
    def generate(self, score_fn, mix, n, seed, trajectory=None):
        """Ancestral DDPM sampling from the forward-noised batch: x <- (x + beta_i s) / sqrt(1 - beta_i)
        + sqrt(beta_i) z (no noise on the last step), i.e. `wgfcore.ops.em_step` with these coefficients."""
        g = torch.Generator().manual_seed(seed)
        x0 = stratified_sample(mix, exact_counts(mix, n), g)
        x = self.sde.perturb(x0, self.sde.step_time(self.N - 1), generator=g)[0].float()
        for i in range(self.N - 1, -1, -1):
            t = self.sde.step_time(i).expand(n)
            if trajectory is not None:
                trajectory[float(t[0])] = x[:256].clone()
            s = score_fn(x, t.float())
            z = torch.randn(x.shape, generator=g, dtype=x.dtype) if i > 0 else None
            x = ops.em_step(x, s, z, *self.coefficients[i])
        return x

    def J(self, score_fn, mix, seed):
        ts = self.sde.step_time(torch.arange(self.N))
        m, se = score_error_profile(score_fn, mix, self.sde, ts, n_x=self.args.n_x,
                                    generator=torch.Generator().manual_seed(seed))
        out = {}
        for lam, w in (("g2", -torch.log1p(-self.betas)),  # int of g^2 over step i
                       ("sigma2", self.sde.sigma(ts) ** 2 / self.N)):
            out[f"J_{lam}"] = float(0.5 * (w * m).sum())
            out[f"J_{lam}_se"] = float(0.5 * torch.sqrt(((w * se) ** 2).sum()))
        return out

    def lip_grid(self):
        return torch.arange(self.N + 1, dtype=torch.float64) / self.N

    def w2_T(self, mix):
        return 0.0  # the chain starts from the forward-noised batch: q_T = p_T


class SignedDSM(torch.nn.Module):
    """A configuration's DSM loss as an objective of the engine's loop: `sign` -1 maximises it (the
    ascent phase). Returns (sign * loss, [loss, 0]) so the loop logs the loss itself as 'dsm'."""

    def __init__(self, setup, net: torch.nn.Module, sign: float):
        super().__init__()
        self.setup, self.net, self.sign = setup, net, sign

    def forward(self, x0, generator):
        loss = self.setup.loss(self.net, x0, generator)
        return self.sign * loss, torch.stack([loss.detach(), torch.zeros_like(loss).detach()])


SETUPS = {"kwon": Kwon, "ours": Ours}

__all__ = ["Ours", "Kwon", "SETUPS", "SignedDSM", "w2_report", "stratified_sample", "exact_counts"]
