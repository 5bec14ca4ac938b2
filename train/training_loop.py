"""The training loop every job shares (image U-Nets and the 2-D toy's MLPs), and the image job's setup.

ALGORITHMS §1 and §3: `loop` runs an objective (train.loss) with an optimizer, warm-up and an
optional cosine schedule, gradient clipping, EMA of the networks, bf16 autocast on GPU, DDP, a loss
log and checkpoints. At every log interval it checks that the loss and all weights are finite; a
run that diverged stops with `Diverged` naming the step, before it writes anything over the last
good checkpoint. `train` sets it up for the image datasets with exact resume (the data order and
the loss noise are functions of (seed, rank, step) and of saved generator states).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from wgfcore.sde import VPSDE

from . import checkpoint as ckpt
from . import distributed as D
from .errors import Diverged, UsageError
from .loss import JointObjective
from .networks import EMA, all_finite, build_nets, compiled, use_fused
from .rundir import LossLog


def lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up to cfg['lr'] over cfg['warmup'] steps (as in score_sde), then constant, or with
    lr_schedule 'cosine' a cosine decay to lr_min_ratio * lr at the last iteration (the toy's)."""
    lr = cfg["lr"]
    if cfg.get("lr_schedule", "constant") == "cosine":
        lo = lr * float(cfg.get("lr_min_ratio", 0.0))
        lr = lo + (lr - lo) * (1 + math.cos(math.pi * step / cfg["iterations"])) / 2
    w = int(cfg.get("warmup", 0))
    return lr * min(1.0, (step + 1) / w) if w > 0 else lr


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    betas = tuple(cfg.get("adam_betas", (0.9, 0.999)))
    if cfg.get("optimizer", "adamw") == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], betas=betas, weight_decay=cfg.get("weight_decay", 0.0))
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0), betas=betas)


def autocast(d: D.Dist, cfg: dict):
    on = d.device.type == "cuda" and bool(cfg.get("bf16", True))
    return torch.autocast(device_type=d.device.type, dtype=torch.bfloat16, enabled=on)


def _grad_norm_clip(params, max_norm: float) -> torch.Tensor:
    params = [p for p in params if p.grad is not None]
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


def loss_fields(groups) -> list[str]:
    return ["step", "loss", "dsm", "proj", "lr", *[f"grad_norm_{g}" if g else "grad_norm" for g, _ in groups],
            "seconds"]


