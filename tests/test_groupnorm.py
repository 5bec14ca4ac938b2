"""Fused GroupNorm + scale-shift + SiLU (kernels/groupnorm.py) against an fp64 reference.

The oracle is the network's torch path, `wgfcore.nets.unet.scale_shift_norm`. As for the
attention kernel (tests/test_attention.py): the kernel's max error against that oracle in
fp64 must be at most twice the error of the same torch path run at the kernel's storage
precision, plus a floor derived in `floors`. On CPU the kernel runs in Triton's interpreter,
so shapes are small (its tiles are 16 positions wide: the shapes below cover loops and tails).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import INTERPRETED
from kernels.groupnorm import group_norm_act
from wgfcore.nets.unet import scale_shift_norm

if not INTERPRETED and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("needs CUDA or the Triton interpreter", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
U32 = torch.finfo(torch.float32).eps / 2
NAMES = ("y", "dx", "dw", "db", "dscale", "dshift")


def make_inputs(B, C, H, W, groups, has_ss, seed, offset, dtype):
    """Inputs already rounded to what the kernel stores (x, scale, shift, dy in `dtype`;
    weight and bias in float32, as parameters under autocast), held in float64: the fp64
    reference then sees exactly the kernel's inputs, and only the computation's own
    rounding is measured (as in tests/test_attention.py)."""
    g = torch.Generator().manual_seed(seed)
    x = offset + torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    w = 1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    # scale and shift as the ResBlock makes them: (B, C, 1, 1) halves of one (B, 2C) tensor.
    ss = torch.randn(B, 2 * C, 1, 1, generator=g, dtype=torch.float64) if has_ss else None
    dy = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    x, ss, dy = (None if t is None else t.to(dtype).double() for t in (x, ss, dy))
    w, b = (t.float().double() for t in (w, b))
    return x, w, b, ss, dy


def run(fn, x, w, b, ss, dy, groups, act, dtype, channels_last=False, **kw):
    """Output and gradients w.r.t. x, weight, bias, scale, shift; x, scale, shift and dy in
    `dtype`, weight and bias in float32 (float64 for the reference)."""
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    xx = x.to(DEVICE, dtype, copy=True)  # a fresh leaf: never the caller's tensor
    if channels_last:
        xx = xx.contiguous(memory_format=torch.channels_last)
    xx.requires_grad_()
    ww, bb = (t.to(DEVICE, pdtype, copy=True).requires_grad_() for t in (w, b))
    leaves = [xx, ww, bb]
    scale = shift = None
    if ss is not None:
        sst = ss.to(DEVICE, dtype, copy=True).requires_grad_()
        leaves.append(sst)
        scale, shift = sst.chunk(2, dim=1)
    y = fn(xx, groups, ww, bb, scale, shift, 1e-5, act, **kw)
    grads = torch.autograd.grad(y, leaves, dy.to(DEVICE, y.dtype))
    out = dict(y=y.detach(), dx=grads[0], dw=grads[1], db=grads[2])
    if ss is not None:
        out["dscale"], out["dshift"] = grads[3].chunk(2, dim=1)
    return {k: v.double().cpu() for k, v in out.items()}, y


def torch_path(x, groups, w, b, scale, shift, eps, act):
    """The network's torch path as autocast runs it: group_norm (an fp32 op under autocast)
    and what follows in float32, the result stored in x's dtype as the kernel stores it."""
    up = (lambda t: t) if scale is None else (lambda t: t.float())
    return scale_shift_norm(x.float(), groups, w, b, up(scale), up(shift), eps, act).to(x.dtype)


