"""Fused multi-head attention, forward and backward, in the FlashAttention-2 scheme.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(2023), Alg. 1 (forward) and Alg. 2 (backward). Used by the attention blocks of the ADM
U-Net (`wgfcore.nets.unet`); the oracle is plain ``softmax(q k^T * scale) v``.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from ._common import SUPPORTED_DTYPES, check_device, check_dtype, unit_last

__all__ = ["attention", "attention_forward", "override_config", "set_backward", "use_backward", "BACKWARDS",
           "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]

SUPPORTED_HEAD_DIMS = (32, 64, 128)

_LOG2E = 1.4426950408889634  # 1 / ln 2: the kernels work in base 2 so that exp is exp2
_LN2 = 0.6931471805599453
# CUDA limits grid dims 1 and 2 to 65535; B*H lives on dim 1.
_MAX_GRID_DIM1 = 65535


# --------------------------------------------------------------------------------------
# Kernels. Every (B, H, L, D) tensor has a unit stride along D and is addressed through one of
# two stride sets, (batch, head, row), that every kernel takes alike: the input set, shared by
# q, k and v, and the output set, shared by o, dO and the gradients (all allocated, or copied,
# by the launchers in o's layout). The log-sum-exp and delta vectors are contiguous (B*H, L)
# float32 arrays.
#
# Each program handles GROUP (batch, head) pairs one after the other (grid axis 1 has
# cdiv(B*H, GROUP) programs): at short L a (batch, head) pair is only a few key blocks of
# work, and merging them amortises the program's set-up. A trailing program whose pair
# index runs past B*H recomputes the last pair and stores nothing (its stores are masked),
# so no NaN from an all-masked row is ever formed.
# --------------------------------------------------------------------------------------


@triton.jit
def _head_of(pid, g, GROUP: tl.constexpr, BH, H):
    """(batch, head) pair g of program `pid`'s GROUP: the raw index (>= BH past the end, so its
    stores are masked), the clamped flat index bh (its loads stay in bounds), batch b, head h."""
    bh_raw = pid * GROUP + g
    bh = tl.minimum(bh_raw, BH - 1)
    return bh_raw, bh, bh // H, bh % H


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE2,
    si_b, si_h, si_l, so_b, so_h, so_l,
    H, L, BH, qk_scale_log2,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_in = offs_m < L
    for g in range(GROUP):
        bh_raw, bh, b, h = _head_of(tl.program_id(1), g, GROUP, BH, H)
        row_ok = row_in & (bh_raw < BH)
        base = b * si_b + h * si_h

        q = tl.load(Q + base + offs_m[:, None] * si_l + offs_d[None, :], mask=row_in[:, None], other=0.0)
        if ONE_BLOCK:
            # The whole sequence is one key block (L <= BLOCK_N): a plain softmax, with no
            # running max to rescale against.
            col_ok = offs_n0 < L
            kv = base + offs_n0[:, None] * si_l + offs_d[None, :]
            k = tl.load(K + kv, mask=col_ok[:, None], other=0.0)
            v = tl.load(V + kv, mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_i = tl.max(s, 1)
            p = tl.exp2(s - m_i[:, None])
            l_i = tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        else:
            # Running row max m_i (base-2 logits), running denominator l_i, unnormalised output.
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
            for start_n in range(0, L, BLOCK_N):
                offs_n = start_n + offs_n0
                col_ok = offs_n < L
                kv = base + offs_n[:, None] * si_l + offs_d[None, :]
                k = tl.load(K + kv, mask=col_ok[:, None], other=0.0)
                v = tl.load(V + kv, mask=col_ok[:, None], other=0.0)
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
def _bwd_one_block_kernel(
    Q, K, V, O, DO, LSE2, DQ, DK, DV,
    si_b, si_h, si_l, so_b, so_h, so_l,
    H, L, BH, scale, qk_scale_log2,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # The whole sequence in one tile (L <= BLOCK): one program owns every query and key of
    # its (batch, head), so delta, dQ, dK and dV come from one pass, five matmuls and one
    # launch, with no atomics (FA-2 Alg. 2 with a single outer and inner block).
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    ok = offs < L
    for g in range(GROUP):
        bh_raw, bh, b, h = _head_of(tl.program_id(0), g, GROUP, BH, H)
        st_ok = ok & (bh_raw < BH)
        t_in = b * si_b + h * si_h + offs[:, None] * si_l + offs_d[None, :]
        t_out = b * so_b + h * so_h + offs[:, None] * so_l + offs_d[None, :]
        q = tl.load(Q + t_in, mask=ok[:, None], other=0.0)
        k = tl.load(K + t_in, mask=ok[:, None], other=0.0)
        v = tl.load(V + t_in, mask=ok[:, None], other=0.0)
        o = tl.load(O + t_out, mask=ok[:, None], other=0.0)
        do = tl.load(DO + t_out, mask=ok[:, None], other=0.0)
        lse2 = tl.load(LSE2 + bh * L + offs, mask=ok, other=0.0)
        # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij (FA-2 Alg. 2, line 4).
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(ok[:, None] & ok[None, :], p, 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
        tl.store(DQ + t_out, dq.to(DQ.dtype.element_ty), mask=st_ok[:, None])
        tl.store(DK + t_out, dk.to(DK.dtype.element_ty), mask=st_ok[:, None])
        tl.store(DV + t_out, dv.to(DV.dtype.element_ty), mask=st_ok[:, None])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, LSE2, DELTA, DQ,
    si_b, si_h, si_l, so_b, so_h, so_l,
    H, L, BH, scale, qk_scale_log2,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # The two-pass backward, pass 1: one program per query block, sweeping keys: dQ without
    # atomics (3 matmuls per tile). It also computes delta_i = sum_d dO_id O_id for its own rows
    # (FA-2 Alg. 2, line 4) and stores it for the dK/dV pass launched after it, so no separate
    # pre-processing launch reads dO.
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_in = offs_m < L
    for g in range(GROUP):
        bh_raw, bh, b, h = _head_of(tl.program_id(1), g, GROUP, BH, H)
        row_ok = row_in & (bh_raw < BH)
        base = b * si_b + h * si_h
        t_out = b * so_b + h * so_h + offs_m[:, None] * so_l + offs_d[None, :]
        q = tl.load(Q + base + offs_m[:, None] * si_l + offs_d[None, :], mask=row_in[:, None], other=0.0)
        o = tl.load(O + t_out, mask=row_in[:, None], other=0.0)
        do = tl.load(DO + t_out, mask=row_in[:, None], other=0.0)
        lse2 = tl.load(LSE2 + bh * L + offs_m, mask=row_in, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh * L + offs_m, delta, mask=row_ok)
        dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for start_n in range(0, L, BLOCK_N):
            offs_n = start_n + offs_n0
            col_ok = offs_n < L
            kv = base + offs_n[:, None] * si_l + offs_d[None, :]
            k = tl.load(K + kv, mask=col_ok[:, None], other=0.0)
            v = tl.load(V + kv, mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
            p = tl.exp2(s - lse2[:, None])
            p = tl.where(row_in[:, None] & col_ok[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

        dq = dq * scale
        tl.store(DQ + t_out, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV,
    si_b, si_h, si_l, so_b, so_h, so_l,
    H, L, BH, scale, qk_scale_log2,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # The two-pass backward, pass 2: one program owns a block of keys and sweeps all queries,
    # so dK and dV are written once, without atomics (FA-2 Alg. 2, outer loop over key blocks;
    # 4 matmuls per tile, S and dP recomputed after pass 1).
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    col_in = offs_n < L
    for g in range(GROUP):
        bh_raw, bh, b, h = _head_of(tl.program_id(1), g, GROUP, BH, H)
        col_ok = col_in & (bh_raw < BH)
        kv = b * si_b + h * si_h + offs_n[:, None] * si_l + offs_d[None, :]
        k = tl.load(K + kv, mask=col_in[:, None], other=0.0)
        v = tl.load(V + kv, mask=col_in[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)

        q_base = Q + b * si_b + h * si_h
        do_base = DO + b * so_b + h * so_h
        for start_m in range(0, L, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < L
            q = tl.load(q_base + offs_m[:, None] * si_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * so_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(LSE2 + bh * L + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * L + offs_m, mask=row_ok, other=0.0)
            # Transposed tile: rows are keys, columns are queries, P^T = exp2(S2^T - LSE2).
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale_log2
            p_t = tl.exp2(s_t - lse2[None, :])
            p_t = tl.where(row_ok[None, :] & col_in[:, None], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

        kv_out = b * so_b + h * so_h + offs_n[:, None] * so_l + offs_d[None, :]
        tl.store(DK + kv_out, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DV + kv_out, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA,
    so_b, so_h, so_l,
    H, L, BH,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # delta_i = sum_d dO_id O_id for one block of rows of one (batch, head): the pre-processing
    # launch of the atomic backward (FA-2 Alg. 2, line 4), whose programs are key blocks.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    bh = tl.program_id(1)
    ok = offs_m < L
    t_out = (bh // H) * so_b + (bh % H) * so_h + offs_m[:, None] * so_l + offs_d[None, :]
    o = tl.load(O + t_out, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + t_out, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh * L + offs_m, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _bwd_atomic_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ_ACC, DK, DV,
    si_b, si_h, si_l, so_b, so_h, so_l,
    H, L, BH, scale, qk_scale_log2,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # The atomic backward: FA-2 Alg. 2 as written, 5 matmuls per tile. A program owns a block of
    # keys and sweeps all queries (as pass 2 above), and also forms dQ_i += dS K_j for each query
    # block, adding it into a float32 dQ accumulator with atomics (relaxed: only the sum matters,
    # read after the launch). S and dP are computed once, not twice. The order of the atomic
    # additions varies from run to run on a GPU: dQ's last bits are not deterministic.
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    col_in = offs_n < L
    for g in range(GROUP):
        bh_raw, bh, b, h = _head_of(tl.program_id(1), g, GROUP, BH, H)
        col_ok = col_in & (bh_raw < BH)
        kv = b * si_b + h * si_h + offs_n[:, None] * si_l + offs_d[None, :]
        k = tl.load(K + kv, mask=col_in[:, None], other=0.0)
        v = tl.load(V + kv, mask=col_in[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)

        q_base = Q + b * si_b + h * si_h
        out_base = b * so_b + h * so_h
        for start_m in range(0, L, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < L
            q = tl.load(q_base + offs_m[:, None] * si_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            t_out = out_base + offs_m[:, None] * so_l + offs_d[None, :]
            do = tl.load(DO + t_out, mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(LSE2 + bh * L + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * L + offs_m, mask=row_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale_log2
            p_t = tl.exp2(s_t - lse2[None, :])
            p_t = tl.where(row_ok[None, :] & col_in[:, None], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION) * scale
            # A trailing program's duplicate pair (bh_raw >= BH) must add nothing.
            tl.atomic_add(DQ_ACC + t_out, dq, mask=row_ok[:, None] & (bh_raw < BH), sem="relaxed")

        kv_out = out_base + offs_n[:, None] * so_l + offs_d[None, :]
        tl.store(DK + kv_out, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DV + kv_out, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# Forward tiles measured on an H100 in bf16 (shared/measurements/h100-2026-11-25, TFLOP/s,
# forward only; BLOCK_M x BLOCK_N, warps, stages):
#   D=128, L=4096: 64x64 w4 s3 444 (SDPA 339; the earlier 64x64 w8 s2 gave 184)
#   D=64, L=1024:  64x64 w4 s3 210 (earlier 128x64 w8 s3: 205, within noise)
#   D=64, L=256:   128x64 w4 s4 36 (earlier 34; every configuration tried gave 20-36)
#   D=64, L=4096:  128x64 w8 s3 340 (SDPA 278), kept.
# Every other entry is unmeasured: the nearest measured rule, marked as such.
_FWD_TABLE = {
    # (D, L upper bound) -> (BLOCK_M, BLOCK_N, warps, stages); 16-bit storage
    (32, 256): (128, 64, 4, 4),      # unmeasured: the D=64 L=256 entry
    (32, 1024): (64, 64, 4, 3),      # unmeasured: the D=64 L=1024 entry
    (32, None): (128, 64, 8, 3),     # unmeasured: the D=64 L=4096 entry
    (64, 256): (128, 64, 4, 4),      # measured, L=256
    (64, 1024): (64, 64, 4, 3),      # measured, L=1024
    (64, None): (128, 64, 8, 3),     # measured, L=4096
    (128, None): (64, 64, 4, 3),     # measured, L=4096
}


@functools.lru_cache(maxsize=1024)
def _config(kind: str, L: int, D: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options for one kernel: "fwd", "bwd" (the two-pass backward's two
    kernels), "bwd5" (the atomic backward's kernel) or "bwd1" (one-tile backward).

    The interpreter gets small fixed tiles: it is a correctness mode, and 16-wide tiles make
    the tests exercise multi-block loops and masked tails at small L, the one-block paths at
    L <= 16 and (GROUP=2) the merged (batch, head) loop with its masked trailing program.
    On a GPU the forward follows _FWD_TABLE; a sequence no longer than one key block
    (L <= 64, the U-Net's 8 x 8) is a single tile. The backward entries are unmeasured.

    GROUP is 1 on a GPU until a measurement says otherwise: compiled for sm_90 (ptxas -v,
    no GPU needed), GROUP=2 raises the one-tile forward at L=64 from 122 to 255 registers
    per thread with 4 warps (232-404 bytes spilled) and the one-tile backward from 143 to 255
    with 656 bytes spilled; the merged loop becomes the pipelined loop. bench/ has rows
    (triton-g2, triton-g4) to measure it; override_config sets it.
    """
    one = max(16, _next_pow2(L))  # one tile that covers the whole sequence
    if INTERPRETED:
        if kind == "bwd1":
            return dict(BLOCK=16, num_warps=4, num_stages=1, GROUP=2)
        cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, GROUP=2)
        return dict(cfg, ONE_BLOCK=L <= 16) if kind == "fwd" else cfg
    wide = dtype == torch.float32  # twice the bytes per tile: smaller tiles
    if kind == "fwd":
        if wide:  # fp32 storage (IEEE products, no tensor cores). Speed unmeasured; the
            # earlier 64x64 tiles spilled 764-14672 bytes per thread in an sm_90 build
            # (kernels/_build_check.py), these none.
            bm, bn, warps, stages = (64, 32, 8, 2) if D == 128 else (32, 32, 4, 2)
        elif L <= 64:  # one tile covers the whole sequence (unmeasured)
            bm, bn, warps, stages = one, one, 4, 2
        else:
            bm, bn, warps, stages = next(cfg for (d, top), cfg in _FWD_TABLE.items()
                                         if d == D and (top is None or L <= top))
        bm, bn = min(bm, one), min(bn, one)
        return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, GROUP=1, ONE_BLOCK=L <= bn)
    if kind == "bwd1":  # unmeasured; sm_90 build: 143 registers, no spills at 8 warps (205 at 4)
        return dict(BLOCK=one, num_warps=8, num_stages=1, GROUP=1)
    # Unmeasured: the earlier backward tiles; at D=128 8 warps, as the dK/dV pass spilled
    # 80 bytes per thread at 4 (sm_90 build, ptxas -v) and none at 8; fp32 at 32x32, as the
    # earlier 32x64 spilled 192-740 bytes. "bwd5" (unmeasured) starts from the same tiles: its
    # kernel holds the dK/dV pass's tiles plus one dQ tile.
    bm, bn = (32, 32) if wide else (32, 64) if D == 128 else (64, 64)
    warps = 8 if D == 128 else 4
    return dict(BLOCK_M=min(bm, one), BLOCK_N=min(bn, one), num_warps=warps, num_stages=2, GROUP=1)


