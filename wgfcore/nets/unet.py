"""ADM-style U-Net for the score network eps_theta(x, t) and the projection network T_phi(x, t).

Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis" (2021), sec. 3 and
App. A (the architecture Ghimire et al. use, their sec. 9 and App. B). Time is the forward
time t in [0, 1] of ALGORITHMS §1. Attention is pluggable: "math" (the reference), "sdpa"
(PyTorch) or "triton" (the fused kernel in kernels/attention.py, imported lazily).
`UNet.set_kernels("fused")` switches a whole network to the Triton path: that attention, the
fused GroupNorm + scale-shift + SiLU of kernels/groupnorm.py, and q, k, v in token layout so
that no layout copy surrounds the attention kernel; `set_kernels("torch")` switches back.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "PRESETS", "ATTENTION_BACKENDS", "KERNEL_MODES", "timestep_embedding", "scale_shift_norm"]

ATTENTION_BACKENDS = ("math", "sdpa", "triton")
KERNEL_MODES = ("torch", "fused")
RESAMPLE_MODES = ("conv", "resblock")
# Sinusoidal embedding of 1000 t: the DDPM/ADM networks were designed for integer steps in
# [0, 1000), so this keeps their frequency range for continuous t in [0, 1].
TIME_SCALE = 1000.0


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017, sec. 3.5) of TIME_SCALE * t, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (TIME_SCALE * t.float())[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def scale_shift_norm(x, groups, weight, bias, scale=None, shift=None, eps=1e-5, act=True):
    """act(group_norm(x) * (1 + scale) + shift), act = SiLU or the identity (ADM sec. 3).

    The network's torch path, and the oracle of the fused kernel kernels/groupnorm.py, which
    takes the same arguments. scale and shift: (B, C, 1, 1), both or neither.
    """
    h = F.group_norm(x, groups, weight, bias, eps)
    if scale is not None:
        h = h * (1 + scale) + shift
    return F.silu(h) if act else h


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state_dict) whose forward also applies the optional
    scale-shift and SiLU, in torch or, with `fused = True`, in one Triton kernel."""

    fused = False

    def forward(self, x, scale=None, shift=None, act=False):
        if self.fused:
            from kernels.groupnorm import group_norm_act  # lazy: wgfcore runs without Triton

            return group_norm_act(x, self.num_groups, self.weight, self.bias, scale, shift, self.eps, act)
        return scale_shift_norm(x, self.num_groups, self.weight, self.bias, scale, shift, self.eps, act)


def _group_norm(channels: int) -> GroupNorm:
    # ADM uses 32 groups; small presets may have fewer channels, so take the largest
    # group count <= 32 that divides the channels.
    groups = max(g for g in range(1, 33) if channels % g == 0)
    return GroupNorm(groups, channels)


