"""Predict-Project on a score network someone already has: a frozen score from a diffusers `UNet2DModel`
folder or a wgfcore run folder, checked and hashed, and the projection network T in a standard format.

ALGORITHMS §1 (s = -eps / sigma_t) and §3 (the projection loss sees the score detached, so T can be learned
on any frozen score). The diffusers time map is `wgfcore.adapters.from_diffusers`; a v- or x0-prediction
model is turned into an epsilon model exactly, at the model's own noise level, before it reaches it.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from .adapters import alpha_bar_at, from_diffusers
from .sde import VPSDE, bcast, eps_to_score

#: the format tag of an exported projection network (config.json beside model.safetensors / model.pt)
FORMAT = "wgfcore-projection/1"
WEIGHTS_SAFETENSORS, WEIGHTS_TORCH, CONFIG = "model.safetensors", "model.pt", "config.json"
#: diffusers' names for what a model predicts, and the score parameterisations we convert exactly
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                     "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")


class ScoreSourceError(ValueError):
    """A score source (folder) that cannot be used: the message is one line saying what was expected."""


# --- hashing -----------------------------------------------------------------------------------------------

def state_sha256(state_dict: dict, extra: dict | None = None) -> str:
    """sha256 of a state_dict's tensors (name, dtype, shape and bytes, in name order), plus `extra` as
    canonical JSON: the same weights give the same hash whatever file format or device they came from."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if extra:
        h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


# --- reading folders ---------------------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ScoreSourceError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScoreSourceError(f"{what} {path} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ScoreSourceError(f"{what} {path} must hold a JSON object")
    return obj


def _diffusers_model_dir(path: Path) -> Path | None:
    """The diffusers model folder behind `path` (itself, or a pipeline's unet/), or None."""
    if (path / "config.json").is_file():
        try:
            if "_class_name" in json.loads((path / "config.json").read_bytes().decode("utf-8")):
                return path
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
            return None
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    return None


def source_kind(path) -> str:
    """'wgfcore' (a run folder: config.json and checkpoints/) or 'diffusers' (a model or pipeline folder)."""
    path = Path(path)
    if not path.exists():
        raise ScoreSourceError(f"{path} does not exist")
    if not path.is_dir():
        raise ScoreSourceError(f"{path} is a file; expected a wgfcore run folder or a diffusers model folder")
    if _diffusers_model_dir(path) is not None:
        return "diffusers"
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return "wgfcore"
    raise ScoreSourceError(f"{path} is neither a wgfcore run folder (config.json and checkpoints/) nor a diffusers "
                           "model folder (config.json with _class_name, and diffusion_pytorch_model.* weights)")


# --- the score source --------------------------------------------------------------------------------------

class ScoreSource(nn.Module):
    """A frozen score network, seen the way our trainer sees a score net: `forward(x, t)` is the epsilon
    prediction at our VP time t (so s = -eps / sigma_t, ALGORITHMS §1), and `score_fn(x, t)` the score itself.

    `channels` and `resolution` are the images it takes (resolution None: any); `record()` is what a run
    stores (kind, path, sha256 and what defines s(x, t)); `sha256` covers the weights and, for diffusers,
    the noise table and prediction type. The parameters never require gradients."""

    def __init__(self, kind: str, path: str, net: nn.Module, channels: int, resolution: int | None, sha256: str,
                 info: dict, score_fn: Callable, eps_fn: Callable):
        super().__init__()
        self.kind, self.path, self.net, self.channels, self.resolution = kind, path, _frozen(net), channels, resolution
        self.sha256, self.info = sha256, info
        self.__dict__.update(score_fn=score_fn, _eps_fn=eps_fn)  # plain attributes: `net` is the one submodule

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._eps_fn(x, t)

    def train(self, mode: bool = True) -> "ScoreSource":
        return super().train(False)  # frozen: dropout and the like stay off whatever the caller asks

    def set_kernels(self, mode: str, **kw) -> "ScoreSource":
        """The wgfcore U-Net's kernel switch (--fused) where the score is one; a diffusers model keeps its own
        kernels (said once, as a warning), while T and the sampler steps still take the fused path."""
        if hasattr(self.net, "set_kernels"):
            self.net.set_kernels(mode, **kw)
        elif mode != "torch":
            warnings.warn(f"the {self.kind} score model keeps its own kernels; '{mode}' applies to T and the "
                          "sampler steps", stacklevel=2)
        return self

    def record(self) -> dict:
        return {"kind": self.kind, "path": self.path, "sha256": self.sha256, **self.info}

    def check_shape(self, channels: int, resolution: int, what: str = "the dataset") -> None:
        """A ScoreSourceError unless the score takes `channels` x `resolution` x `resolution` images."""
        res = self.resolution if self.resolution is not None else resolution
        if (self.channels, res) != (channels, resolution):
            shown = f"{self.resolution}x{self.resolution}" if self.resolution is not None else "any size"
            raise ScoreSourceError(f"the score model takes {self.channels}-channel images of {shown}, but {what} "
                                   f"is {channels}-channel {resolution}x{resolution}")

    def check_record(self, record: dict) -> None:
        """A ScoreSourceError if this score is not the one `record` (a run's stored record) names."""
        if record.get("sha256") != self.sha256:
            raise ScoreSourceError(f"the score at {self.path} has changed since T was trained on it (sha256 "
                                   f"{str(record.get('sha256'))[:12]}... then, {self.sha256[:12]}... now)")