def perturbed_reference(x, groups, w, b, scale, shift, eps, act, d_mean=None, d_rstd=None):
    """The fp64 reference with the group mean shifted by d_mean (B, G) and rstd scaled by
    (1 + d_rstd) (B, G): how far rounding errors of the statistics alone move each output."""
    B, C = x.shape[:2]
    xg = x.reshape(B, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    rstd = 1 / torch.sqrt(((xg - mean) ** 2).mean(-1, keepdim=True) + eps)
    xhat = ((xg - mean - d_mean[..., None]) * rstd * (1 + d_rstd[..., None])).reshape(x.shape)
    shape = (1, C) + (1,) * (x.dim() - 2)
    h = xhat * w.reshape(shape) + b.reshape(shape)
    if scale is not None:
        h = h * (1 + scale) + shift
    return torch.nn.functional.silu(h) if act else h


def floors(ref, x, w, b, ss, dy, groups, act, dtype):
    """Absolute floors added to the 2x-torch bound.

    (1) Storage rounding: one ulp of max(1, |ref|) in the result's dtype (x's dtype for y, dx,
        dscale, dshift; float32 for the parameter gradients). Torch can be exact by luck,
        and 2 x 0 is no bound.
    (2) Group statistics: the kernel sums the n = (C / G) H W elements of a group in an order
        of its own, so its mean and variance carry rounding errors that are not torch's
        (torch can be lucky on a handful of groups): about |d mean| = sqrt(n) u mean|x| and a
        relative sqrt(n) u in the variance, so sqrt(n) u in rstd (Higham, Accuracy and
        Stability of Numerical Algorithms, sec. 3.1, probabilistic sqrt(n) rule). Their effect
        on every output and gradient is measured, not guessed: the fp64 reference is rerun
        with the statistics perturbed by those amounts, each sign, and the largest change is
        the floor. Both paths compute in float32, so this is a float32-sized term.
    """
    out = {}
    for name, r in ref.items():
        eps = torch.finfo(torch.float32 if name in ("dw", "db") else dtype).eps
        out[name] = eps * max(1.0, r.abs().max().item())
    B, C = x.shape[:2]
    xg = x.reshape(B, groups, -1)
    n = xg.shape[-1]
    d_mean = math.sqrt(n) * U32 * xg.abs().mean(-1)
    d_rstd = torch.full_like(d_mean, math.sqrt(n) * U32)
    moved = dict.fromkeys(ref, 0.0)
    for sm in (1, -1):
        for sr in (1, -1):
            got, _ = run(perturbed_reference, x, w, b, ss, dy, groups, act, torch.float64,
                         d_mean=sm * d_mean, d_rstd=sr * d_rstd)
            for name in ref:
                moved[name] = max(moved[name], (got[name] - ref[name]).abs().max().item())
    return {name: out[name] + moved[name] for name in ref}


shapes = dict(
    B=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 4]),
    cg=st.sampled_from([1, 2, 3]),  # channels per group; 3 leaves masked channel lanes
    H=st.integers(2, 6),  # torch refuses one value per group and channel at H = W = 1
    W=st.integers(1, 7),
    has_ss=st.booleans(),
    act=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    channels_last=st.booleans(),
    offset=st.sampled_from([0.0, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=25, deadline=None)
@given(**shapes)
def test_forward_and_gradients_match_fp64(B, groups, cg, H, W, has_ss, act, dtype, channels_last, offset, seed):
    C = groups * cg
    x, w, b, ss, dy = make_inputs(B, C, H, W, groups, has_ss, seed, offset, dtype)
    ref, _ = run(scale_shift_norm, x, w, b, ss, dy, groups, act, torch.float64)
    pt, _ = run(torch_path, x, w, b, ss, dy, groups, act, dtype)
    got, y = run(group_norm_act, x, w, b, ss, dy, groups, act, dtype, channels_last)
    assert y.dtype == dtype and y.shape == x.shape
    if channels_last and H * W > 1 and C > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    fl = floors(ref, x, w, b, ss, dy, groups, act, dtype)
    for name in ref:
        err_k = (got[name] - ref[name]).abs().max().item()
        err_t = (pt[name] - ref[name]).abs().max().item()
        assert err_k <= 2 * err_t + fl[name], (
            f"{name}: kernel error {err_k:.3e} > 2 x torch error {err_t:.3e} + floor {fl[name]:.1e} "
            f"for B={B} C={C} G={groups} HxW={H}x{W} {dtype} ss={has_ss} act={act} cl={channels_last} offset={offset}"
        )


def test_group_of_one_element_and_stride_zero_gradient():
    # One element per group: the variance is 0 and GN(x) = beta exactly; the gradient of a
    # sum arrives as an expanded (stride-0) tensor, which the kernel reads in place.
    x = torch.randn(2, 4, 1, 1, device=DEVICE, requires_grad=True)
    w = torch.randn(4, device=DEVICE, requires_grad=True)
    b = torch.randn(4, device=DEVICE)
    y = group_norm_act(x, 4, w, b, act=False)
    torch.testing.assert_close(y, b.expand(2, 4).reshape(2, 4, 1, 1), rtol=0, atol=0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


def _args(**over):
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    a = dict(x=x, groups=2, weight=torch.ones(4, device=DEVICE), bias=torch.zeros(4, device=DEVICE))
    a.update(over)
    return a


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(groups=3), ValueError, "groups must be a positive int dividing C=4"),
        (dict(groups=0), ValueError, "groups"),
        (dict(weight=torch.ones(3)), ValueError, "weight must be a float tensor of shape"),
        (dict(x=torch.randn(2, 4, 3, 3, dtype=torch.float64)), TypeError, "dtype"),
        (dict(x=[1.0]), TypeError, "torch.Tensor"),
        (dict(x=torch.randn(0, 4, 3, 3)), ValueError, "non-empty"),
        (dict(scale=torch.zeros(2, 4)), ValueError, "both scale and shift"),
        (dict(scale=torch.zeros(2, 3), shift=torch.zeros(2, 3)), ValueError, r"scale must have shape \(B, C\)"),
        (dict(eps=0.0), ValueError, "eps"),
    ],
)
def test_bad_inputs_raise_clear_errors(over, exc, match):
    a = _args()
    over = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in over.items()}
    a.update(over)
    with pytest.raises(exc, match=match):
        group_norm_act(**a)


