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
from ..engine import checkpoint as ckpt
from ..engine import distributed as D
from ..engine.config import Config
from ..engine.errors import UsageError
from ..engine.loop import loop, loss_fields, make_optimizer
from ..engine.networks import EMA, build_nets, compiled, use_fused
from ..engine.objectives import JointObjective
from ..engine.rundir import LossLog
from ..evaluation.draw import draw
from ..evaluation.plots import grid_scale, plot_losses, save_grid


def train(cfg: Config, run_dir: Path, d: D.Dist | None = None, *, resume: Path | None = None,
          make_nets: Callable[[Config], tuple[nn.Module, nn.Module]] | None = None, fused: bool = False,
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
    if fused:
        use_fused([eps_model, proj_model])
    eps_model, proj_model = eps_model.to(d.device), proj_model.to(d.device)
    fwd = [compiled(eps_model, cfg.compile), compiled(proj_model, cfg.compile)]
    obj = JointObjective(eps_model, proj_model, sde, cfg, forward_nets=fwd).to(d.device)
    ema_eps, ema_proj = EMA(obj.eps, cfg.ema_decay), EMA(obj.proj, cfg.ema_decay)
    opt = make_optimizer(obj.parameters(), cfg)
    gen = torch.Generator(device=d.device).manual_seed(int(cfg.seed) * 7919 + d.rank + 1)

    start, last_good = 0, (0, None)
    if resume is not None:
        state = ckpt.load_training_state(resume)
        if int(state["world_size"]) != d.world:
            raise UsageError(f"{resume} was written by {state['world_size']} processes; resume it with "
                             f"the same number (got {d.world}) so the data order and noise continue exactly")
        obj.eps.load_state_dict(state["eps"])
        obj.proj.load_state_dict(state["proj"])
        ema_eps.net.load_state_dict(state["ema_eps"])
        ema_proj.net.load_state_dict(state["ema_proj"])
        opt.load_state_dict(state["optimizer"])
        ckpt.restore_rng(state["rng"][d.rank], {"loss_noise": gen})
        start = int(state["step"])
        last_good = (start, Path(resume))

    model = obj
    if d.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            obj, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    groups = [("eps", list(obj.eps.parameters())), ("proj", list(obj.proj.parameters()))]
    log = LossLog(run_dir / "losses.csv", loss_fields(groups), start if resume is not None else None,
                  run_dir / "tensorboard") if d.main else None
    ckpt_dir = run_dir / "checkpoints"
    stop = cfg.iterations if stop_at is None else min(stop_at, cfg.iterations)

    def save(done):
        snap = bool(cfg.snapshot_every) and done % cfg.snapshot_every == 0
        state = ckpt.training_state(done, cfg, d, obj.eps, obj.proj, ema_eps.net, ema_proj.net, opt,
                                    {"loss_noise": gen})
        path = ckpt.save_checkpoint(state, ckpt_dir, done, keep_snapshot=snap) if d.main else None
        D.barrier(d)
        return path

    def sample(done):
        obj.eval()
        with torch.no_grad():
            x, _ = draw(ema_eps.net, ema_proj.net, sde, "predict_project", 20, min(64, cfg.eval.grid), cfg, d,
                        seed=cfg.seed + 10_000, backend="triton" if fused else "auto")
        save_grid(x, run_dir / "samples" / f"train_step{done:08d}_pp20.png", scale=grid_scale(cfg))
        obj.train()

    rows = loop(model=model, opt=opt, batches=batches(dataset, cfg, d, start, stop), cfg=cfg, d=d, start=start,
                stop=stop, generator=gen, clip_groups=groups, emas=[(ema_eps, obj.eps), (ema_proj, obj.proj)],
                log=log, save=save, last_good=last_good, watch=[obj], sample=sample, progress=progress)
    if d.main:
        plot_losses(run_dir / "losses.csv", run_dir / "losses.png")
    return ema_eps.net, ema_proj.net, rows


__all__ = ["train"]
