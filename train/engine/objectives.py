"""The training objectives as modules (ALGORITHMS §1 and §3): the joint score + projection loss,
and the projection loss alone against a fixed score (the toy's analytic-score ablation).

Each returns (loss, detached parts [L_dsm, L_proj]) so the training loop logs both the same way.
Both networks sit in one module so that DDP syncs all gradients after a single forward.
"""
from __future__ import annotations

import torch
from torch import nn

from wgfcore.losses import joint_loss, projection_loss
from wgfcore.sde import VPSDE

from .config import Config


def _delta_tau(dt):
    return [int(n) for n in dt] if isinstance(dt, (list, tuple)) else float(dt)


class JointObjective(nn.Module):
    """L_dsm(eps) + proj_weight * L_proj(T), the score seen by L_proj detached (wgfcore.losses.joint_loss).

    `forward_nets` optionally holds other callables for the forward pass (torch.compile wrappers of
    the same networks); they are kept out of the module tree so state_dict keys stay those of the nets."""

    def __init__(self, eps_model: nn.Module, proj_model: nn.Module, sde: VPSDE, cfg: Config, forward_nets=None):
        super().__init__()
        self.eps, self.proj, self.sde = eps_model, proj_model, sde
        self.delta_tau = _delta_tau(cfg.delta_tau)
        self.proj_weight = float(cfg.proj_weight)
        self.__dict__["_fwd"] = tuple(forward_nets) if forward_nets else (eps_model, proj_model)

    def forward(self, x0: torch.Tensor, generator: torch.Generator | None):
        eps, proj = self._fwd
        loss, parts = joint_loss(eps, proj, x0, self.sde, delta_tau=self.delta_tau,
                                 proj_weight=self.proj_weight, generator=generator)
        return loss, torch.stack([parts["dsm"], parts["proj"]])


class ProjectionObjective(nn.Module):
    """L_proj(T) against a fixed score function (no score network is trained); L_dsm is logged as 0.

    The toy's analytic-score ablation and the projection-only job (--score-from). `forward_net`
    optionally runs T's forward (a torch.compile wrapper of it), kept out of the module tree as in
    JointObjective; `score_fn` is a plain function, so the frozen score's weights are not this module's."""

    def __init__(self, proj_model: nn.Module, score_fn, sde: VPSDE, cfg: Config, forward_net=None):
        super().__init__()
        self.proj, self.sde = proj_model, sde
        self.delta_tau = _delta_tau(cfg.delta_tau)
        self.__dict__["score_fn"] = score_fn
        self.__dict__["_fwd"] = forward_net if forward_net is not None else proj_model

    def forward(self, x0: torch.Tensor, generator: torch.Generator | None):
        loss = projection_loss(self._fwd, self.score_fn, x0, self.sde, delta_tau=self.delta_tau, generator=generator)
        return loss, torch.stack([torch.zeros_like(loss).detach(), loss.detach()])


__all__ = ["JointObjective", "ProjectionObjective"]
