"""Fused multi-head attention, forward and backward, in the FlashAttention-2 scheme.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(2023), Alg. 1 (forward) and Alg. 2 (backward). Used by the attention blocks of the ADM
U-Net (`wgfcore.nets.unet`); the oracle is plain ``softmax(q k^T * scale) v``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from ._common import SUPPORTED_DTYPES, check_device, check_dtype

__all__ = ["attention", "attention_forward", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]

SUPPORTED_HEAD_DIMS = (32, 64, 128)

_LOG2E = 1.4426950408889634  # 1 / ln 2: the kernels work in base 2 so that exp is exp2
_LN2 = 0.6931471805599453
# CUDA limits grid dims 1 and 2 to 65535; B*H lives on dim 1.
_MAX_GRID_DIM1 = 65535


# --------------------------------------------------------------------------------------
# Kernels. Every (B, H, L, D) tensor is addressed through its (batch, head, row) strides;
# the launcher guarantees a unit stride along D. The log-sum-exp and delta vectors are
# contiguous (B*H, L) float32 arrays.
# --------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE2,
    sq_b, sq_h, sq_l,
    sk_b, sk_h, sk_l,
    sv_b, sv_h, sv_l,
    so_b, so_h, so_l,
    H, L, qk_scale_log2,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < L

    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    # Running row max m_i (base-2 logits), running denominator l_i, unnormalised output.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < L
        k = tl.load(k_base + offs_n[:, None] * sk_l + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_l + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
        # Padded keys must get zero weight; -inf makes exp2 exactly 0. Every row has at
        # least one real key in the first block (L >= 1), so m_new is finite from then on.
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # As in FA-2, P is rounded to the storage dtype for the tensor-core matmul; the
        # denominator l_i above uses the fp32 P.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = O + b * so_b + h * so_h + offs_m[:, None] * so_l + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    # Base-2 LSE of the base-2 logits: the backward recomputes P = exp2(S2 - LSE2) from
    # exactly the same S2 (same dot, same fp32 multiplier), so no log/exp base
    # conversion adds rounding at the logits' magnitude, which can be large.
    tl.store(LSE2 + bh * L + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA,
    so_b, so_h, so_l,
    sdo_b, sdo_h, sdo_l,
    H, L,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij (FA-2 Alg. 2, line 4).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < L
    o = tl.load(O + b * so_b + h * so_h + offs_m[:, None] * so_l + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_l + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh * L + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV,
    sq_b, sq_h, sq_l,
    sk_b, sk_h, sk_l,
    sv_b, sv_h, sv_l,
    sdo_b, sdo_h, sdo_l,
    sdk_b, sdk_h, sdk_l,
    sdv_b, sdv_h, sdv_l,
    H, L, scale, qk_scale_log2,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program owns a block of keys and sweeps all queries, so dK and dV are written
    # once, without atomics (FA-2 Alg. 2, outer loop over key blocks).
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < L

    k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_l + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_l + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)

    q_base = Q + b * sq_b + h * sq_h
    do_base = DO + b * sdo_b + h * sdo_h
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < L
        q = tl.load(q_base + offs_m[:, None] * sq_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdo_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(LSE2 + bh * L + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * L + offs_m, mask=row_ok, other=0.0)
        # Transposed tile: rows are keys, columns are queries, P^T = exp2(S2^T - LSE2).
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale_log2
        p_t = tl.exp2(s_t - lse2[None, :])
        p_t = tl.where(row_ok[None, :] & col_ok[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    dk = dk * scale
    tl.store(DK + b * sdk_b + h * sdk_h + offs_n[:, None] * sdk_l + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + b * sdv_b + h * sdv_h + offs_n[:, None] * sdv_l + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ,
    sq_b, sq_h, sq_l,
    sk_b, sk_h, sk_l,
    sv_b, sv_h, sv_l,
    sdo_b, sdo_h, sdo_l,
    sdq_b, sdq_h, sdq_l,
    H, L, scale, qk_scale_log2,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # A separate pass for dQ (one program per query block, sweeping keys) avoids the
    # atomic adds a single fused backward kernel would need.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < L

    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_l + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE2 + bh * L + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * L + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < L
        k = tl.load(k_base + offs_n[:, None] * sk_l + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_l + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq = dq * scale
    tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_l + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _config(kind: str, L: int, D: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options for one kernel ("fwd" or "bwd").

    The interpreter gets one small fixed config: it is a correctness mode, and 16-wide
    tiles make the tests exercise multi-block loops and masked tails at small L.
    On GPU this is a table keyed by L and D, chosen for the U-Net shapes (L = 64, 256,
    1024; D = 64). These are starting points from the usual FA-2 shapes for Hopper-class
    shared memory; they have not yet been tuned by measurement (see bench/).
    """
    if INTERPRETED:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    wide = dtype == torch.float32 or D == 128  # twice the bytes per tile: use smaller tiles
    # Never launch tiles much longer than the sequence itself (L = 64 at the U-Net's 8x8).
    cap = max(16, _next_pow2(L))
    if kind == "fwd":
        bm, bn = (64, 64) if wide else (128, 64)
        warps = 8 if bm * D >= 128 * 64 else 4
        stages = 2 if wide else 3
    else:
        bm, bn = (32, 64) if wide else (64, 64)
        warps = 4
        stages = 2
    return dict(BLOCK_M=min(bm, cap), BLOCK_N=min(bn, cap), num_warps=warps, num_stages=stages)


