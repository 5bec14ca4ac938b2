"""Fused GroupNorm + scale-shift + SiLU, forward and backward: the ADM U-Net's normalisation.

    y = act(GN(x) * (1 + scale) + shift),   GN(x)_bcp = (x_bcp - mu_bg) rstd_bg gamma_c + beta_c,

with mu_bg and rstd_bg = 1 / sqrt(var_bg + eps) over the channels of group g and all positions p
(Wu & He, "Group Normalization", 2018, eqs. 1-3), the scale-shift norm of Dhariwal & Nichol (2021,
sec. 3) with per-(batch, channel) scale and shift, and act = SiLU or the identity. The torch
oracle is `wgfcore.nets.unet.scale_shift_norm` (the network's unfused path); there is no
ALGORITHMS.md section for the networks.

A program handles one batch element and BLOCK_G whole groups: it reads them three times (mean,
variance about the mean, output) -- a two-pass variance, as exact as torch's -- and keeps every
statistic in float32.
The output has the dtype of x (under autocast the next op is a convolution that casts to 16 bits
anyway, so a float32 output would only double the traffic). Any memory format whose spatial
dimensions flatten to one stride is read in place, NCHW and channels_last included, and y keeps it;
any other input is copied to a contiguous one first, and y is contiguous (`_empty_out`, the one rule
that the kernels and the custom ops' fake implementations share).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from ._common import addressable, check_device, check_dtype

__all__ = ["group_norm_act"]


@triton.jit
def _silu_parts(z, ACT: tl.constexpr):
    # Returns act(z) and act'(z); SiLU'(z) = sig(z) (1 + z (1 - sig(z))). One return after
    # the constexpr branch (the compiler's front end is stricter about returns than the
    # interpreter).
    if ACT:
        # sig(z) from e = exp(-|z|) <= 1: never overflows, whatever the sign of z.
        e = tl.exp(-tl.abs(z))
        sig = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        y = z * sig
        dact = sig * (1.0 + z * (1.0 - sig))
    else:
        y = z
        dact = tl.full(z.shape, 1.0, tl.float32)
    return y, dact


@triton.jit
def _to_groups(v, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    # Per-row values (rows = BLOCK_G groups x BLOCK_C channel lanes) -> per-group sums.
    return tl.sum(tl.reshape(v, (BLOCK_G, BLOCK_C)), 1)


@triton.jit
def _to_rows(v, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    # Per-group values -> the same value on each of the group's rows.
    return tl.reshape(tl.broadcast_to(v[:, None], (BLOCK_G, BLOCK_C)), (BLOCK_G * BLOCK_C,))


@triton.jit
def _rows_of(G, CG: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's batch element b, its first group g0, and its BLOCK_G groups as tile rows
    (BLOCK_C channel lanes each): the group of each row, which rows are real channels, and their
    channel indices."""
    n_gb = tl.cdiv(G, BLOCK_G)
    b = tl.program_id(0) // n_gb
    g0 = (tl.program_id(0) % n_gb) * BLOCK_G
    r = tl.arange(0, BLOCK_G * BLOCK_C)
    g_row = g0 + r // BLOCK_C
    c_ok = ((r % BLOCK_C) < CG) & (g_row < G)
    return b, g0, g_row, c_ok, g_row * CG + r % BLOCK_C