def _one_block_backward(L: int, D: int, dtype: torch.dtype) -> bool:
    # Six L x D tiles plus four L x L fp32 tiles live in one program: keep that to L <= 64
    # in 16-bit storage (the U-Net's 8 x 8); the interpreter uses it up to its tile of 16.
    if INTERPRETED:
        return L <= 16
    return L <= 64 and D <= 64 and dtype != torch.float32


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


def _inputs(q, k, v):
    """q, k, v as the kernels read them (kernels._common's one layout policy): one stride set with a
    unit stride along D, as views of one (B, L, 3, H, D) qkv tensor or three like-strided tensors
    are; otherwise all three are copied to contiguous tensors."""
    if q.stride() == k.stride() == v.stride() and unit_last(q):
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _rows(x: torch.Tensor):
    """The (batch, head, row) strides of a (B, H, L, D) tensor: its stride set."""
    return x.stride(0), x.stride(1), x.stride(2)


def _like_out(o: torch.Tensor, dtype=None) -> torch.Tensor:
    """An empty tensor in o's layout ((B, L, H, D) memory seen as (B, H, L, D)): the output set."""
    return torch.empty_like(o, dtype=dtype)


_OVERRIDES: dict = {}


@contextlib.contextmanager
def override_config(kind: str, L: int, D: int, dtype: torch.dtype, **cfg):
    """Within the block, launch `kind` ("fwd", "bwd", "bwd5", "bwd1") at (L, D, dtype) with `cfg`
    (BLOCK_M, BLOCK_N or BLOCK, num_warps, num_stages, GROUP) replacing the table's entries:
    for tuning rows in bench/, so a measured configuration can then go into the table."""
    key = (kind, L, D, dtype)
    base = dict(_config(kind, L, D, dtype))
    unknown = set(cfg) - set(base)
    if unknown:
        raise ValueError(f"override_config: unknown keys {sorted(unknown)}; {kind} takes {sorted(base)}")
    _OVERRIDES[key] = dict(base, **cfg)
    try:
        yield
    finally:
        del _OVERRIDES[key]