def _zero(module: nn.Module) -> nn.Module:
    # ADM zero-initialises the last layer of every residual branch, so each block starts
    # as the identity (App. A, following Goyal et al. 2017).
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb):
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block with scale-shift norm: GN(h) * (1 + scale(emb)) + shift(emb) (ADM sec. 3).

    With `resample="down"`/`"up"` it is also ADM's resampling block (BigGAN-style): the
    resolution changes inside the block, on both the residual branch and the skip.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float = 0.0, resample: str | None = None):
        super().__init__()
        self.in_norm = _group_norm(in_ch)
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, 2 * out_ch)
        self.out_norm = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        self.resample = resample

    def _resample(self, x):
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x, emb):
        h = self.in_norm(x, act=True)
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h, scale, shift, act=True)
        h = self.out_conv(self.dropout(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, heads of `head_channels` (ADM sec. 3)."""

    def __init__(self, channels: int, head_channels: int, backend: str = "math"):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention at {channels} channels needs head_channels dividing it, got {head_channels}")
        self.heads = channels // head_channels
        self.head_channels = head_channels
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv1d(channels, channels, 1))
        self.backend = backend
        # Token layout: q, k, v from one (B, L, 3C) matmul, viewed per head with unit stride
        # along the head dim, and the output folded back with views; set by UNet.set_kernels.
        self.token_layout = False

    def attend(self, q, k, v):
        """softmax(q k^T / sqrt(d)) v for (B, heads, L, d) tensors with the chosen backend."""
        scale = 1.0 / math.sqrt(self.head_channels)
        if self.backend == "math":
            w = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
            return w @ v
        if self.backend == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        from kernels.attention import attention  # lazy: wgfcore runs without Triton

        return attention(q, k, v, scale)

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        L = H * W
        if self.token_layout:
            return self._forward_tokens(x)
        qkv = self.qkv(self.norm(x).reshape(B, C, L))
        # (B, 3C, L) -> three (B, heads, L, d) views, d contiguous-last after the transpose.
        q, k, v = qkv.transpose(1, 2).reshape(B, L, 3, self.heads, self.head_channels).permute(2, 0, 3, 1, 4)
        h = self.attend(q, k, v)  # (B, heads, L, d)
        h = h.permute(0, 1, 3, 2).reshape(B, C, L)
        return x + self.proj(h).reshape(B, C, H, W)

    def _forward_tokens(self, x):
        # The same function as forward() with the same parameters (a 1x1 Conv1d is a Linear
        # on tokens). q, k, v are strided views of one (B, L, 3C) tensor with unit stride
        # along the head dim, which the Triton kernel reads in place; its output is stored
        # in (B, L, heads, d) memory, so folding heads into channels is a view; and for a
        # channels_last x, (B, C, H, W) <-> (B, L, C) are views too.
        B, C, H, W = x.shape
        L = H * W
        tokens = self.norm(x).reshape(B, C, L).transpose(1, 2)  # (B, L, C)
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)  # (B, L, 3C)
        q, k, v = qkv.view(B, L, 3, self.heads, self.head_channels).permute(2, 0, 3, 1, 4)
        h = self.attend(q, k, v).transpose(1, 2).reshape(B, L, C)
        out = F.linear(h, self.proj.weight.squeeze(-1), self.proj.bias)  # (B, L, C)
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class _Sequential(nn.ModuleList):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb)
        return x


class UNet(nn.Module):
    """ADM U-Net (Dhariwal & Nichol 2021): f(x, t) -> same shape as x, t in [0, 1] of shape (B,).

    Encoder: per level `num_res_blocks` ResBlocks (+ attention where the resolution is in
    `attn_resolutions`), then a down-sampling step; middle: ResBlock, attention,
    ResBlock; decoder mirrors the encoder with `num_res_blocks + 1` ResBlocks per level
    fed by skip connections. `attn_resolutions` are spatial sizes (e.g. 32, 16, 8 at
    64 x 64). `resample`: "conv" (strided conv / nearest + conv) or "resblock" (ADM's
    BigGAN-style resampling ResBlocks). `attn_backend`: one of ATTENTION_BACKENDS.

    Presets (`UNet.from_preset`, parameter counts measured with `num_parameters()`):
      - "adm64": 64 x 64 x 3, 128 channels, mult (1, 2, 3, 4), 3 res blocks, attention at
        32/16/8 with 64-channel heads, resblock resampling, dropout 0.1:
        131,226,371 parameters. Ghimire et al. do not state their widths; this is ADM's
        64 x 64 layout at 128 base channels (ADM used 192).
      - "tiny": 16 x 16 x 1, 32 channels, mult (1, 2), 1 res block, attention at 8 x 8 with
        32-channel heads (head dim 32 suits the Triton kernel): 755,009 parameters
        (756,163 with in_channels=3). Small enough to train on CPU in minutes.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int | None = None,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_res_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        head_channels: int = 64,
        dropout: float = 0.0,
        resample: str = "conv",
        attn_backend: str = "math",
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        levels = len(channel_mult)
        if levels < 1 or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {channel_mult}")
        for name, val in (("img_resolution", img_resolution), ("in_channels", in_channels),
                          ("out_channels", out_channels), ("model_channels", model_channels),
                          ("num_res_blocks", num_res_blocks), ("head_channels", head_channels)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if img_resolution % 2 ** (levels - 1):
            raise ValueError(
                f"img_resolution={img_resolution} must be divisible by 2**{levels - 1} for {levels} levels"
            )
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        resolutions = [img_resolution // 2**i for i in range(levels)]
        unknown = sorted(set(attn_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(f"attn_resolutions {unknown} are not among this network's resolutions {resolutions}")
        _check_backend(attn_backend)

        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.model_channels = model_channels
        emb_ch = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )

        def attn(ch):
            return AttentionBlock(ch, head_channels, attn_backend)

        def down(ch):
            return ResBlock(ch, ch, emb_ch, dropout, "down") if resample == "resblock" else _Downsample(ch)

        def up(ch):
            return ResBlock(ch, ch, emb_ch, dropout, "up") if resample == "resblock" else _Upsample(ch)

        ch = model_channels
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch]
        for level, mult in enumerate(channel_mult):
            res = resolutions[level]
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, mult * model_channels, emb_ch, dropout)]
                ch = mult * model_channels
                if res in attn_resolutions:
                    layers.append(attn(ch))
                self.down.append(_Sequential(layers))
                skips.append(ch)
            if level < levels - 1:
                self.down.append(_Sequential([down(ch)]))
                skips.append(ch)

        self.middle = _Sequential([ResBlock(ch, ch, emb_ch, dropout), attn(ch), ResBlock(ch, ch, emb_ch, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = resolutions[level]
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mult * model_channels, emb_ch, dropout)]
                ch = mult * model_channels
                if res in attn_resolutions:
                    layers.append(attn(ch))
                if level > 0 and i == num_res_blocks:
                    layers.append(up(ch))
                self.up.append(_Sequential(layers))

        self.out_norm = _group_norm(ch)
        self.out_conv = _zero(nn.Conv2d(ch, out_channels, 3, padding=1))
        self.channels_last = False

    # -- construction helpers -------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UNet":
        """Build a preset from PRESETS, with keyword overrides.

        A preset's attention resolutions are stated at its own img_resolution; when only
        img_resolution is overridden they scale with it (tiny at 32 x 32 attends at 16).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        kwargs = dict(PRESETS[name])
        if "img_resolution" in overrides and "attn_resolutions" not in overrides:
            factor = overrides["img_resolution"] / kwargs["img_resolution"]
            kwargs["attn_resolutions"] = tuple(int(r * factor) for r in kwargs["attn_resolutions"])
        kwargs.update(overrides)
        return cls(**kwargs)

    def set_attention_backend(self, name: str) -> "UNet":
        """Switch every attention block to backend `name` ("math", "sdpa" or "triton")."""
        _check_backend(name)
        blocks = [m for m in self.modules() if isinstance(m, AttentionBlock)]
        if name == "triton":
            from kernels.attention import SUPPORTED_HEAD_DIMS

            bad = sorted({b.head_channels for b in blocks} - set(SUPPORTED_HEAD_DIMS))
            if bad:
                raise ValueError(f"the triton backend needs head_channels in {SUPPORTED_HEAD_DIMS}, this net has {bad}")
        for b in blocks:
            b.backend = name
        return self

    def set_kernels(self, mode: str, channels_last: bool = False) -> "UNet":
        """Switch the whole network's execution path; parameters and function are unchanged.

        - "fused": Triton attention (kernels/attention.py), fused GroupNorm + scale-shift +
          SiLU (kernels/groupnorm.py) and q, k, v in token layout: the path built to be the
          fastest (its speed is not yet measured: bench/test_bench_unet.py has the rows).
          Needs head_channels in kernels.attention.SUPPORTED_HEAD_DIMS, and CUDA tensors (or
          the Triton interpreter on CPU).
        - "torch": nn.GroupNorm + SiLU and PyTorch SDPA attention (the eager torch path).
        channels_last: convolution weights and activations in NHWC memory (either mode); the
        output keeps the input's memory format. Call this before building an optimizer's
        state or a DDP wrapper: parameters are converted in place.
        """
        if mode not in KERNEL_MODES:
            raise ValueError(f"unknown kernel mode {mode!r}; choose from {KERNEL_MODES}")
        if not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
        fused = mode == "fused"
        self.set_attention_backend("triton" if fused else "sdpa")  # validates head dims first
        for m in self.modules():
            if isinstance(m, GroupNorm):
                m.fused = fused
            elif isinstance(m, AttentionBlock):
                m.token_layout = fused
        self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.channels_last = channels_last
        return self

    @property
    def kernels(self) -> str:
        """"fused" or "torch" as set by set_kernels, else "custom" (e.g. after set_attention_backend)."""
        norms = {m.fused for m in self.modules() if isinstance(m, GroupNorm)}
        attn = {(m.backend, m.token_layout) for m in self.modules() if isinstance(m, AttentionBlock)}
        if norms == {True} and attn <= {("triton", True)}:
            return "fused"
        if norms == {False} and attn <= {("sdpa", False)}:
            return "torch"
        return "custom"

    @property
    def attention_backend(self) -> str:
        names = {m.backend for m in self.modules() if isinstance(m, AttentionBlock)}
        return names.pop() if len(names) == 1 else "mixed"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward -----------------------------------------------------------------------

    def _check_inputs(self, x, t):
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"UNet expects x of shape (B, {', '.join(map(str, expected))}), got {got}")
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"UNet expects forward time t of shape ({x.shape[0]},) (one per sample), got {got}")
        if not t.is_floating_point():
            raise ValueError(f"UNet expects float forward time t in [0, 1], got dtype {t.dtype}")

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._check_inputs(x, t)
        x_contiguous = x.is_contiguous()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        h = self.input_conv(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb)
            hs.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        out = self.out_conv(self.out_norm(h, act=True))
        # channels_last inside (set_kernels): hand back the caller's memory format.
        return out.contiguous() if self.channels_last and x_contiguous else out


def _check_backend(name):
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {ATTENTION_BACKENDS}")


PRESETS: dict[str, dict] = {
    "adm64": dict(
        img_resolution=64, in_channels=3, model_channels=128, channel_mult=(1, 2, 3, 4),
        num_res_blocks=3, attn_resolutions=(32, 16, 8), head_channels=64, dropout=0.1,
        resample="resblock",
    ),
    "tiny": dict(
        img_resolution=16, in_channels=1, model_channels=32, channel_mult=(1, 2),
        num_res_blocks=1, attn_resolutions=(8,), head_channels=32, dropout=0.0,
        resample="conv",
    ),
}
