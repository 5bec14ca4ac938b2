"""Fused attention kernel (kernels/attention.py) against an fp64 reference.

Tolerances follow the flash-attention test convention: the kernel's max error against
fp64 must be at most twice the error of PyTorch's own math path at the same storage
precision, plus a small floor derived below. On CPU the kernels run in Triton's
interpreter, so shapes are small.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import INTERPRETED
from kernels.attention import BACKWARDS, SUPPORTED_HEAD_DIMS, attention, attention_forward, use_backward

if not INTERPRETED and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("needs CUDA or the Triton interpreter", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff of the fp32 accumulators


def math_attention(q, k, v, scale):
    """The reference: softmax(q k^T * scale) v, computed in the inputs' dtype."""
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def make_inputs(B, H, L, D, dtype, seed, amp=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (amp * torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(4))
    return [x.to(dtype).to(DEVICE) for x in (q, k, v, do)]


def run_all(q, k, v, do, scale, effective_scale):
    """Outputs and gradients of the fp64 reference, torch same-precision math, and kernel.

    The kernel gets `scale` as given (None exercises its default 1/sqrt(D)); the math
    paths get the effective value.
    """
    out = {}
    for name in ("ref", "pt", "kernel"):
        dtype = torch.float64 if name == "ref" else q.dtype
        qq, kk, vv = (x.to(dtype).clone().requires_grad_() for x in (q, k, v))
        if name == "kernel":
            o = attention(qq, kk, vv, scale)
            lse = attention_forward(qq.detach(), kk.detach(), vv.detach(), scale)[1]
        else:
            o, lse = math_attention(qq, kk, vv, effective_scale)
        o.backward(do.to(dtype))
        out[name] = dict(o=o.detach(), lse=lse.detach(), dq=qq.grad, dk=kk.grad, dv=vv.grad)
    return out


# Accuracy of the GPU's fp32 exp2 and log2 (PTX `ex2.approx` / `lg2.approx`, which Triton's
# tl.exp2 / tl.log2 lower to): about 2 ulp, so 2^-22 (= 4 u32) is taken as their error bound,
# relative for exp2 and absolute (in base-2 units) for log2. numpy's fp32 exp2/log2, which the
# interpreter runs, are within 1 ulp, so one bound serves both.
E_EXP2 = E_LOG2 = 2.0 ** -22


def error_floors(q, k, v, do, scale, ref, dtype):
    """Absolute floors added to the 2x-PyTorch bound, one per checked quantity.

    First-order rounding analysis of the steps where the FA-2 algorithm necessarily
    differs from torch's math path (Dao 2023, Alg. 1 and 2); all are fp32-sized, so they
    only matter for fp32 storage, and for fp16 the 2x rule alone decides. u = U32 is the
    fp32 unit roundoff. A dot product x.y of length n carries an error of about
    sqrt(n) u |x|.|y| (Higham, Accuracy and Stability of Numerical Algorithms, sec. 3.1 and
    its probabilistic sqrt(n) rule).

    (1) Storage rounding, o and the gradients: the result is rounded to the storage dtype
        (half an ulp at its magnitude); we allow one ulp of max(1, |ref|). Torch can be
        exact by luck (L = 1: softmax backward gives dQ = dK = 0 exactly) and 2 x 0 is no
        bound.
    (2) Backward only: P is recomputed as exp(S - LSE) from the fp32 LSE saved by the
        forward pass, whose rounding perturbs P_ij relatively by about
        u (|S_ij| + |LSE_i|) -- large logits make this the dominant fp32 error.
        It enters dV = P^T dO, and dS = P * (dP - delta).
    (3) dQ, dK only: dS uses delta = rowsum(dO * O) against dP = dO V^T, a cancellation of
        two fp32 dot products of length D: dP - delta is off by about
        sqrt(D) u (|dO| |V|^T + rowsum(|dO| |O|)).
    (4) lse only (always fp32), which is first order in the logits and, at small L, a
        statistic of very few dot products: at L = 1, lse_i = S_ii is one dot product,
        and torch's error on it can be far below the dot product's error scale by luck
        (seen: torch 1.4e-7, kernel 8.2e-7, scale 1.1e-5), so 2x torch is no bound there.
        The kernel computes lse = (m + log2 l) ln 2 from base-2 logits
        S2_ij = fl(fl(q_i.k_j) fl(scale log2 e)), m = max_j S2_ij, l = sum_j 2^(S2_ij - m):
        (a) its own dot products, in its own summation order, and the rounded constant
            and product: |dS_ij| <= scale sqrt(D) u |q_i|.|k_j| + 2 u |S_ij|; lse moves
            by sum_j P_ij dS_ij (d lse / d S_ij = P_ij);
        (b) at lse's magnitude, the add m + log2 l, ln 2 rounded to fp32 and the product:
            3 u |lse_i|;
        (c) at magnitude one: l's relative error, which is lse's absolute error. The
            GPU's exp2 (PTX ex2.approx, about 2 ulp; E_EXP2), the rounded differences
            S2_ij - m (a P-weighted mean of u |S2_ij - m|, at most u log2 L) and the
            fp32 sum of L terms (sqrt(L) u); then log2's own error, E_LOG2 in base 2,
            that is ln 2 E_LOG2 in lse.
        This term replaces (1) for lse: (b) already counts the rounding to fp32.
        Why not for o: at L = 1, o = v exactly whatever the logits; otherwise o depends
        on the logits only through P's spread, and torch's own dot products over the
        B H L D outputs set its bound.
    """
    q, k, v, do = (x.double() for x in (q, k, v, do))
    L, D = q.shape[-2], q.shape[-1]
    s = (q @ k.transpose(-1, -2)) * scale
    p = torch.softmax(s, dim=-1)
    dp = do @ v.transpose(-1, -2)
    delta = (do * ref["o"]).sum(-1, keepdim=True)
    p_err = p * U32 * (s.abs() + ref["lse"].abs().unsqueeze(-1))  # (2)
    dot_mag = do.abs() @ v.abs().transpose(-1, -2) + (do.abs() * ref["o"].abs()).sum(-1, keepdim=True)
    ds_err = p_err * (dp - delta).abs() + p * math.sqrt(D) * U32 * dot_mag  # (2) + (3)
    eps = torch.finfo(dtype).eps
    floors = {name: eps * max(1.0, ref[name].abs().max().item()) for name in ref}  # (1)
    floors["dv"] += (p_err.transpose(-1, -2) @ do.abs()).max().item()
    floors["dq"] += scale * (ds_err @ k.abs()).max().item()
    floors["dk"] += scale * (ds_err.transpose(-1, -2) @ q.abs()).max().item()
    logit_err = scale * math.sqrt(D) * U32 * (q.abs() @ k.abs().transpose(-1, -2)) + 2 * U32 * s.abs()  # (4a)
    l_rel = E_EXP2 + U32 * (math.log2(L) + math.sqrt(L))  # (4c)
    lse_floor = (p * logit_err).sum(-1) + 3 * U32 * ref["lse"].abs() + l_rel + math.log(2) * E_LOG2
    floors["lse"] = lse_floor.max().item()
    return floors


def check(B, H, L, D, dtype, seed, scale=None, amp=1.0, names=("o", "lse", "dq", "dk", "dv")):
    q, k, v, do = make_inputs(B, H, L, D, dtype, seed, amp)
    s = scale if scale is not None else 1.0 / math.sqrt(D)
    out = run_all(q, k, v, do, scale, s)
    floors = error_floors(q, k, v, do, s, out["ref"], dtype)
    for name in names:
        ref = out["ref"][name]
        assert out["kernel"][name].shape == ref.shape, name
        err_kernel = (out["kernel"][name].double() - ref).abs().max().item()
        err_torch = (out["pt"][name].double() - ref).abs().max().item()
        bound = 2 * err_torch + floors[name]
        assert err_kernel <= bound, (
            f"{name}: kernel error {err_kernel:.3e} > 2 x torch error {err_torch:.3e} + floor "
            f"{floors[name]:.1e} for B,H,L,D={B},{H},{L},{D} {dtype} scale={scale} amp={amp}"
        )


shapes = dict(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    # Many L are not multiples of the interpreter's 16-wide tiles: masked tails.
    L=st.one_of(st.integers(1, 3), st.integers(4, 72)),
    D=st.sampled_from(SUPPORTED_HEAD_DIMS),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=25, deadline=None)
@given(**shapes, scale=st.sampled_from([None, 0.05, 0.3]), amp=st.sampled_from([1.0, 3.0]))
def test_forward_and_lse_match_fp64(B, H, L, D, dtype, seed, scale, amp):
    check(B, H, L, D, dtype, seed, scale=scale, amp=amp, names=("o", "lse"))


@pytest.mark.parametrize("backward", BACKWARDS)
@settings(max_examples=20, deadline=None)
@given(**shapes)
def test_gradients_match_fp64(backward, B, H, L, D, dtype, seed):
    # Unit-variance inputs and the default scale, as in the flash-attention tests. In very
    # peaked fp16 softmaxes (logits of tens), delta = rowsum(dO * O) built from the
    # fp16-rounded O can cost dK/dQ up to ~2.5x torch's error (seen once in 150 such
    # cases); that is inherent to FA-2's backward, and the forward test covers peaked cases.
    # Both multi-block backwards (the one-tile backward at L <= 16 is shared by both).
    with use_backward(backward):
        check(B, H, L, D, dtype, seed, names=("dq", "dk", "dv"))


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("L", [1, 15, 16, 17, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tile_boundaries(L, dtype, backward):
    # Deterministic coverage of exact multiples of the tile and one-off tails.
    with use_backward(backward):
        check(1, 2, L, 32, dtype, seed=L)


def test_atomic_backward_shares_dk_dv_and_bounds_dq():
    """The atomic backward forms dK and dV exactly as the two-pass one's dK/dV kernel (same
    products, same order): the same bits in the interpreter. dQ is summed in another order (the
    check above bounds its error against fp64)."""
    q, k, v, do = make_inputs(2, 3, 40, 64, torch.float16, seed=5)
    runs = {}
    for kind in BACKWARDS:
        with use_backward(kind):
            runs[kind] = run_all(q, k, v, do, None, 1 / 8)["kernel"]
    a, b = runs["two_pass"], runs["atomic"]
    if INTERPRETED:
        assert torch.equal(a["dk"], b["dk"]) and torch.equal(a["dv"], b["dv"])
    torch.testing.assert_close(a["dq"], b["dq"], rtol=2e-3, atol=2e-3)  # two fp16 roundings of one sum


def test_set_backward_rejects_unknown_kinds():
    from kernels.attention import set_backward

    with pytest.raises(ValueError, match="kind must be one of"):
        set_backward("fa3")
    assert set_backward("two_pass") == "two_pass"


def test_default_scale_is_inverse_sqrt_d():
    q, k, v, _ = make_inputs(1, 1, 20, 64, torch.float32, seed=3)
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, scale=1 / 8.0), rtol=0, atol=0)


def test_strided_inputs_match_contiguous():
    # (B, L, H, D) storage viewed as (B, H, L, D): non-trivial head/row strides, unit D.
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(2, 19, 3, 32, generator=g).to(DEVICE) for _ in range(3)]
    views = [x.transpose(1, 2) for x in base]
    assert not views[0].is_contiguous()
    o_view, lse_view = attention_forward(*views)
    o_cont, lse_cont = attention_forward(*(x.contiguous() for x in views))
    torch.testing.assert_close(o_view, o_cont, rtol=0, atol=0)
    torch.testing.assert_close(lse_view, lse_cont, rtol=0, atol=0)
    # D-strided views are copied by the launcher, not read wrongly.
    dview = [x.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2) for x in views]
    assert dview[0].stride(-1) != 1
    torch.testing.assert_close(attention_forward(*dview)[0], o_cont, rtol=0, atol=0)