@pytest.mark.skipif(not INTERPRETED, reason="interpreter-only restriction")
def test_bf16_on_interpreter_is_rejected_clearly():
    with pytest.raises(TypeError, match="interpreter has no bfloat16"):
        group_norm_act(**_args(x=torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)))


# --- every layout the op accepts: the custom ops' fake implementations agree with the kernels -----

def _layout(name, g):
    """A (B, C, ...) input of shape (2, 4, 3, 5) (or its 2-D, 3-D, 5-D kin) in memory layout `name`."""
    if name == "nchw":
        return torch.randn(2, 4, 3, 5, generator=g)
    if name == "channels_last":
        return torch.randn(2, 4, 3, 5, generator=g).contiguous(memory_format=torch.channels_last)
    if name == "hw_swapped":  # dense, but H and W in the wrong order: the spatial dims do not merge
        return torch.randn(2, 4, 5, 3, generator=g).transpose(2, 3)
    if name == "channel_slice":  # not dense: half the channels of a wider tensor
        return torch.randn(2, 8, 3, 5, generator=g)[:, 2:6]
    if name == "bcl":
        return torch.randn(2, 4, 7, generator=g)
    if name == "bc":
        return torch.randn(2, 4, generator=g)
    if name == "channels_last_3d":
        return torch.randn(2, 4, 2, 3, 5, generator=g).contiguous(memory_format=torch.channels_last_3d)
    raise AssertionError(name)


LAYOUTS = ["nchw", "channels_last", "hw_swapped", "channel_slice", "bcl", "bc", "channels_last_3d"]


@pytest.mark.parametrize("layout,has_ss", [(name, True) for name in LAYOUTS] + [("nchw", False), ("hw_swapped", False)])
def test_custom_ops_pass_opcheck_on_every_layout(layout, has_ss):
    """torch.library.opcheck: schema, autograd registration, fake tensors (output shapes and strides
    equal to the kernels'), AOT dispatch, for the forward op and the backward op, on every layout,
    including one whose spatial dims cannot be merged (the kernels copy it; y comes back contiguous).
    Without scale-shift (the optional arguments absent) on a mergeable and an unmergeable layout;
    dy as the gradient of a sum (expanded, stride 0) on NCHW."""
    from kernels.groupnorm import _gn_bwd_op, _gn_fwd_op

    g = torch.Generator().manual_seed(LAYOUTS.index(layout))
    x = _layout(layout, g).to(DEVICE)
    B, C = x.shape[:2]
    w, b = torch.randn(C, generator=g).to(DEVICE), torch.randn(C, generator=g).to(DEVICE)
    ss = [torch.randn(B, C, generator=g).to(DEVICE) for _ in range(2)] if has_ss else [None, None]
    torch.library.opcheck(_gn_fwd_op, (x, 2, w, b, *ss, 1e-5, True))
    y, mean, rstd = _gn_fwd_op(x, 2, w, b, *ss, 1e-5, True)
    dys = [torch.randn_like(y)] + ([torch.randn(1, *x.shape[1:], device=DEVICE).expand(x.shape)]
                                   if layout == "nchw" else [])
    for dy in dys:
        torch.library.opcheck(_gn_bwd_op, (x, dy, 2, w, b, *ss, mean, rstd, True))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_contiguous_result(layout):
    """Whatever the layout, the same values (bit for bit) as the contiguous input, forward and backward;
    y and dx in x's memory format where its spatial dims merge and x is dense, else contiguous."""
    g = torch.Generator().manual_seed(7)
    x = _layout(layout, g).to(DEVICE)
    C = x.shape[1]
    w, b = torch.randn(C, generator=g).to(DEVICE), torch.randn(C, generator=g).to(DEVICE)
    dy = torch.randn(x.shape, generator=g).to(DEVICE)
    outs = []
    for xx in (x, x.contiguous()):
        xx = xx.detach().clone(memory_format=torch.preserve_format).requires_grad_() if xx is x else \
            xx.detach().requires_grad_()
        y = group_norm_act(xx, 2, w, b)
        (dx,) = torch.autograd.grad(y, xx, dy)
        outs.append((y, dx))
    (y, dx), (y0, dx0) = outs
    assert torch.equal(y, y0) and torch.equal(dx, dx0)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    if layout in ("hw_swapped", "channel_slice"):
        assert y.is_contiguous()
