"""The projection-only job, `train/run.py train --score-from PATH`: Predict-Project for a score model someone
already has. Only T is trained, with the projection loss, on the frozen score (ALGORITHMS §3: the loss sees
the score detached, so nothing flows into it); the run is otherwise the image job's (run folder, lock,
resume, divergence, overwrite, evaluation), and its config records the score as `score_from`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from wgfcore.pretrained import save_projection, unet_spec
from wgfcore.sde import VPSDE, eps_to_score

from ..data.datasets import make_dataset
from ..data.order import batches, check_batch
from ..engine import distributed as D
from ..engine.config import Config
from ..engine.errors import UsageError
from ..engine.loop import fit, make_optimizer
from ..engine.networks import EMA, Kernels, build_projection, compiled, frozen_score, use_fused
from ..engine.objectives import ProjectionObjective
from ..evaluation.draw import draw
from ..evaluation.plots import grid_scale, plot_losses, save_grid

#: where a finished projection-only run keeps T in the export format (`wgfcore.pretrained.load_projection`)
EXPORT_DIR = "projection"


def proj_width(cfg: Config, width: float) -> dict:
    """cfg.proj_net for T at `width` times the config's U-Net width: model_channels and head_channels
    scaled together (the same number of attention heads), each to a whole number of channels."""
    from wgfcore.nets import PRESETS

    base = {**PRESETS.get(cfg.preset, {}), **cfg.net}
    out = dict(cfg.proj_net)
    for key in ("model_channels", "head_channels"):
        v = base.get(key, 0) * width
        if v < 1 or abs(v - round(v)) > 1e-9:
            raise UsageError(f"--proj-width {width:g}: {key} {base.get(key)} x {width:g} = {v:g} is not a whole "
                             f"number of channels >= 1 (set proj_net in a --config file instead)")
        out[key] = int(round(v))
    return out


def projection_setup(args, cfg: Config, resume) -> tuple[Config, object]:
    """On rank 0, before the run folder is claimed: the config with T's width (--proj-width) and, for a
    projection-only run, its score_from, and the loaded frozen score (None for a joint run)."""
    width = getattr(args, "proj_width", None)
    if width and resume is None:
        cfg = cfg.with_changes("--proj-width", proj_net=proj_width(cfg, width))
    elif width and proj_width(cfg, width) != cfg.proj_net:
        raise UsageError(f"--resume {resume} fixes T's width (proj_net {cfg.proj_net}); --proj-width {width:g} "
                         "differs")
    return attach_score(args, cfg, resume)


def attach_score(args, cfg: Config, resume) -> tuple[Config, object]:
    """(config with score_from, the loaded frozen score) for a projection-only run, else (cfg, None).
    Every problem with the score is one UsageError line."""
    given = getattr(args, "score_from", None)
    if resume is not None and not cfg.projection_only:
        if given:
            raise UsageError(f"--resume {resume} continues a jointly trained run; --score-from starts a "
                             "projection-only run in another --out")
        return cfg, None
    if not given and not cfg.projection_only:
        return cfg, None
    if cfg.toy:
        raise UsageError("--score-from trains a projection for an image score model; not for --dataset gmm")
    if resume is not None:
        rec = cfg.score_from
        if given and Path(given).expanduser().resolve() != Path(rec["path"]):
            raise UsageError(f"--resume {resume} continues T on the score at {rec['path']}; --score-from {given} "
                             "differs (drop --score-from, or start a new run)")
        return cfg, frozen_score(rec["path"], record=rec, what=f"--resume {resume}: its score")
    if cfg.score_from is not None and not given:
        raise UsageError("score_from is written by --score-from PATH, not set in a config file")
    score = frozen_score(given, shape=(cfg.channels, cfg.resolution))
    print(f"--score-from: {score.kind} score, {score.info['parameters']:,} parameters, sha256 {score.sha256[:12]}...; "
          f"training T only", file=sys.stderr)
    return cfg.with_changes("--score-from", score_from=score.record()), score


def train_projection(cfg: Config, run_dir: Path, d: D.Dist | None = None, *, resume: Path | None = None,
                     kernels: Kernels = Kernels(), dataset=None, progress: bool = True, score=None,
                     stop_at: int | None = None):
    """Train T alone on the frozen score of cfg.score_from for cfg.iterations steps (from a checkpoint with
    `resume`). Returns (the frozen score, T's EMA, logged rows); writes T in the export format at the end."""
    d = d or D.Dist()
    run_dir = Path(run_dir)
    if dataset is None:
        dataset = make_dataset(cfg.dataset, cfg.data_root, cfg.resolution)
    check_batch(len(dataset), cfg, d.world)
    sde = VPSDE()
    if score is None:  # ranks > 0 (rank 0 loaded it while checking the input)
        score = frozen_score(cfg.score_from["path"], record=cfg.score_from)
    score.to(d.device)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    proj_model = build_projection(cfg)
    if kernels.nets:
        use_fused([proj_model])
    proj_model = proj_model.to(d.device)
    obj = ProjectionObjective(proj_model, eps_to_score(score, sde), sde, cfg,
                              forward_net=compiled(proj_model, cfg.compile)).to(d.device)
    ema = EMA(proj_model, cfg.ema_decay)
    opt = make_optimizer(proj_model.parameters(), cfg)
    gen = torch.Generator(device=d.device).manual_seed(int(cfg.seed) * 7919 + d.rank + 1)

    def sample(done):
        obj.eval()
        with torch.no_grad():
            x, _ = draw(score, ema.net, sde, "predict_project", 20, min(64, cfg.eval.grid), cfg, d,
                        seed=cfg.seed + 10_000, backend=kernels.steps)
        save_grid(x, run_dir / "samples" / f"train_step{done:08d}_pp20.png", scale=grid_scale(cfg))
        obj.train()

    rows = fit(objective=obj, trained={"proj": (proj_model, ema)}, opt=opt, gen=gen, cfg=cfg, d=d, run_dir=run_dir,
               batches_from=lambda start, stop: batches(dataset, cfg, d, start, stop), resume=resume,
               stop_at=stop_at, sample=sample, progress=progress)
    stop = cfg.iterations if stop_at is None else min(stop_at, cfg.iterations)
    if d.main:
        plot_losses(run_dir / "losses.csv", run_dir / "losses.png")
        if stop == cfg.iterations:
            export_projection(cfg, ema.net, run_dir / EXPORT_DIR, stop)
    return score, ema.net, rows


def export_projection(cfg: Config, net, folder: Path, step: int) -> Path:
    """T in the standard format (safetensors state_dict + config.json; `wgfcore.pretrained.save_projection`)."""
    preset, kw = unet_spec(cfg.data, projection=True)
    try:
        return save_projection(folder, net, {"preset": preset, "unet": kw, "score_from": cfg.score_from,
                                             "sde": {"kind": "VPSDE", "b_min": VPSDE().b_min, "b_max": VPSDE().b_max},
                                             "delta_tau": list(cfg.delta_tau) if isinstance(cfg.delta_tau, tuple) else cfg.delta_tau, "step": step,
                                             "trained_by": "train/run.py train --score-from"})
    except OSError as e:
        raise UsageError(f"cannot write T to {folder}: {e.strerror or e}") from None


__all__ = ["projection_setup", "attach_score", "train_projection", "export_projection", "proj_width", "EXPORT_DIR"]