@triton.jit
def _gn_fwd_kernel(
    X, Y, W, Bias, SCALE, SHIFT, MEAN, RSTD,
    sx_b, sx_c, sx_p, sy_b, sy_c, sy_p, ss_b, ss_c, sh_b, sh_c,
    G, P, eps,
    CG: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_SS: tl.constexpr,
    ACT: tl.constexpr,
):
    # One program: batch element b, groups gb*BLOCK_G ... + BLOCK_G - 1, as the rows of one
    # (BLOCK_G * BLOCK_C, BLOCK_P) tile (channel lanes past CG and groups past G masked).
    b, g0, g_row, c_ok, offs_c = _rows_of(G, CG, BLOCK_G, BLOCK_C)
    offs_p0 = tl.arange(0, BLOCK_P)
    x_base = X + b * sx_b + offs_c[:, None] * sx_c
    n = CG * P

    acc = tl.zeros([BLOCK_G * BLOCK_C, BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + offs_p0
        ok = c_ok[:, None] & (offs_p < P)[None, :]
        acc += tl.load(x_base + offs_p[None, :] * sx_p, mask=ok, other=0.0).to(tl.float32)
    mean_g = _to_groups(tl.sum(acc, 1), BLOCK_G, BLOCK_C) / n
    mean = _to_rows(mean_g, BLOCK_G, BLOCK_C)
    acc = tl.zeros([BLOCK_G * BLOCK_C, BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + offs_p0
        ok = c_ok[:, None] & (offs_p < P)[None, :]
        x = tl.load(x_base + offs_p[None, :] * sx_p, mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - mean[:, None], 0.0)
        acc += d * d
    var_g = _to_groups(tl.sum(acc, 1), BLOCK_G, BLOCK_C) / n
    rstd_g = 1.0 / tl.sqrt_rn(var_g + eps)
    gg = g0 + tl.arange(0, BLOCK_G)
    tl.store(MEAN + b * G + gg, mean_g, mask=gg < G)
    tl.store(RSTD + b * G + gg, rstd_g, mask=gg < G)
    rstd = _to_rows(rstd_g, BLOCK_G, BLOCK_C)

    gamma = tl.load(W + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(Bias + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_SS:
        one_s = 1.0 + tl.load(SCALE + b * ss_b + offs_c * ss_c, mask=c_ok, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + b * sh_b + offs_c * sh_c, mask=c_ok, other=0.0).to(tl.float32)
    y_base = Y + b * sy_b + offs_c[:, None] * sy_c
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + offs_p0
        ok = c_ok[:, None] & (offs_p < P)[None, :]
        x = tl.load(x_base + offs_p[None, :] * sx_p, mask=ok, other=0.0).to(tl.float32)
        # Torch's order of operations (normalise, affine, then scale-shift): folding them into
        # one per-channel a x + b would cancel at |mean| >> std.
        z = (x - mean[:, None]) * rstd[:, None] * gamma[:, None] + beta[:, None]
        if HAS_SS:
            z = z * one_s[:, None] + shift[:, None]
        y, _ = _silu_parts(z, ACT)
        tl.store(y_base + offs_p[None, :] * sy_p, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _gn_bwd_kernel(
    X, DY, W, Bias, SCALE, SHIFT, MEAN, RSTD, DX, DW, DB, DSCALE, DSHIFT,
    sx_b, sx_c, sx_p, sdy_b, sdy_c, sdy_p, sdx_b, sdx_c, sdx_p, ss_b, ss_c, sh_b, sh_c,
    C, G, P,
    CG: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_SS: tl.constexpr,
    ACT: tl.constexpr,
):
    # With z = a (1 + s) + sh, a = xhat gamma + beta, xhat = (x - mu) rstd and dz = dy act'(z):
    #   dshift_bc = sum_p dz,  dscale_bc = sum_p dz a,  dbeta_c = sum_b (1 + s_bc) sum_p dz,
    #   dgamma_c = sum_b (1 + s_bc) sum_p dz xhat,  dxhat = dz (1 + s) gamma,
    #   dx = rstd (dxhat - mean_g(dxhat) - xhat mean_g(dxhat xhat))  (Wu & He 2018, backprop of eq. 1).
    # A program owns whole groups of one batch element, so the per-(b, c) sums are complete
    # here; the sum over b for dgamma and dbeta is left to the launcher ((B, C) partials).
    b, g0, g_row, c_ok, offs_c = _rows_of(G, CG, BLOCK_G, BLOCK_C)
    offs_p0 = tl.arange(0, BLOCK_P)
    x_base = X + b * sx_b + offs_c[:, None] * sx_c
    dy_base = DY + b * sdy_b + offs_c[:, None] * sdy_c
    mean = tl.load(MEAN + b * G + g_row, mask=c_ok, other=0.0)
    rstd = tl.load(RSTD + b * G + g_row, mask=c_ok, other=0.0)
    gamma = tl.load(W + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(Bias + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_SS:
        one_s = 1.0 + tl.load(SCALE + b * ss_b + offs_c * ss_c, mask=c_ok, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + b * sh_b + offs_c * sh_c, mask=c_ok, other=0.0).to(tl.float32)
    else:
        one_s = tl.full([BLOCK_G * BLOCK_C], 1.0, tl.float32)

    s_dz = tl.zeros([BLOCK_G * BLOCK_C, BLOCK_P], dtype=tl.float32)
    s_dza = tl.zeros([BLOCK_G * BLOCK_C, BLOCK_P], dtype=tl.float32)
    s_dzx = tl.zeros([BLOCK_G * BLOCK_C, BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + offs_p0
        ok = c_ok[:, None] & (offs_p < P)[None, :]
        x = tl.load(x_base + offs_p[None, :] * sx_p, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_base + offs_p[None, :] * sdy_p, mask=ok, other=0.0).to(tl.float32)
        xhat = (x - mean[:, None]) * rstd[:, None]
        a = xhat * gamma[:, None] + beta[:, None]
        z = a
        if HAS_SS:
            z = a * one_s[:, None] + shift[:, None]
        _, dact = _silu_parts(z, ACT)
        dz = tl.where(ok, dy * dact, 0.0)
        s_dz += dz
        s_dza += dz * a
        s_dzx += dz * xhat
    c_dz = tl.sum(s_dz, 1)
    c_dzx = tl.sum(s_dzx, 1)
    tl.store(DB + b * C + offs_c, one_s * c_dz, mask=c_ok)
    tl.store(DW + b * C + offs_c, one_s * c_dzx, mask=c_ok)
    if HAS_SS:
        tl.store(DSCALE + b * C + offs_c, tl.sum(s_dza, 1), mask=c_ok)
        tl.store(DSHIFT + b * C + offs_c, c_dz, mask=c_ok)
    n = CG * P
    coef = tl.where(c_ok, one_s * gamma, 0.0)  # dxhat = dz * coef
    m1 = _to_rows(_to_groups(coef * c_dz, BLOCK_G, BLOCK_C) / n, BLOCK_G, BLOCK_C)  # mean_g(dxhat)
    m2 = _to_rows(_to_groups(coef * c_dzx, BLOCK_G, BLOCK_C) / n, BLOCK_G, BLOCK_C)  # mean_g(dxhat xhat)

    dx_base = DX + b * sdx_b + offs_c[:, None] * sdx_c
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + offs_p0
        ok = c_ok[:, None] & (offs_p < P)[None, :]
        x = tl.load(x_base + offs_p[None, :] * sx_p, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_base + offs_p[None, :] * sdy_p, mask=ok, other=0.0).to(tl.float32)
        xhat = (x - mean[:, None]) * rstd[:, None]
        z = xhat * gamma[:, None] + beta[:, None]
        if HAS_SS:
            z = z * one_s[:, None] + shift[:, None]
        _, dact = _silu_parts(z, ACT)
        dxhat = dy * dact * coef[:, None]
        dx = rstd[:, None] * (dxhat - m1[:, None] - xhat * m2[:, None])
        tl.store(dx_base + offs_p[None, :] * sdx_p, dx.to(DX.dtype.element_ty), mask=ok)


def _blocks(groups: int, cg: int, p: int) -> dict:
    block_c = triton.next_power_of_2(cg)
    if INTERPRETED:
        # All groups of a batch element in one program: the interpreter pays per program and per
        # op, not per element. Maps of up to 64 positions (the tests' shapes, the U-Net's 8x8)
        # loop over 16-wide tiles, so loops and tails stay exercised; larger maps are one tile.
        block_p = 16 if p <= 64 else triton.next_power_of_2(p)
        return dict(BLOCK_G=triton.next_power_of_2(groups), BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4)
    # About 2048 elements per tile (speed unmeasured). The adm64 U-Net's groups hold 4-16
    # channels of 64-4096 positions: at 8 x 8 two groups share a program, so it is not a
    # 1024-element sliver; at 64 x 64 one group loops over 512-position tiles. Built for sm_90
    # (ptxas -v), 4096-element tiles took 174 (forward) and 250 (backward) registers per
    # thread at 8 warps, one program per SM; 2048-element tiles take 48-102 and 99-170.
    tile = 2048
    block_p = max(16, min(triton.next_power_of_2(p), tile // block_c))
    block_g = max(1, min(triton.next_power_of_2(groups), tile // (block_c * block_p)))
    return dict(BLOCK_G=block_g, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=8 if block_g * block_c * block_p >= tile else 4)


def _spatial_merges(x: torch.Tensor) -> bool:
    """Whether x's spatial dimensions flatten to one stride (NCHW, channels_last, any dense layout
    with its spatial dims in order): then the kernels address x as (B, C, P) without a copy."""
    return all(x.shape[i] == 1 or x.stride(i) == x.shape[i + 1] * x.stride(i + 1) for i in range(2, x.dim() - 1))


def _as_bcp(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x as (B, C, P) strides; a contiguous copy only if its spatial dims do not flatten to one stride."""
    view = addressable(x, _spatial_merges)  # kernels._common's one layout policy
    ps = view.stride(-1) if view.dim() > 2 else 1
    return view, (view.stride(0), view.stride(1), ps)


def _empty_out(x: torch.Tensor) -> torch.Tensor:
    """The layout of y (forward) and dx (backward): the one rule that the kernels and the custom ops'
    fake implementations share. x's own memory format where its spatial dims merge (empty_like keeps
    a dense layout, and gives a non-dense x the format torch suggests for it), else contiguous, as the
    copy that `_as_bcp` then makes."""
    return torch.empty_like(x) if _spatial_merges(x) else torch.empty_like(x, memory_format=torch.contiguous_format)


def _per_channel(name: str, t, B: int, C: int, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"group_norm_act: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.numel() != B * C or t.shape[:2] != (B, C) or any(s != 1 for s in t.shape[2:]):
        raise ValueError(f"group_norm_act: {name} must have shape (B, C) or (B, C, 1, ...) = ({B}, {C}, ...), "
                         f"got {tuple(t.shape)}")
    if t.device != x.device or not t.is_floating_point():
        raise ValueError(f"group_norm_act: {name} must be a float tensor on {x.device}, got {t.dtype} on {t.device}")
    return t.reshape(B, C)


def _check(x, groups, weight, bias, scale, shift, eps):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm_act: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"group_norm_act: x must be (B, C, ...) and non-empty, got shape {tuple(x.shape)}")
    check_dtype("group_norm_act", x.dtype)
    check_device("group_norm_act", x)
    B, C = x.shape[:2]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or C % groups:
        raise ValueError(f"group_norm_act: groups must be a positive int dividing C={C}, got {groups!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or t.shape != (C,) or t.device != x.device or not t.is_floating_point():
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"group_norm_act: {name} must be a float tensor of shape ({C},) on {x.device}, got {got}")
    if (scale is None) != (shift is None):
        raise ValueError("group_norm_act: give both scale and shift, or neither")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"group_norm_act: eps must be a finite float > 0, got {eps!r}")
    if scale is not None:
        scale = _per_channel("scale", scale, B, C, x)
        shift = _per_channel("shift", shift, B, C, x)
    return scale, shift


def _forward(x, groups, weight, bias, scale, shift, eps, act):
    B, C = x.shape[:2]
    xv, sx = _as_bcp(x)
    P = xv.numel() // (B * C)
    y = _empty_out(x)
    _, sy = _as_bcp(y)
    mean = torch.empty(B * groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    has_ss = scale is not None
    ss = scale if has_ss else mean  # placeholder pointer, never read when HAS_SS is False
    sh = shift if has_ss else mean
    ss_str = scale.stride() if has_ss else (0, 0)
    sh_str = shift.stride() if has_ss else (0, 0)
    cg = C // groups
    blocks = _blocks(groups, cg, P)
    _gn_fwd_kernel[(B * triton.cdiv(groups, blocks["BLOCK_G"]),)](
        xv, y, weight, bias, ss, sh, mean, rstd,
        *sx, *sy, *ss_str, *sh_str, groups, P, float(eps),
        CG=cg, HAS_SS=has_ss, ACT=bool(act), **blocks,
    )
    return y, mean, rstd


def _backward(x, dy, groups, weight, bias, scale, shift, mean, rstd, act):
    B, C = x.shape[:2]
    xv, sx = _as_bcp(x)
    dyv, sdy = _as_bcp(dy)
    P = xv.numel() // (B * C)
    dx = _empty_out(x)
    _, sdx = _as_bcp(dx)
    f32 = dict(dtype=torch.float32, device=x.device)
    dw, db = torch.empty(B, C, **f32), torch.empty(B, C, **f32)
    has_ss = scale is not None
    dscale = torch.empty(B, C, **f32) if has_ss else dw
    dshift = torch.empty(B, C, **f32) if has_ss else dw
    ss = scale if has_ss else mean
    sh = shift if has_ss else mean
    ss_str = scale.stride() if has_ss else (0, 0)
    sh_str = shift.stride() if has_ss else (0, 0)
    cg = C // groups
    blocks = _blocks(groups, cg, P)
    _gn_bwd_kernel[(B * triton.cdiv(groups, blocks["BLOCK_G"]),)](
        xv, dyv, weight, bias, ss, sh, mean, rstd, dx, dw, db, dscale, dshift,
        *sx, *sdy, *sdx, *ss_str, *sh_str, C, groups, P,
        CG=cg, HAS_SS=has_ss, ACT=bool(act), **blocks,
    )
    return dx, dw.sum(0), db.sum(0), (dscale if has_ss else None), (dshift if has_ss else None)


class _GroupNormAct(torch.autograd.Function):
    """Saves x, the parameters and the (B, G) float32 mean and rstd; recomputes the rest."""

    @staticmethod
    def forward(ctx, x, groups, weight, bias, scale, shift, eps, act):
        y, mean, rstd = _forward(x, groups, weight, bias, scale, shift, eps, act)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.groups, ctx.act = groups, act
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        dx, dw, db, dscale, dshift = _backward(x, dy, ctx.groups, weight, bias, scale, shift, mean, rstd, ctx.act)
        if scale is not None:  # (B, C) float32 partials -> the dtype of the (B, C) views given
            dscale, dshift = dscale.to(scale.dtype), dshift.to(shift.dtype)
        return dx, None, dw.to(weight.dtype), db.to(bias.dtype), dscale, dshift, None, None


# As in kernels/attention.py: custom ops for torch.compile (opaque to dynamo), the
# autograd.Function above for eager calls (less host time per call).
@torch.library.custom_op("wgfcore::group_norm_act_fwd", mutates_args=())
def _gn_fwd_op(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
               shift: torch.Tensor | None, eps: float, act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, groups, weight, bias, scale, shift, eps, act)


@_gn_fwd_op.register_fake
def _(x, groups, weight, bias, scale, shift, eps, act):
    stats = x.new_empty(x.shape[0] * groups, dtype=torch.float32)
    return _empty_out(x), stats, torch.empty_like(stats)


@torch.library.custom_op("wgfcore::group_norm_act_bwd", mutates_args=())
def _gn_bwd_op(x: torch.Tensor, dy: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
               scale: torch.Tensor | None, shift: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
               act: bool) -> list[torch.Tensor]:
    dx, dw, db, dscale, dshift = _backward(x, dy, groups, weight, bias, scale, shift, mean, rstd, act)
    return [dx, dw, db] + ([dscale, dshift] if scale is not None else [])


@_gn_bwd_op.register_fake
def _(x, dy, groups, weight, bias, scale, shift, mean, rstd, act):
    B, C = x.shape[:2]
    out = [_empty_out(x), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)]
    return out + ([x.new_empty(B, C, dtype=torch.float32) for _ in range(2)] if scale is not None else [])


def _gn_setup(ctx, inputs, output):
    x, groups, weight, bias, scale, shift, eps, act = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift, output[1], output[2])
    ctx.groups, ctx.act = groups, act


def _gn_op_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    grads = _gn_bwd_op(x, dy, ctx.groups, weight, bias, scale, shift, mean, rstd, ctx.act)
    dscale = dshift = None
    if scale is not None:
        dscale, dshift = grads[3].to(scale.dtype), grads[4].to(shift.dtype)
    return grads[0], None, grads[1].to(weight.dtype), grads[2].to(bias.dtype), dscale, dshift, None, None


_gn_fwd_op.register_autograd(_gn_op_backward, setup_context=_gn_setup)


def group_norm_act(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                   scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                   eps: float = 1e-5, act: bool = True) -> torch.Tensor:
    """Differentiable ``act(group_norm(x) * (1 + scale) + shift)`` in one Triton kernel each way.

    x: (B, C, ...) float32/float16/bfloat16 on CUDA (or CPU under TRITON_INTERPRET=1), any
    memory format; weight, bias: (C,); scale, shift: (B, C) or (B, C, 1, 1), both or neither;
    act: SiLU if True, else the identity. Statistics in float32; the output has x's dtype, and x's
    memory format when its spatial dims flatten to one stride (else it is contiguous).
    """
    scale2, shift2 = _check(x, groups, weight, bias, scale, shift, eps)
    # scale2/shift2 are (B, C) views of scale/shift: autograd maps their gradients back.
    if torch.compiler.is_compiling():
        return _gn_fwd_op(x, groups, weight, bias, scale2, shift2, float(eps), bool(act))[0]
    return _GroupNormAct.apply(x, groups, weight, bias, scale2, shift2, float(eps), bool(act))