def _frozen(net: nn.Module) -> nn.Module:
    return net.eval().requires_grad_(False)


def load_score(path, *, sde: VPSDE | None = None) -> ScoreSource:
    """The frozen score network in `path`: a diffusers `UNet2DModel` folder (with its scheduler config
    beside it, in scheduler/, or in the pipeline's scheduler/) or a wgfcore run folder (its EMA score
    weights, from a finished checkpoint). Nothing in `path` is written. Raises ScoreSourceError."""
    path = Path(path).expanduser()
    kind = source_kind(path)
    sde = sde or VPSDE()
    return _load_diffusers(path, sde) if kind == "diffusers" else _load_wgfcore(path, sde)


# --- diffusers -----------------------------------------------------------------------------------------------

def _scheduler_config(path: Path, model_dir: Path) -> Path:
    for cand in (model_dir / "scheduler_config.json", model_dir / "scheduler" / "scheduler_config.json",
                 path / "scheduler" / "scheduler_config.json", model_dir.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return cand
    raise ScoreSourceError(f"no scheduler_config.json beside {model_dir} or in a scheduler/ folder: the model's "
                           "noise schedule is unknown (save it with scheduler.save_pretrained)")


def _check_unet_config(cfg: dict, model_dir: Path) -> None:
    cls = cfg.get("_class_name")
    if cls != "UNet2DModel":
        raise ScoreSourceError(f"{model_dir} holds a diffusers {cls}; --score-from takes an unconditional UNet2DModel")
    if cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None:
        raise ScoreSourceError(f"{model_dir} is a class-conditional UNet2DModel (num_class_embeds "
                               f"{cfg.get('num_class_embeds')}, class_embed_type {cfg.get('class_embed_type')!r}); "
                               "only unconditional models give a score")
    emb = cfg.get("time_embedding_type", "positional")
    if emb != "positional":
        raise ScoreSourceError(f"{model_dir}: time_embedding_type {emb!r} does not take DDPM timesteps (a 'fourier' "
                               "model is a VE/NCSN++ model; a 'learned' one takes integer timesteps only); "
                               "--score-from needs 'positional'")
    if cfg.get("out_channels", cfg.get("in_channels")) != cfg.get("in_channels"):
        raise ScoreSourceError(f"{model_dir}: in_channels {cfg.get('in_channels')} and out_channels "
                               f"{cfg.get('out_channels')} differ; a score model predicts an image-shaped output")
    if not any((model_dir / w).is_file() for w in DIFFUSERS_WEIGHTS):
        raise ScoreSourceError(f"{model_dir} has no weights ({' or '.join(DIFFUSERS_WEIGHTS[:2])})")


def _resolution(cfg: dict, model_dir: Path) -> int | None:
    size = cfg.get("sample_size")
    if size is None:
        return None
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ScoreSourceError(f"{model_dir}: sample_size {size} is not square; the image jobs use square images")
        size = size[0]
    return int(size)


def _ddpm_table(sched_cfg: dict, where: Path) -> tuple[torch.Tensor, str]:
    """(alphas_cumprod as float64, prediction type) of a diffusers scheduler config, built by diffusers
    itself (its float32 table is the one the model was trained with), refused unless it is a DDPM table."""
    try:
        import diffusers
    except ImportError:
        raise ScoreSourceError(f"{where.parent} is a diffusers folder, and reading it needs diffusers: "
                               "pip install 'wgfcore[pretrained]'") from None

    name = sched_cfg.get("_class_name")
    pred = sched_cfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ScoreSourceError(f"{where}: prediction_type {pred!r}; supported: {', '.join(PREDICTION_TYPES)}")
    if sched_cfg.get("timestep_type", "discrete") != "discrete":
        raise ScoreSourceError(f"{where}: timestep_type {sched_cfg['timestep_type']!r}; the model must take DDPM "
                               "timesteps ('discrete')")
    cls = getattr(diffusers, str(name), None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ScoreSourceError(f"{where}: _class_name {name!r} is not a diffusers scheduler")
    try:
        sched = cls.from_config(sched_cfg)
    except Exception as e:  # diffusers raises NotImplementedError/ValueError/TypeError for bad tables
        raise ScoreSourceError(f"{where}: not a DDPM beta table ({name}: {type(e).__name__}: "
                               f"{' '.join(str(e).split())[:160]})") from None
    ab = getattr(sched, "alphas_cumprod", None)
    if ab is None:
        raise ScoreSourceError(f"{where}: {name} has no DDPM beta table (alphas_cumprod); a VE or EDM schedule "
                               "is not a VP model")
    ab = torch.as_tensor(ab).detach().to(torch.float64).flatten()
    ok = ab.numel() >= 2 and bool(((ab > 0) & (ab < 1)).all()) and bool((ab[1:] < ab[:-1]).all())
    if not ok:
        raise ScoreSourceError(f"{where}: not a DDPM beta table: alphas_cumprod must decrease strictly inside (0, 1) "
                               f"(betas in (0, 1){', no zero-terminal-SNR rescaling' if sched_cfg.get('rescale_betas_zero_snr') else ''})")
    return ab, pred


class _AsEpsilon(nn.Module):
    """A diffusers v- or x0-prediction model as an epsilon model, exactly, at the model's own alpha_bar(tau):
    with a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar), x = a x0 + s eps and v = a eps - s x0,
    eps = a v + s x  (v-prediction)  and  eps = (x - a x0) / s  (x0-prediction)."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str):
        super().__init__()
        self.unet, self.prediction_type = unet, prediction_type
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone(), persistent=False)

    def forward(self, x, tau):
        out = self.unet(x, tau)
        out = out.sample if hasattr(out, "sample") else out
        ab = alpha_bar_at(self.alphas_cumprod, tau.to(torch.float64))
        a, s = bcast(ab.sqrt(), x), bcast((1 - ab).sqrt(), x)
        return a * out + s * x if self.prediction_type == "v_prediction" else (x - a * out) / s


def _load_diffusers(path: Path, sde: VPSDE) -> ScoreSource:
    model_dir = _diffusers_model_dir(path)
    cfg = _read_json(model_dir / "config.json", "diffusers model config")
    _check_unet_config(cfg, model_dir)
    sched_path = _scheduler_config(path, model_dir)
    table, pred = _ddpm_table(_read_json(sched_path, "scheduler config"), sched_path)
    import diffusers
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # no advice about optional packages on stderr
    try:
        safe = any((model_dir / w).is_file() for w in DIFFUSERS_WEIGHTS if ".safetensors" in w)
        unet = diffusers.UNet2DModel.from_pretrained(str(model_dir), low_cpu_mem_usage=False, local_files_only=True,
                                                     use_safetensors=safe)
    except Exception as e:
        raise ScoreSourceError(f"cannot load the UNet2DModel in {model_dir}: {type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]}") from None
    finally:
        dlogging.set_verbosity(level)
    unet = _frozen(unet)
    digest = state_sha256(unet.state_dict(), {"prediction_type": pred,
                                              "alphas_cumprod": hashlib.sha256(table.numpy().tobytes()).hexdigest()})
    model = unet if pred == "epsilon" else _frozen(_AsEpsilon(unet, table, pred))
    score_fn = from_diffusers(model, alphas_cumprod=table, sde=sde)

    def eps_fn(x, t):  # the model's epsilon at our time t: -s sigma_t (= its output inside the table's range)
        return -score_fn(x, t) * bcast(sde.sigma(t), x)

    info = {"model": str(model_dir.resolve()), "scheduler": str(sched_path.resolve()), "prediction_type": pred,
            "num_train_timesteps": int(table.numel()), "t_range": list(score_fn.t_range),
            "parameters": sum(p.numel() for p in unet.parameters())}
    return ScoreSource("diffusers", str(path.resolve()), model, int(cfg["in_channels"]), _resolution(cfg, model_dir),
                       digest, info, score_fn, eps_fn)


# --- wgfcore run folders ---------------------------------------------------------------------------------------
# The run folder of train/run.py: config.json, checkpoints/last.pt (and ckpt_<step>.pt snapshots), each a
# torch.save'd dict with "step", "config", "ema_eps" (the score's EMA weights) and "ema_proj" (T's).

def unet_spec(cfg: dict, projection: bool = False) -> tuple[str, dict]:
    """(preset, keyword arguments) of the U-Net of a run config: cfg['net'] at the run's resolution and
    channels; for T (`projection`) cfg['proj_net'] overrides it further. JSON-able (lists, not tuples)."""
    kw = dict(cfg.get("net") or {})
    if projection:
        kw.update(cfg.get("proj_net") or {})
    kw.update(img_resolution=cfg["resolution"], in_channels=cfg["channels"])
    return cfg["preset"], kw


def build_unet(cfg: dict, projection: bool = False) -> nn.Module:
    """UNet.from_preset(*unet_spec(cfg, projection)). Raises ValueError/TypeError/KeyError on a bad config."""
    from .nets import UNet

    preset, kw = unet_spec(cfg, projection)
    return UNet.from_preset(preset, **{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


def _load_checkpoint(p: Path) -> dict | None:
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return state if isinstance(state, dict) and "step" in state and "config" in state else None


def finished_checkpoint(run: Path) -> tuple[Path, dict]:
    """(path, state) of the checkpoint of a run that reached its config's iterations; ScoreSourceError if none."""
    ck = run / "checkpoints"
    cands = [ck / "last.pt", *sorted(ck.glob("ckpt_*.pt"), reverse=True)]
    newest = None
    for p in cands:
        state = _load_checkpoint(p) if p.is_file() else None
        if state is None:
            continue
        newest = newest or (p, state)
        if int(state["step"]) >= int(state["config"].get("iterations", math.inf)):
            return p, state
    if newest is None:
        raise ScoreSourceError(f"{run} has no readable checkpoint in {ck}")
    p, state = newest
    raise ScoreSourceError(f"{run} has no finished checkpoint: the newest, {p.name}, is at step {state['step']} of "
                           f"{state['config'].get('iterations')} (finish it with --resume, or use a finished run)")


def _load_wgfcore(path: Path, sde: VPSDE) -> ScoreSource:
    p, state = finished_checkpoint(path)
    cfg = state["config"]
    if cfg.get("dataset") == "gmm":
        raise ScoreSourceError(f"{path} is a gmm (2-D toy) run; --score-from takes image runs")
    if "ema_eps" not in state:
        src = (cfg.get("score_from") or {}).get("path")
        raise ScoreSourceError(f"{path} is a projection-only run with no score network of its own"
                               f"{f'; its score came from {src}' if src else ''}")
    try:
        net = build_unet(cfg)
        net.load_state_dict(state["ema_eps"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ScoreSourceError(f"cannot rebuild the score network of {p}: {type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]}") from None
    info = {"checkpoint": str(p.resolve()), "step": int(state["step"]), "dataset": cfg.get("dataset"),
            "preset": cfg.get("preset"), "net": cfg.get("net") or {}, "seed": cfg.get("seed"),
            "parameters": sum(q.numel() for q in net.parameters())}
    return ScoreSource("wgfcore", str(path.resolve()), net, int(cfg["channels"]), int(cfg["resolution"]),
                       state_sha256(state["ema_eps"]), info, eps_to_score(net, sde), net)


# --- the projection network T: export and loading -------------------------------------------------------------

def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        return None
    return st


def save_projection(folder, net: nn.Module, config: dict) -> Path:
    """Write T as `folder/model.safetensors` (a plain state_dict; `model.pt`, tensors only, if safetensors
    is not installed) and `folder/config.json` (`config` plus the format tag). Returns the weights' path.

    `config` must hold what rebuilds T: 'preset', 'unet' (UNet.from_preset keyword arguments), and should
    hold 'score_from' (the score's record) and 'sde'."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    st = _safetensors()
    meta = {"format": FORMAT, **config, "weights": WEIGHTS_SAFETENSORS if st else WEIGHTS_TORCH}
    if st is not None:
        st.save_file(sd, str(folder / WEIGHTS_SAFETENSORS), metadata={"format": "pt"})
    else:
        torch.save(sd, folder / WEIGHTS_TORCH)
    (folder / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return folder / meta["weights"]


def load_projection(folder) -> tuple[nn.Module, dict]:
    """(T in eval mode, its config) from a folder written by `save_projection`: what a user without our
    trainer does is `UNet.from_preset(cfg["preset"], **cfg["unet"])` and `load_state_dict` of the weights."""
    from .nets import UNet

    folder = Path(folder)
    meta = _read_json(folder / CONFIG, "projection config")
    if meta.get("format") != FORMAT:
        raise ScoreSourceError(f"{folder / CONFIG} is not an exported projection network (format "
                               f"{meta.get('format')!r}, expected {FORMAT!r})")
    wpath = folder / meta.get("weights", WEIGHTS_SAFETENSORS)
    if wpath.suffix == ".safetensors":
        st = _safetensors()
        if st is None:
            raise ScoreSourceError(f"{wpath} needs the safetensors package (pip install safetensors)")
        sd = st.load_file(str(wpath))
    else:
        sd = torch.load(wpath, map_location="cpu", weights_only=True)
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["unet"].items()}
    try:
        net = UNet.from_preset(meta["preset"], **kw)
        net.load_state_dict(sd)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ScoreSourceError(f"cannot rebuild T from {folder}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") \
            from None
    return net.eval().requires_grad_(False), meta


class PredictProject(NamedTuple):
    """What `sample(score_fn, (n, *sample_shape), N, proj_fn=proj_fn)` needs, and where the score came from."""

    score_fn: Callable
    proj_fn: Callable
    sample_shape: tuple
    score: ScoreSource


def load_predict_project(path, *, device="cpu", score_from=None) -> PredictProject:
    """The score_fn and proj_fn of a Predict-Project run, to pass to `wgfcore.sample.sample`:

        pp = load_predict_project("runs/digits-...")          # or a folder written by `export`
        x = sample(pp.score_fn, (64, *pp.sample_shape), 20, "predict_project", proj_fn=pp.proj_fn)

    `path` is a run folder of train/run.py (trained with --score-from, or jointly) or an exported T
    (config.json + model.safetensors). The score is loaded from the source the run recorded (or from
    `score_from`, if it moved) and refused if its weights changed since T was trained."""
    path = Path(path).expanduser()
    if (path / CONFIG).is_file() and _read_json(path / CONFIG, "config").get("format") == FORMAT:
        proj, meta = load_projection(path)
        record = meta.get("score_from")
        if not record:
            raise ScoreSourceError(f"{path / CONFIG} names no score (score_from)")
    else:
        p, state = finished_checkpoint(path)
        cfg, record = state["config"], state["config"].get("score_from")
        if "ema_proj" not in state:
            raise ScoreSourceError(f"{p} holds no projection network (ema_proj)")
        proj = build_unet(cfg, projection=True)
        proj.load_state_dict(state["ema_proj"])
        proj = _frozen(proj)
        if record is None:  # a joint run: its own EMA score
            record = {"kind": "wgfcore", "path": str(path.resolve()), "sha256": state_sha256(state["ema_eps"])}
    score = load_score(score_from or record["path"])
    score.check_record(record)
    score.to(device)
    proj.to(device)

    def proj_fn(x, t):
        return proj(x, t)

    c = score.channels
    r = score.resolution if score.resolution is not None else proj.img_resolution
    return PredictProject(score.score_fn, proj_fn, (c, r, r), score)


__all__ = ["ScoreSource", "ScoreSourceError", "PredictProject", "load_score", "source_kind", "state_sha256",
           "finished_checkpoint", "unet_spec", "build_unet", "save_projection", "load_projection", "load_predict_project",
           "FORMAT", "PREDICTION_TYPES"]