def _launch_cfg(kind: str, L: int, D: int, dtype: torch.dtype) -> dict:
    """The table's configuration, or an override_config one."""
    return _OVERRIDES.get((kind, L, D, dtype)) or _config(kind, L, D, dtype)


# --------------------------------------------------------------------------------------
# Backward choice
# --------------------------------------------------------------------------------------
#: The multi-block backwards (L above one tile), selectable by `set_backward` / `use_backward`:
#: "two_pass": a dQ kernel then a dK/dV kernel, no atomics, deterministic; S and dP are
#: computed in both (7 matmuls per tile pair). The default until a GPU measures the other faster.
#: "atomic": FA-2 Alg. 2 as written, one delta launch and one kernel of 5 matmuls per tile pair,
#: dQ added into a float32 accumulator with atomics (its last bits vary from run to run on a GPU)
#: and cast to the storage dtype after. bench/test_bench_attention.py times both ("triton-bwd5").
BACKWARDS = ("two_pass", "atomic")
_BACKWARD = {"kind": "two_pass"}


def set_backward(kind: str) -> str:
    """Make `kind` (one of BACKWARDS) the multi-block backward of every later call; returns the previous one."""
    if kind not in BACKWARDS:
        raise ValueError(f"set_backward: kind must be one of {BACKWARDS}, got {kind!r}")
    previous, _BACKWARD["kind"] = _BACKWARD["kind"], kind
    return previous