def _precision(dtype: torch.dtype) -> str:
    # Triton's default for fp32 dot on NVIDIA is TF32. PyTorch's default fp32 matmul is
    # IEEE, and the tests compare against it, so fp32 storage asks for IEEE products.
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------
# Validation and launchers
# --------------------------------------------------------------------------------------


def _check_inputs(q, k, v, scale):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 4:
        raise ValueError(f"attention: expected 4-D (B, H, L, D) tensors, got q.shape={tuple(q.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            "attention: q, k, v must have the same shape (B, H, L, D), got "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_dtype("attention", q.dtype)
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    check_device("attention", q)
    B, H, L, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention: head dim D must be one of {SUPPORTED_HEAD_DIMS}, got D={D}")
    if B * H == 0 or L == 0:
        raise ValueError(f"attention: empty input, got shape {tuple(q.shape)}")
    if B * H > _MAX_GRID_DIM1:
        raise ValueError(f"attention: B*H must be <= {_MAX_GRID_DIM1}, got {B * H}")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a Python float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"attention: scale must be finite and > 0, got {scale}")
    return scale


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    # The kernels assume unit stride along D (coalesced loads); batch/head/row strides
    # are free, so views such as a transposed (B, L, H, D) layout need no copy.
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def _forward(q, k, v, scale):
    B, H, L, D = q.shape
    o = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    lse2 = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    cfg = _config("fwd", L, D, q.dtype)
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), B * H)
    _fwd_kernel[grid](
        q, k, v, o, lse2,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, L, scale * _LOG2E,
        D=D, PRECISION=_precision(q.dtype), **cfg,
    )
    return o, lse2


def _backward(q, k, v, o, lse2, do, scale):
    B, H, L, D = q.shape
    do = _unit_last(do)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    cfg = _config("bwd", L, D, q.dtype)
    prec = _precision(q.dtype)
    pre_block = cfg["BLOCK_M"]
    _bwd_preprocess_kernel[(triton.cdiv(L, pre_block), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, L, D=D, BLOCK_M=pre_block,
    )
    _bwd_dkdv_kernel[(triton.cdiv(L, cfg["BLOCK_N"]), B * H)](
        q, k, v, do, lse2, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        H, L, scale, scale * _LOG2E, D=D, PRECISION=prec, **cfg,
    )
    _bwd_dq_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), B * H)](
        q, k, v, do, lse2, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, L, scale, scale * _LOG2E, D=D, PRECISION=prec, **cfg,
    )
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves (q, k, v, o, base-2 LSE) only, never the L x L matrix P."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse2 = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse2)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse2 = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse2, do, ctx.scale)
        return dq, dk, dv, None


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """Forward only, without autograd: returns ``(o, lse)``.

    ``o = softmax(q k^T * scale) v`` with shape (B, H, L, D) in the input dtype, and
    ``lse[b, h, i] = log sum_j exp(scale * q_i . k_j)`` (natural log) in float32, shape
    (B, H, L): the statistic the backward pass recomputes P from.
    """
    scale = _check_inputs(q, k, v, scale)
    o, lse2 = _forward(_unit_last(q), _unit_last(k), _unit_last(v), scale)
    return o, lse2 * _LN2


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Differentiable fused attention ``softmax(q k^T * scale) v`` (FlashAttention-2).

    q, k, v: (B, H, L, D) tensors of one dtype (float32, float16 or bfloat16) on one CUDA
    device (or CPU under TRITON_INTERPRET=1), D in {32, 64, 128}, any L >= 1.
    scale defaults to 1/sqrt(D). Accumulation is in float32; memory is O(B H L D).
    """
    scale = _check_inputs(q, k, v, scale)
    return _FlashAttention.apply(_unit_last(q), _unit_last(k), _unit_last(v), scale)
