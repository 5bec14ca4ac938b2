"""The networks a job trains, the switches that change how they run (fused kernels, torch.compile),
and the exponential moving average of their weights (ALGORITHMS §1, §3: both the score and the
projection network are the same backbone).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from wgfcore.backends import resolve_backend
from wgfcore.pretrained import ScoreSource, ScoreSourceError, build_unet, load_score

from .config import Config
from .errors import UsageError


def build_nets(cfg: Config):
    """Score (epsilon) and projection networks for a config: for image datasets the same U-Net twice
    (Ghimire et al. App. B: cfg.preset names a `UNet.from_preset` preset, cfg.net overrides its
    arguments, cfg.proj_net overrides them further for the projection network only; the one reading of
    these keys is `wgfcore.pretrained.unet_spec`); for the 2-D toy (dataset gmm) two MLPs of 3 hidden
    layers, cfg.hidden wide (T: cfg.proj_net's "hidden", if given)."""
    if cfg.toy:
        from wgfcore.nets.mlp import MLP

        return MLP(2, cfg.hidden, 3), MLP(2, cfg.proj_net.get("hidden", cfg.hidden), 3)  # checked by the schema
    return _unet(cfg, projection=False), _unet(cfg, projection=True)


def build_projection(cfg: Config) -> nn.Module:
    """The projection network T alone (a projection-only run's score is not ours to build)."""
    return _unet(cfg, projection=True)


def _unet(cfg: Config, projection: bool) -> nn.Module:
    what, key = ("projection", "proj_net") if projection else ("score", "net")
    try:
        return build_unet(cfg.data, projection=projection)
    except (KeyError, TypeError, ValueError) as e:  # unknown preset or argument: a config error
        raise UsageError(f"cannot build the {what} U-Net (preset {cfg.preset!r}, {key} "
                         f"{getattr(cfg, key)}) at {cfg.resolution}x{cfg.resolution}x{cfg.channels}: "
                         f"{e}") from None


def frozen_score(path, *, record: dict | None = None, shape: tuple | None = None,
                 what: str = "--score-from") -> ScoreSource:
    """The frozen score network in `path` (a diffusers UNet2DModel folder or a wgfcore run folder), checked
    against the images it must take (`shape` = (channels, resolution)) and the record a run stored; every
    problem is one UsageError line."""
    try:
        score = load_score(path)
        if shape is not None:
            score.check_shape(*shape, what="the dataset's config")
        if record is not None:
            score.check_record(record)
    except ScoreSourceError as e:
        raise UsageError(f"{what}: {' '.join(str(e).split())}") from None
    return score


@dataclass(frozen=True)
class Kernels:
    """How a job's networks and samplers run: `nets` switches the U-Nets to the Triton kernels
    (`use_fused`), `steps` names the samplers' step backend (wgfcore.backends)."""

    nets: bool = False
    steps: str = "auto"


def kernels_for(fused: bool, device, interpreter: bool = False) -> Kernels:
    """What --fused means on `device`. CUDA: the Triton attention, GroupNorm and sampler steps. CPU:
    the C++ sampler steps (kernels/cpu_steps.py) with torch's own attention and GroupNorm; the Triton
    kernels run on a CPU only in their interpreter, a correctness mode tens of times slower, and only
    when asked for by name (--triton-interpreter). Raises a UsageError, before any training, when
    the kernels asked for cannot run here."""
    device = torch.device(device)
    if interpreter and not fused:
        raise UsageError("--triton-interpreter: only with --fused (it chooses how --fused runs on a CPU)")
    if interpreter and device.type == "cuda":
        raise UsageError("--triton-interpreter: only on a CPU (on CUDA, --fused runs the compiled Triton kernels)")
    if not fused:
        return Kernels()
    k = Kernels(nets=True, steps="triton") if device.type == "cuda" or interpreter else Kernels(steps="cpp")
    try:
        resolve_backend(k.steps, device)
    except (ImportError, ValueError) as e:
        raise UsageError(f"--fused: {e}") from None
    return k


def use_fused(nets) -> None:
    """The one place where --fused switches networks to the Triton path: `UNet.set_kernels("fused")`
    (FlashAttention-2 attention, fused GroupNorm + scale-shift + SiLU, q/k/v in token layout).

    Module state, not parameters: call it on every copy that runs (training nets and EMA copies).
    channels_last stays off: its effect on the fused GroupNorm is unmeasured (no GPU run yet)."""
    for net in nets:
        if not hasattr(net, "set_kernels"):
            raise UsageError(f"--fused needs the wgfcore U-Net ({type(net).__name__} has no Triton path)")
        try:
            net.set_kernels("fused")
        except ValueError as e:  # e.g. a head width the Triton attention does not support
            raise UsageError(f"--fused: {e}") from None


def check_compile(backend) -> None:
    """Fail at start-up, in one line, when torch.compile cannot run here."""
    if not backend:
        return
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UsageError("--compile: torch.compile is not supported on this Python/torch build")
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise UsageError(f"--compile {backend}: unknown backend; choose from "
                         f"{', '.join(torch._dynamo.list_backends())}")


def compiled(net: nn.Module, backend) -> nn.Module:
    """`net` wrapped in torch.compile (with `backend`), or `net` itself when backend is false. The
    wrapper shares its parameters with `net`; checkpoints and the EMA keep using `net` itself, so their
    keys do not depend on the flag."""
    return torch.compile(net, backend=backend) if backend else net


class EMA:
    """Exponential moving average of a network's parameters (buffers copied as they are)."""

    def __init__(self, net: nn.Module, decay: float):
        self.decay = float(decay)
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        ema_p = [p for p in self.net.parameters()]
        src_p = [p.detach() for p in net.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - self.decay)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)


def all_finite(modules) -> torch.Tensor:
    """A 0-d bool tensor: are all parameters of `modules` finite (one reduction, no host sync)."""
    params = [p.detach() for m in modules for p in m.parameters()]
    if not params:
        return torch.tensor(True)
    norms = torch._foreach_norm(params)
    return torch.isfinite(torch.stack(norms)).all()


__all__ = ["build_nets", "build_projection", "frozen_score", "Kernels", "kernels_for", "use_fused", "check_compile",
           "compiled", "EMA", "all_finite"]