@contextlib.contextmanager
def use_backward(kind: str):
    """Within the block, backward passes use `kind` (see BACKWARDS)."""
    previous = set_backward(kind)
    try:
        yield
    finally:
        set_backward(previous)


def _forward(q, k, v, scale):
    B, H, L, D = q.shape
    # o is written in (B, L, H, D) memory and returned as its (B, H, L, D) view: the U-Net
    # folds the heads back into channels with a free reshape instead of a copy.
    o = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse2 = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    cfg = _launch_cfg("fwd", L, D, q.dtype)
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), triton.cdiv(B * H, cfg["GROUP"]))
    _fwd_kernel[grid](
        q, k, v, o, lse2, *_rows(q), *_rows(o),
        H, L, B * H, scale * _LOG2E,
        D=D, PRECISION=_precision(q.dtype), **cfg,
    )
    return o, lse2


def _backward(q, k, v, o, lse2, do, scale):
    """dq, dk, dv (in o's layout) from the saved forward and dO (copied into o's layout if not in it)."""
    B, H, L, D = q.shape
    if do.stride() != o.stride():
        do = _like_out(o).copy_(do)
    dk, dv = _like_out(o), _like_out(o)
    prec = _precision(q.dtype)
    BH = B * H
    rows = (*_rows(q), *_rows(o))
    if _one_block_backward(L, D, q.dtype):
        dq = _like_out(o)
        cfg = _launch_cfg("bwd1", L, D, q.dtype)
        _bwd_one_block_kernel[(triton.cdiv(BH, cfg["GROUP"]),)](
            q, k, v, o, do, lse2, dq, dk, dv, *rows,
            H, L, BH, scale, scale * _LOG2E, D=D, PRECISION=prec, **cfg,
        )
        return dq, dk, dv
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if _BACKWARD["kind"] == "atomic":
        cfg = _launch_cfg("bwd5", L, D, q.dtype)
        bm = cfg["BLOCK_M"]
        _bwd_delta_kernel[(triton.cdiv(L, bm), BH)](o, do, delta, *_rows(o), H, L, BH, D=D, BLOCK_M=bm)
        dq_acc = torch.zeros_like(o, dtype=torch.float32)
        _bwd_atomic_kernel[(triton.cdiv(L, cfg["BLOCK_N"]), triton.cdiv(BH, cfg["GROUP"]))](
            q, k, v, do, lse2, delta, dq_acc, dk, dv, *rows,
            H, L, BH, scale, scale * _LOG2E, D=D, PRECISION=prec, **cfg,
        )
        return dq_acc.to(q.dtype), dk, dv
    dq = _like_out(o)
    cfg = _launch_cfg("bwd", L, D, q.dtype)
    n_m, n_n = triton.cdiv(L, cfg["BLOCK_M"]), triton.cdiv(L, cfg["BLOCK_N"])
    # dQ first: it also writes delta, which the dK/dV pass reads (same stream, in order).
    _bwd_dq_kernel[(n_m, triton.cdiv(BH, cfg["GROUP"]))](
        q, k, v, o, do, lse2, delta, dq, *rows,
        H, L, BH, scale, scale * _LOG2E, D=D, PRECISION=prec, **cfg,
    )
    _bwd_dkdv_kernel[(n_n, triton.cdiv(BH, cfg["GROUP"]))](
        q, k, v, do, lse2, delta, dk, dv, *rows,
        H, L, BH, scale, scale * _LOG2E, D=D, PRECISION=prec, **cfg,
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


# The same forward and backward as torch.library custom ops, for torch.compile: dynamo cannot
# trace into a Triton launch in every setting (not at all under the interpreter), while a
# custom op is opaque to it, so a compiled network keeps one graph around the kernels.
# Eager calls keep the autograd.Function above: a custom op's dispatch costs host time
# (launch-bound short sequences are where the kernels need every microsecond).
@torch.library.custom_op("wgfcore::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, scale):
    B, H, L, D = q.shape
    return q.new_empty((B, L, H, D)).transpose(1, 2), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("wgfcore::attention_bwd", mutates_args=())
def _attention_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse2: torch.Tensor,
                      do: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(q, k, v, o, lse2, do, scale)


@_attention_bwd_op.register_fake
def _(q, k, v, o, lse2, do, scale):
    return _like_out(o), _like_out(o), _like_out(o)


def _op_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale = scale


def _op_backward(ctx, do, _dlse2):
    q, k, v, o, lse2 = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(q, k, v, o, lse2, do, ctx.scale)
    return dq, dk, dv, None


_attention_fwd_op.register_autograd(_op_backward, setup_context=_op_setup)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """Forward only, without autograd: returns ``(o, lse)``.

    ``o = softmax(q k^T * scale) v`` with shape (B, H, L, D) in the input dtype, and
    ``lse[b, h, i] = log sum_j exp(scale * q_i . k_j)`` (natural log) in float32, shape
    (B, H, L): the statistic the backward pass recomputes P from.
    """
    scale = _check_inputs(q, k, v, scale)
    o, lse2 = _forward(*_inputs(q, k, v), scale)
    return o, lse2 * _LN2


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Differentiable fused attention ``softmax(q k^T * scale) v`` (FlashAttention-2).

    q, k, v: (B, H, L, D) tensors of one dtype (float32, float16 or bfloat16) on one CUDA
    device (or CPU under TRITON_INTERPRET=1), D in {32, 64, 128}, any L >= 1.
    scale defaults to 1/sqrt(D). Accumulation is in float32; memory is O(B H L D).
    """
    scale = _check_inputs(q, k, v, scale)
    q, k, v = _inputs(q, k, v)
    if torch.compiler.is_compiling():
        return _attention_fwd_op(q, k, v, scale)[0]
    return _FlashAttention.apply(q, k, v, scale)