def loop(*, model: nn.Module, opt: torch.optim.Optimizer, batches, cfg: dict, d: D.Dist, start: int, stop: int,
         generator, clip_groups: list, emas: list, log: LossLog | None, save: Callable[[int], Path | None],
         last_good: tuple[int, Path | None], watch: list, sample: Callable[[int], None] | None = None,
         progress: bool = True, desc: str = "train") -> list[dict]:
    """Train from `start` to `stop`; returns the logged rows.

    model(x0, generator) -> (loss, parts [dsm, proj]); `clip_groups` = [(name, params)] clipped (and
    logged) separately; `emas` = [(EMA, net)] updated after each step; `save(step)` writes a checkpoint
    (rank 0 returns its path); `watch` = modules whose weights must stay finite."""
    every = int(cfg["log_every"])
    rows, acc, t0 = [], [], time.time()
    bar = tqdm(total=cfg["iterations"], initial=start, desc=desc, disable=not (progress and d.main),
               dynamic_ncols=True)
    good_step, good_path = last_good
    model.train()
    lr = lr_at(start, cfg)
    try:
        for step, x0 in batches:
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast(d, cfg):
                loss, parts = model(x0, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norms = [_grad_norm_clip(params, cfg["grad_clip"]) for _, params in clip_groups]
            opt.step()
            for ema, net in emas:
                ema.update(net)
            acc.append(torch.cat([loss.detach().float().view(1), parts.float(), *[n.float().view(1) for n in norms]]))
            done = step + 1
            bar.update(1)
            if done % every == 0 or done == stop:
                per_step = torch.stack(acc)
                m = D.all_reduce_sum(d, per_step.mean(0)) / d.world  # one host sync per log interval
                finite = torch.stack([torch.isfinite(m).all(), all_finite(watch + [e.net for e, _ in emas])])
                m, finite = m.tolist(), finite.tolist()
                row = {"step": done, "loss": m[0], "dsm": m[1], "proj": m[2], "lr": lr,
                       **dict(zip(loss_fields(clip_groups)[5:-1], m[3:])), "seconds": round(time.time() - t0, 3)}
                rows.append(row)
                if d.main:
                    log.write(row)
                    bar.set_postfix(loss=f"{m[0]:.4g}", dsm=f"{m[1]:.4g}", proj=f"{m[2]:.4g}")
                acc = []
                if not all(finite):
                    bad = torch.isfinite(per_step).all(1)
                    first = done - len(bad) + int((~bad).nonzero()[0]) + 1 if not bool(bad.all()) else None
                    what = (f"the loss became non-finite at step {first}" if first is not None else
                            f"the weights became non-finite by step {done} (loss still finite)")
                    kept = (f"the last good checkpoint, {good_path} (step {good_step}), is kept"
                            if good_path is not None else "no checkpoint had been written yet")
                    raise Diverged(f"training diverged: {what} (lr {lr:.3g}, ema_decay {cfg['ema_decay']}); "
                                   f"{kept}; nothing was saved after it. Lower --lr or check the data.")
            if sample is not None and cfg.get("sample_every") and done % cfg["sample_every"] == 0 and d.main:
                sample(done)
            if done % cfg["ckpt_every"] == 0 or done == stop:
                path = save(done)
                good_step, good_path = done, path
    finally:
        bar.close()
        if log is not None:
            log.close()
    return rows


# --- the image job's training ---------------------------------------------------------------------------

TRAINING_STATE = ("step", "config", "world_size", "eps", "proj", "ema_eps", "ema_proj", "optimizer", "rng")


def _state(step, obj, opt, ema_eps, ema_proj, cfg, d, generators: dict) -> dict:
    """Everything needed to continue exactly; RNG states of every rank (gathered to rank 0)."""
    rng = ckpt.capture_rng(generators)
    if d.enabled:
        box = [None] * d.world
        torch.distributed.all_gather_object(box, rng)
        rng = box
    else:
        rng = [rng]
    return {"step": step, "config": cfg, "world_size": d.world,
            "eps": obj.eps.state_dict(), "proj": obj.proj.state_dict(),
            "ema_eps": ema_eps.net.state_dict(), "ema_proj": ema_proj.net.state_dict(),
            "optimizer": opt.state_dict(), "rng": rng}


def load_training_state(path: Path) -> dict:
    """A training checkpoint, or a one-line CheckpointError when the file is something else."""
    state = ckpt.load(path, map_location="cpu")
    missing = [k for k in TRAINING_STATE if not isinstance(state, dict) or k not in state]
    if missing:
        raise ckpt.CheckpointError(f"{path} is not a training checkpoint of train/run.py (no {', '.join(missing)})")
    return state


def train(cfg: dict, run_dir: Path, d: D.Dist | None = None, *, resume: Path | None = None,
          make_nets: Callable[[dict], tuple[nn.Module, nn.Module]] | None = None, fused: bool = False,
          dataset=None, progress: bool = True, stop_at: int | None = None):
    """Train the score and projection networks of an image config for cfg['iterations'] steps (from a
    checkpoint with `resume`). Returns (eps_ema, proj_ema, logged rows). `stop_at` stops after that
    step, as an interruption would (checkpoint written)."""
    from .data_order import batches
    from .datasets import make_dataset

    d = d or D.Dist()
    run_dir = Path(run_dir)
    make_nets = make_nets or build_nets
    if dataset is None:
        dataset = make_dataset(cfg["dataset"], cfg.get("data_root"), cfg["resolution"])
    if len(dataset) < cfg["batch_size"]:
        raise UsageError(f"the {cfg['dataset']} set has {len(dataset)} images, fewer than one batch of "
                         f"{cfg['batch_size']}: lower --batch-size")
    if cfg["batch_size"] % d.world:
        raise UsageError(f"batch_size {cfg['batch_size']} must be divisible by the number of processes {d.world}")
    sde = VPSDE()

    torch.manual_seed(cfg["seed"])  # same initial weights on every rank (DDP also broadcasts them)
    eps_model, proj_model = make_nets(cfg)
    if fused:
        use_fused([eps_model, proj_model])
    eps_model, proj_model = eps_model.to(d.device), proj_model.to(d.device)
    fwd = [compiled(eps_model, cfg.get("compile")), compiled(proj_model, cfg.get("compile"))]
    obj = JointObjective(eps_model, proj_model, sde, cfg, forward_nets=fwd).to(d.device)
    ema_eps, ema_proj = EMA(obj.eps, cfg["ema_decay"]), EMA(obj.proj, cfg["ema_decay"])
    opt = make_optimizer(obj.parameters(), cfg)
    gen = torch.Generator(device=d.device).manual_seed(int(cfg["seed"]) * 7919 + d.rank + 1)

    start, last_good = 0, (0, None)
    if resume is not None:
        state = load_training_state(resume)
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
    stop = cfg["iterations"] if stop_at is None else min(stop_at, cfg["iterations"])

    def save(done):
        snap = bool(cfg.get("snapshot_every")) and done % cfg["snapshot_every"] == 0
        state = _state(done, obj, opt, ema_eps, ema_proj, cfg, d, {"loss_noise": gen})
        path = ckpt.save_checkpoint(state, ckpt_dir, done, keep_snapshot=snap) if d.main else None
        D.barrier(d)
        return path

    def sample(done):
        from .generate import draw
        from .plots import grid_scale, save_grid

        obj.eval()
        with torch.no_grad():
            x, _ = draw(ema_eps.net, ema_proj.net, sde, "predict_project", 20, min(64, cfg["eval"]["grid"]),
                        cfg, d, seed=cfg["seed"] + 10_000, backend="triton" if fused else "auto")
        save_grid(x, run_dir / "samples" / f"train_step{done:08d}_pp20.png", scale=grid_scale(cfg))
        obj.train()

    rows = loop(model=model, opt=opt, batches=batches(dataset, cfg, d, start, stop), cfg=cfg, d=d, start=start, stop=stop,
         generator=gen, clip_groups=groups, emas=[(ema_eps, obj.eps), (ema_proj, obj.proj)], log=log, save=save,
         last_good=last_good, watch=[obj], sample=sample, progress=progress)
    if d.main:
        from .plots import plot_losses

        plot_losses(run_dir / "losses.csv", run_dir / "losses.png")
    return ema_eps.net, ema_proj.net, rows


__all__ = ["loop", "train", "lr_at", "make_optimizer", "autocast", "load_training_state", "TRAINING_STATE"]
