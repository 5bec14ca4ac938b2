"""The image job's training: the score and projection U-Nets of a config trained jointly through the
shared loop (ALGORITHMS §1 and §3), with exact resume: the data order and the loss noise are
functions of (seed, rank, step) and of saved generator states.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from wgfcore.sde import VPSDE

from ..data.datasets import make_dataset
from ..data.order import batches, check_batch
from ..engine import distributed as D
from ..engine.config import Config
from ..engine.loop import fit, make_optimizer
from ..engine.networks import EMA, Kernels, build_nets, compiled, use_fused
from ..engine.objectives import JointObjective
from ..evaluation.draw import draw
from ..evaluation.plots import grid_scale, plot_losses, save_grid


def train(cfg: Config, run_dir: Path, d: D.Dist | None = None, *, resume: Path | None = None,
          make_nets: Callable[[Config], tuple[nn.Module, nn.Module]] | None = None, kernels: Kernels = Kernels(),
          dataset=None, progress: bool = True, stop_at: int | None = None):
    """Train the score and projection networks of an image config for cfg.iterations steps (from a
    checkpoint with `resume`). Returns (eps_ema, proj_ema, logged rows). `stop_at` stops after that
    step, as an interruption would (checkpoint written)."""
    d = d or D.Dist()
    run_dir = Path(run_dir)
    make_nets = make_nets or build_nets
    if dataset is None:
        dataset = make_dataset(cfg.dataset, cfg.data_root, cfg.resolution)
    check_batch(len(dataset), cfg, d.world)
    sde = VPSDE()

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    eps_model, proj_model = make_nets(cfg)
    if kernels.nets:
        use_fused([eps_model, proj_model])
    eps_model, proj_model = eps_model.to(d.device), proj_model.to(d.device)
    fwd = [compiled(eps_model, cfg.compile), compiled(proj_model, cfg.compile)]
    obj = JointObjective(eps_model, proj_model, sde, cfg, forward_nets=fwd).to(d.device)
    ema_eps, ema_proj = EMA(obj.eps, cfg.ema_decay), EMA(obj.proj, cfg.ema_decay)
    opt = make_optimizer(obj.parameters(), cfg)
    gen = torch.Generator(device=d.device).manual_seed(int(cfg.seed) * 7919 + d.rank + 1)

    def sample(done):
        obj.eval()
        with torch.no_grad():
            x, _ = draw(ema_eps.net, ema_proj.net, sde, "predict_project", 20, min(64, cfg.eval.grid), cfg, d,
                        seed=cfg.seed + 10_000, backend=kernels.steps)
        save_grid(x, run_dir / "samples" / f"train_step{done:08d}_pp20.png", scale=grid_scale(cfg))
        obj.train()

    rows = fit(objective=obj, trained={"eps": (obj.eps, ema_eps), "proj": (obj.proj, ema_proj)}, opt=opt, gen=gen,
               cfg=cfg, d=d, run_dir=run_dir, batches_from=lambda start, stop: batches(dataset, cfg, d, start, stop),
               resume=resume, stop_at=stop_at, sample=sample, progress=progress)
    if d.main:
        plot_losses(run_dir / "losses.csv", run_dir / "losses.png")
    return ema_eps.net, ema_proj.net, rows


__all__ = ["train"]
