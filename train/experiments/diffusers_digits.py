"""A diffusers UNet2DModel trained on the digits with our DSM loss, saved the way diffusers saves models.

ALGORITHMS §1. The score model of the --score-from demonstration (docs/score_from.md): diffusers' own
model class (about the size of the main job's score net) and DDPM schedule (linear 1e-4 .. 0.02 over
1000 steps, epsilon prediction), trained with `wgfcore.losses.dsm_loss` at our VP times through
`wgfcore.adapters.from_diffusers` (the model is called at the fractional timestep of the same noise
level), with the main job's optimisation through the engine's loop. --out becomes a diffusers model
folder: its EMA weights by `save_pretrained`, `scheduler_config.json` beside them, plus losses.csv and
train_info.json.

    python train/run.py diffusers-digits --out runs/diffusers-digits
    python train/run.py --score-from runs/diffusers-digits --out runs/digits-T-on-diffusers
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from wgfcore.adapters import from_diffusers
from wgfcore.losses import dsm_loss
from wgfcore.sde import VPSDE

from ..data.datasets import make_dataset
from ..data.order import batches, check_batch
from ..engine.cli import pos_int
from ..engine.config import Config
from ..engine.distributed import Dist
from ..engine.errors import UsageError
from ..engine.loop import loop, loss_fields, make_optimizer
from ..engine.networks import EMA
from ..engine.rundir import Lock, LossLog, make_folder, write_json
from ..engine.runfiles import LOCK
from ..evaluation.plots import plot_losses

#: diffusers' UNet2DModel at 16x16x1: 176,849 parameters (the main job's score U-Net: 190,369)
UNET = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=[16, 32], layers_per_block=1,
            down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
            norm_num_groups=8, attention_head_dim=32)
#: what this study writes into --out (and all that --overwrite removes)
WRITES = ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "losses.csv", "losses.png",
          "train_info.json")
#: the main job's optimisation (train/configs/digits.json) for the score alone
TRAINING = {"dataset": "digits", "resolution": 16, "channels": 1, "preset": "tiny", "batch_size": 64,
            "iterations": 1600, "lr": 0.002, "warmup": 50, "weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.995,
            "delta_tau": 0.05, "proj_weight": 1.0, "bf16": True, "num_workers": 0, "log_every": 25,
            "ckpt_every": 1600, "seed": 0, "eval": {"metric": "digits-fd", "rows": ["em"], "steps": [20],
                                                     "samples": 64, "batch": 64}}


class DiffusersDSM(nn.Module):
    """L_dsm of a diffusers epsilon model at our VP times: eps(x, t) = -s(x, t) sigma_t, with s from
    `from_diffusers` (inside the table's noise range, the model's own output at the matching timestep).
    t is drawn from U(t_lo, 1), t_lo the table's lowest noise level: below it the model has no timestep."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, sde: VPSDE):
        super().__init__()
        self.unet, self.sde = unet, sde
        self.__dict__["score"] = from_diffusers(unet, alphas_cumprod=alphas_cumprod, sde=sde)
        self.t_lo = self.score.t_range[0]

    def forward(self, x0, generator):
        sigma = self.sde.sigma

        def eps(x, t):
            return -self.score(x, t) * sigma(t).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

        loss = dsm_loss(eps, x0, self.sde, eps_t=self.t_lo, generator=generator)
        return loss, torch.stack([loss.detach(), torch.zeros_like(loss).detach()])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", type=Path, required=True, help="the diffusers model folder to write (a new folder)")
    p.add_argument("--overwrite", action="store_true", help="replace what an earlier run of this study wrote")
    p.add_argument("--iterations", type=pos_int, default=TRAINING["iterations"])
    p.add_argument("--seed", type=int, default=TRAINING["seed"])
    p.add_argument("--threads", type=pos_int, default=1)
    p.add_argument("--no-progress", action="store_true")


def _claim(out: Path, overwrite: bool) -> Lock:
    """Lock --out for this study: a new or empty folder, or (with --overwrite) one this study wrote before,
    whose files it removes; anything else is refused and left as it was."""
    make_folder(out, "output folder")
    lock = Lock(out).acquire()
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    try:
        if others and not (overwrite and (out / "train_info.json").is_file() and set(others) <= set(WRITES)):
            raise UsageError(f"--out {out} is not empty ({', '.join(others[:4])}); choose a new folder"
                             + ("" if overwrite else ", or replace an earlier output of this study with --overwrite"))
        for name in others:
            (out / name).unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def run(args) -> int:
    try:
        import diffusers
    except ImportError:
        raise UsageError("diffusers-digits needs diffusers: pip install 'wgfcore[pretrained]'") from None
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    cfg = Config.from_dict({**TRAINING, "iterations": args.iterations, "seed": args.seed,
                            "ckpt_every": args.iterations, "log_every": min(TRAINING["log_every"], args.iterations)},
                           "the diffusers-digits study")
    torch.set_num_threads(args.threads)
    d = Dist()
    data = make_dataset(cfg.dataset, None, cfg.resolution)
    check_batch(len(data), cfg)
    lock = _claim(args.out, args.overwrite)
    try:
        torch.manual_seed(cfg.seed)
        unet = diffusers.UNet2DModel(**UNET)
        scheduler = diffusers.DDPMScheduler()
        obj = DiffusersDSM(unet, scheduler.alphas_cumprod, VPSDE())
        ema = EMA(unet, cfg.ema_decay)
        opt = make_optimizer(unet.parameters(), cfg)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1)
        groups = [("", list(unet.parameters()))]
        log = LossLog(args.out / "losses.csv", loss_fields(groups), None)

        def save(done):
            if done < cfg.iterations:
                return None
            ema.net.save_pretrained(args.out)  # config.json + diffusion_pytorch_model.safetensors
            scheduler.save_pretrained(args.out)  # scheduler_config.json beside them
            return args.out / "diffusion_pytorch_model.safetensors"

        t0 = time.time()
        loop(model=obj, opt=opt, batches=batches(data, cfg, d, 0, cfg.iterations), cfg=cfg, d=d, start=0,
             stop=cfg.iterations, generator=gen, clip_groups=groups, emas=[(ema, unet)], log=log, save=save,
             last_good=(0, None), watch=[unet], progress=not args.no_progress, desc="diffusers UNet2DModel, DSM")
        plot_losses(args.out / "losses.csv", args.out / "losses.png")
        write_json({"argv": ["train/run.py", *getattr(args, "argv", [])], "training": cfg.data, "unet": UNET,
                    "scheduler": json.loads(json.dumps(dict(scheduler.config))),
                    "parameters": sum(q.numel() for q in unet.parameters()), "t_lo": obj.t_lo,
                    "train_seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "diffusers": diffusers.__version__}, args.out / "train_info.json")
    finally:
        lock.release()
    print(f"wrote {args.out}: a diffusers UNet2DModel folder (EMA weights) with scheduler_config.json", file=sys.stderr)
    return 0


__all__ = ["add_arguments", "run", "DiffusersDSM", "UNET", "TRAINING"]
