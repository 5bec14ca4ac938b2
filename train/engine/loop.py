"""The training loop every job shares (image U-Nets, the 2-D toy's MLPs, the experiments' MLPs).

ALGORITHMS §1 and §3: `loop` runs an objective (train.engine.objectives) with an optimizer, warm-up
and an optional cosine schedule, gradient clipping, EMA of the networks, bf16 autocast on GPU, DDP, a
loss log and checkpoints. At every log interval it checks that the loss and all weights are finite; a
run that diverged stops with `Diverged` naming the step, before it writes anything over the last
good checkpoint.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed as D
from .config import Config
from .errors import Diverged, UsageError
from .networks import EMA, all_finite
from .rundir import LossLog


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps (as in score_sde), then constant, or with
    lr_schedule 'cosine' a cosine decay to lr_min_ratio * lr at the last iteration (the toy's)."""
    lr = cfg.lr
    if cfg.lr_schedule == "cosine":
        lo = lr * float(cfg.lr_min_ratio)
        lr = lo + (lr - lo) * (1 + math.cos(math.pi * step / cfg.iterations)) / 2
    w = int(cfg.warmup)
    return lr * min(1.0, (step + 1) / w) if w > 0 else lr


def make_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    betas = tuple(cfg.adam_betas)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas)


def autocast(d: D.Dist, cfg: Config):
    on = d.device.type == "cuda" and bool(cfg.bf16)
    return torch.autocast(device_type=d.device.type, dtype=torch.bfloat16, enabled=on)


def _grad_norm_clip(params, max_norm: float) -> torch.Tensor:
    params = [p for p in params if p.grad is not None]
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


def loss_fields(groups) -> list[str]:
    return ["step", "loss", "dsm", "proj", "lr", *[f"grad_norm_{g}" if g else "grad_norm" for g, _ in groups],
            "seconds"]


def loop(*, model: nn.Module, opt: torch.optim.Optimizer, batches, cfg: Config, d: D.Dist, start: int, stop: int,
         generator, clip_groups: list, emas: list, log: LossLog | None, save: Callable[[int], Path | None],
         last_good: tuple[int, Path | None], watch: list, sample: Callable[[int], None] | None = None,
         progress: bool = True, desc: str = "train") -> list[dict]:
    """Train from `start` to `stop`; returns the logged rows.

    model(x0, generator) -> (loss, parts [dsm, proj]); `clip_groups` = [(name, params)] clipped (and
    logged) separately; `emas` = [(EMA, net)] updated after each step; `save(step)` writes a checkpoint
    (rank 0 returns its path); `watch` = modules whose weights must stay finite."""
    every = int(cfg.log_every)
    rows, acc, t0 = [], [], time.time()
    bar = tqdm(total=cfg.iterations, initial=start, desc=desc, disable=not (progress and d.main),
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
            norms = [_grad_norm_clip(params, cfg.grad_clip) for _, params in clip_groups]
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
                if d.main and log is not None:
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
                    raise Diverged(f"training diverged: {what} (lr {lr:.3g}, ema_decay {cfg.ema_decay}); "
                                   f"{kept}; nothing was saved after it. Lower --lr or check the data.")
            if sample is not None and cfg.sample_every and done % cfg.sample_every == 0 and d.main:
                sample(done)
            if done % cfg.ckpt_every == 0 or done == stop:
                path = save(done)
                good_step, good_path = done, path
    finally:
        bar.close()
        if log is not None:
            log.close()
    return rows


def fit(*, objective: nn.Module, trained: dict[str, tuple[nn.Module, EMA]], opt: torch.optim.Optimizer, gen,
        cfg: Config, d: D.Dist, run_dir: Path, batches_from: Callable[[int, int], object], resume: Path | None,
        stop_at: int | None, sample: Callable[[int], None] | None, progress: bool) -> list[dict]:
    """What a job does around `loop`, the same for every network job: restore a checkpoint (`resume`), wrap the
    objective in DDP, open the loss log, save checkpoints in the run folder, and train to cfg.iterations (or
    `stop_at`). `trained` = {"eps"|"proj": (network, its EMA)}: the networks that learn, under the keys the
    checkpoint stores them by (a projection-only run has no "eps"); `batches_from(start, stop)` the data."""
    start, last_good = 0, (0, None)
    if resume is not None:
        state = ckpt.load_training_state(resume)
        if int(state["world_size"]) != d.world:
            raise UsageError(f"{resume} was written by {state['world_size']} processes; resume it with "
                             f"the same number (got {d.world}) so the data order and noise continue exactly")
        for key, (net, ema) in trained.items():
            net.load_state_dict(state[key])
            ema.net.load_state_dict(state[f"ema_{key}"])
        opt.load_state_dict(state["optimizer"])
        ckpt.restore_rng(state["rng"][d.rank], {"loss_noise": gen})
        start = int(state["step"])
        last_good = (start, Path(resume))

    model = objective
    if d.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    groups = [(key, list(net.parameters())) for key, (net, _) in trained.items()]
    log = LossLog(run_dir / "losses.csv", loss_fields(groups), start if resume is not None else None,
                  run_dir / "tensorboard") if d.main else None
    stop = cfg.iterations if stop_at is None else min(stop_at, cfg.iterations)
    nets = {key: trained.get(key, (None, None)) for key in ("eps", "proj")}

    def save(done):
        snap = bool(cfg.snapshot_every) and done % cfg.snapshot_every == 0
        (eps, ema_eps), (proj, ema_proj) = nets["eps"], nets["proj"]
        state = ckpt.training_state(done, cfg, d, eps, proj, ema_eps and ema_eps.net, ema_proj and ema_proj.net,
                                    opt, {"loss_noise": gen})
        path = ckpt.save_checkpoint(state, run_dir / "checkpoints", done, keep_snapshot=snap) if d.main else None
        D.barrier(d)
        return path

    return loop(model=model, opt=opt, batches=batches_from(start, stop), cfg=cfg, d=d, start=start, stop=stop,
                generator=gen, clip_groups=groups, emas=[(ema, net) for net, ema in trained.values()], log=log,
                save=save, last_good=last_good, watch=[net for net, _ in trained.values()], sample=sample,
                progress=progress)


__all__ = ["loop", "fit", "lr_at", "make_optimizer", "autocast", "loss_fields"]