def test_gradcheck_flows_through_autograd():
    q, k, v, _ = make_inputs(1, 1, 5, 32, torch.float32, seed=1)
    q.requires_grad_()
    out = attention(q, k, v)
    assert out.requires_grad and out.grad_fn is not None
    (g,) = torch.autograd.grad(out.square().sum(), q)
    assert g.shape == q.shape and torch.isfinite(g).all()


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((_t(1, 1, 8, 48), _t(1, 1, 8, 48), _t(1, 1, 8, 48)), ValueError, "head dim"),
        ((_t(1, 1, 8, 16), _t(1, 1, 8, 16), _t(1, 1, 8, 16)), ValueError, "head dim"),
        ((_t(1, 8, 32), _t(1, 8, 32), _t(1, 8, 32)), ValueError, "4-D"),
        ((_t(1, 1, 8, 32), _t(1, 1, 9, 32), _t(1, 1, 8, 32)), ValueError, "same shape"),
        ((_t(1, 1, 8, 32), _t(1, 1, 8, 32, dtype=torch.float16), _t(1, 1, 8, 32)), TypeError, "dtype"),
        ((_t(1, 1, 8, 32, dtype=torch.float64),) * 3, TypeError, "dtype"),
        ((_t(1, 1, 0, 32),) * 3, ValueError, "empty"),
        (([1.0], _t(1, 1, 8, 32), _t(1, 1, 8, 32)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        attention(*args)


@pytest.mark.parametrize("scale, exc", [(0.0, ValueError), (float("nan"), ValueError), ("0.1", TypeError)])
def test_bad_scale_raises(scale, exc):
    x = _t(1, 1, 8, 32)
    with pytest.raises(exc, match="scale"):
        attention(x, x, x, scale=scale)


@pytest.mark.skipif(not INTERPRETED, reason="interpreter-only restriction")
def test_bf16_on_interpreter_is_rejected_clearly():
    x = _t(1, 1, 8, 32, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="interpreter has no bfloat16"):
        attention(x, x, x)


@pytest.mark.parametrize("backward", BACKWARDS if INTERPRETED else ["two_pass"])  # GPU atomics: any order
@pytest.mark.parametrize("group", [1, 3])
def test_head_grouping_is_bitwise_neutral(group, backward):
    # Merging (batch, head) pairs per program (GROUP) changes which program computes a pair,
    # not the arithmetic: outputs and gradients must be bitwise those of the default
    # configuration, including a trailing program whose pairs run past B*H (5 pairs, 3 per
    # program), which must add nothing to the atomic backward's dQ. L=20 takes a multi-block
    # backward, L=9 the one-tile backward.
    from kernels.attention import override_config

    for L in (9, 20):
        q, k, v, do = make_inputs(1, 5, L, 32, torch.float32, seed=L)
        with use_backward(backward):
            base = run_all(q, k, v, do, None, 1 / math.sqrt(32))["kernel"]
        bwd = "bwd1" if L <= 16 else "bwd5" if backward == "atomic" else "bwd"
        with override_config("fwd", L, 32, torch.float32, GROUP=group), \
                override_config(bwd, L, 32, torch.float32, GROUP=group), use_backward(backward):
            got = run_all(q, k, v, do, None, 1 / math.sqrt(32))["kernel"]
        for name in ("o", "lse", "dq", "dk", "dv"):
            assert torch.equal(got[name], base[name]), (name, L, group)


def test_override_config_rejects_unknown_keys():
    from kernels.attention import override_config

    with pytest.raises(ValueError, match="unknown keys"):
        with override_config("fwd", 8, 32, torch.float32, BLOCK=32):
            pass


# Compiled (not interpreted) builds of the attention kernels for sm_90, without a GPU: tests/test_build_check.py.


# --- the custom ops (torch.compile's path): fake implementations agree with the kernels ----------

def _qkv(layout, g):
    B, H, L, D = 1, 2, 18, 32  # L > 16: the multi-block backwards in the interpreter
    if layout == "contiguous":
        return [torch.randn(B, H, L, D, generator=g) for _ in range(3)]
    if layout == "bLhd":  # three (B, L, H, D) tensors seen as (B, H, L, D)
        return [torch.randn(B, L, H, D, generator=g).transpose(1, 2) for _ in range(3)]
    if layout == "packed":  # views of one (B, L, 3, H, D) qkv tensor, as the U-Net's token layout
        return list(torch.randn(B, L, 3, H, D, generator=g).permute(2, 0, 3, 1, 4))
    if layout == "mixed":  # unlike strides: copied to contiguous by the launcher
        return [torch.randn(B, H, L, D, generator=g), torch.randn(B, L, H, D, generator=g).transpose(1, 2),
                torch.randn(B, H, D, L, generator=g).transpose(-1, -2)]
    raise AssertionError(layout)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("layout", ["contiguous", "bLhd", "packed", "mixed"])
def test_custom_ops_pass_opcheck(layout, backward):
    """Schema, autograd registration, fake tensors (shapes and strides equal to the kernels'), AOT
    dispatch: the forward op once per input layout, the backward op per backward kind, with dO in
    o's layout and (for contiguous inputs) a contiguous dO, which the launcher copies into o's layout."""
    from kernels.attention import _attention_bwd_op, _attention_fwd_op, _inputs

    g = torch.Generator().manual_seed(0)
    q, k, v = _inputs(*(x.to(DEVICE) for x in _qkv(layout, g)))  # what attention() hands the op
    if backward == BACKWARDS[0]:
        torch.library.opcheck(_attention_fwd_op, (q, k, v, 0.2))
    o, lse2 = _attention_fwd_op(q, k, v, 0.2)
    dos = [torch.randn_like(o)] + ([torch.randn(o.shape, generator=g).to(DEVICE)] if layout == "contiguous" else [])
    with use_backward(backward):
        for do in dos:
            torch.library.opcheck(_attention_bwd_op, (q, k, v, o, lse2, do, 0.2))
