"""ADM U-Net (wgfcore/nets/unet.py): shapes, presets, input checks, and agreement of the
"math", "sdpa" and "triton" attention backends in outputs and gradients."""
import copy
import re

import pytest
import torch

import kernels
from wgfcore.nets import ATTENTION_BACKENDS, MLP, PRESETS, UNet

F32_EPS = torch.finfo(torch.float32).eps
# Follow the device as tests/test_attention.py does: the Triton kernels refuse CPU tensors
# when a GPU is present (they are compiled for it), and run on CPU only in the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRETED else "cpu"


def randomised(net: UNet, seed: int = 0) -> UNet:
    # ADM zero-initialises the attention output projections and the last conv of every
    # residual branch, so a fresh net ignores attention entirely. Give every parameter that
    # is still all-zero random values, so each attention block affects the output.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def run(net, x, t):
    """Output and the gradients of a fixed random functional w.r.t. x and all parameters."""
    x = x.clone().requires_grad_()
    out = net(x, t)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    (out * w).sum().backward()
    grads = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in net.parameters()])
    net.zero_grad(set_to_none=True)
    return out.detach().double(), grads.double()


@pytest.fixture(scope="module")
def tiny_setup():
    torch.manual_seed(0)
    net = randomised(UNet.from_preset("tiny")).eval()
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([0.05, 0.7])
    ref = run(copy.deepcopy(net).double(), x.double(), t.double())  # fp64 "math" network, on CPU
    return net.to(DEVICE), x.to(DEVICE), t.to(DEVICE), ref


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_backends_agree_with_math_in_output_and_gradients(tiny_setup, backend):
    # All backends compute softmax(q k^T / sqrt(d)) v in fp32. Principled tolerance as in
    # tests/test_attention.py: each backend's error against the fp64 "math" network must be
    # at most twice that of the fp32 "math" network, plus one fp32 ulp at the output scale
    # (both round to fp32; the floor covers a lucky exact reference).
    net, x, t, (out_ref, grad_ref) = tiny_setup
    if backend == "triton":
        pytest.importorskip("triton")
    out_math, grad_math = run(net.set_attention_backend("math"), x, t)
    out_b, grad_b = run(net.set_attention_backend(backend), x, t)
    assert net.attention_backend == backend
    assert out_b.shape == x.shape
    assert out_b.device.type == DEVICE
    out_math, grad_math, out_b, grad_b = (z.cpu() for z in (out_math, grad_math, out_b, grad_b))
    for name, got, base, ref in (("output", out_b, out_math, out_ref), ("gradient", grad_b, grad_math, grad_ref)):
        err_b = (got - ref).abs().max().item()
        err_math = (base - ref).abs().max().item()
        floor = F32_EPS * max(1.0, ref.abs().max().item())
        assert err_b <= 2 * err_math + floor, f"{backend} {name}: {err_b:.3e} vs math {err_math:.3e}"
    net.set_attention_backend("math")


def test_attention_blocks_are_live(tiny_setup):
    # Guards the test above: with attention switched off (identity v -> v) the output
    # must change, otherwise backend agreement would be vacuous.
    net, x, t, (out_ref, _) = tiny_setup
    net.set_attention_backend("math")
    blocks = [m for m in net.modules() if type(m).__name__ == "AttentionBlock"]
    assert len(blocks) == 4  # at 8 x 8: 1 in the encoder, 1 in the middle, 2 in the decoder
    original = blocks[0].attend
    blocks[0].attend = lambda q, k, v: v
    try:
        with torch.no_grad():
            changed = net(x, t).double().cpu()
    finally:
        blocks[0].attend = original
    assert (changed - out_ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("in_channels, res", [(1, 16), (3, 16), (1, 8), (3, 32)])
def test_tiny_shapes(in_channels, res):
    net = UNet.from_preset("tiny", in_channels=in_channels, img_resolution=res)
    x = torch.randn(3, in_channels, res, res)
    with torch.no_grad():
        out = net(x, torch.rand(3))
    assert out.shape == x.shape
    # Preset attention resolutions scale with img_resolution: always at the lowest level.
    blocks = [m for m in net.modules() if type(m).__name__ == "AttentionBlock"]
    assert len(blocks) == 4


def test_out_channels_and_resblock_resampling():
    net = randomised(UNet(16, 3, out_channels=2, model_channels=32, channel_mult=(1, 2, 2),
                          num_res_blocks=1, attn_resolutions=(8, 4), head_channels=32,
                          dropout=0.1, resample="resblock"))
    x = torch.randn(2, 3, 16, 16)
    out = net(x, torch.rand(2))
    assert out.shape == (2, 2, 16, 16)
    net.eval()
    with torch.no_grad():
        a, b = net(x, torch.full((2,), 0.3)), net(x, torch.full((2,), 0.3))
        c = net(x, torch.full((2,), 0.9))
    assert torch.equal(a, b)  # eval mode: dropout is off
    assert (a - c).abs().max() > 1e-4  # the time embedding reaches the output
    net.train()
    with torch.no_grad():
        assert not torch.equal(net(x, torch.full((2,), 0.3)), net(x, torch.full((2,), 0.3)))


def test_adm64_parameter_count_matches_docstring():
    with torch.device("meta"):
        net = UNet.from_preset("adm64")
    n = net.num_parameters()
    documented = re.search(r"dropout 0\.1:\s+([\d,]+) parameters", UNet.__doc__)
    assert documented is not None
    assert n == int(documented.group(1).replace(",", ""))
    with torch.device("meta"):
        assert UNet.from_preset("tiny").num_parameters() == 755_009
        assert UNet.from_preset("tiny", in_channels=3).num_parameters() == 756_163
    assert "755,009" in UNet.__doc__ and "756,163" in UNet.__doc__
    assert set(PRESETS) == {"adm64", "tiny"}


@pytest.mark.parametrize(
    "x_shape, t, match",
    [
        ((2, 3, 16, 16), torch.rand(2), r"x of shape \(B, 1, 16, 16\)"),
        ((2, 1, 8, 8), torch.rand(2), r"x of shape \(B, 1, 16, 16\)"),
        ((1, 16, 16), torch.rand(1), r"x of shape"),
        ((2, 1, 16, 16), torch.rand(2, 1), r"t of shape \(2,\)"),
        ((2, 1, 16, 16), torch.tensor(0.5), r"t of shape \(2,\)"),
        ((2, 1, 16, 16), torch.rand(3), r"t of shape \(2,\)"),
        ((2, 1, 16, 16), torch.tensor([10, 20]), r"float forward time"),
    ],
)
def test_bad_inputs_raise_before_convs(x_shape, t, match):
    net = UNet.from_preset("tiny")
    with pytest.raises(ValueError, match=match):
        net(torch.randn(*x_shape), t)


def test_bad_construction_and_backend_names():
    with pytest.raises(ValueError, match=r"choose from \('math', 'sdpa', 'triton'\)"):
        UNet.from_preset("tiny", attn_backend="flash")
    net = UNet.from_preset("tiny")
    with pytest.raises(ValueError, match="choose from"):
        net.set_attention_backend("cudnn")
    with pytest.raises(ValueError, match="unknown preset"):
        UNet.from_preset("adm256")
    with pytest.raises(ValueError, match="not among this network's resolutions"):
        UNet.from_preset("tiny", attn_resolutions=(5,))
    with pytest.raises(ValueError, match="divisible"):
        UNet.from_preset("tiny", img_resolution=15)
    with pytest.raises(ValueError, match="head_channels dividing"):
        UNet.from_preset("tiny", head_channels=48)
    with pytest.raises(ValueError, match="resample"):
        UNet.from_preset("tiny", resample="pixelshuffle")
    assert ATTENTION_BACKENDS == ("math", "sdpa", "triton")


def test_triton_backend_rejects_unsupported_head_dim():
    pytest.importorskip("triton")
    net = UNet.from_preset("tiny", head_channels=16)  # 16-dim heads: fine for math/sdpa
    with pytest.raises(ValueError, match="head_channels in"):
        net.set_attention_backend("triton")
    assert net.attention_backend == "math"


def test_mlp_is_exported():
    assert MLP.__module__ == "wgfcore.nets.mlp"


def _small_fused_net():
    # The smallest network that has every fused piece: ResBlocks with scale-shift norms,
    # attention at 4 x 4 (L = 16, head dim 32), and the output norm. The interpreter is slow:
    # groups of one channel and 16 positions keep a forward+backward to seconds.
    torch.manual_seed(0)
    net = UNet(4, 1, model_channels=32, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(4,),
               head_channels=32, resample="conv")
    return randomised(net).eval()


def test_fused_kernels_agree_with_math_in_output_and_gradients():
    # set_kernels("fused"): Triton attention, fused GroupNorm + scale-shift + SiLU, token-layout
    # qkv. Same principled tolerance as the attention backends above: at most twice the fp32
    # "math" network's error against the fp64 one, plus one fp32 ulp at the output scale.
    pytest.importorskip("triton")
    net = _small_fused_net()
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([0.1, 0.8])
    out_ref, grad_ref = run(copy.deepcopy(net).double(), x.double(), t.double())
    net = net.to(DEVICE)
    x, t = x.to(DEVICE), t.to(DEVICE)
    out_math, grad_math = run(net, x, t)
    assert net.kernels == "custom"  # a fresh net: math attention, torch norms
    out_f, grad_f = run(net.set_kernels("fused"), x, t)
    assert net.kernels == "fused" and net.attention_backend == "triton"
    for name, got, base, ref in (("output", out_f, out_math, out_ref), ("gradient", grad_f, grad_math, grad_ref)):
        got, base = got.cpu(), base.cpu()
        err_f = (got - ref).abs().max().item()
        err_math = (base - ref).abs().max().item()
        floor = F32_EPS * max(1.0, ref.abs().max().item())
        assert err_f <= 2 * err_math + floor, f"fused {name}: {err_f:.3e} vs math {err_math:.3e}"


def test_set_kernels_torch_path_is_todays_ops_and_switches_back():
    # The torch path of the GroupNorm subclass is exactly the ops the network used before
    # (group_norm, scale-shift, SiLU), bitwise; set_kernels("torch") uses SDPA attention.
    from wgfcore.nets.unet import GroupNorm

    torch.manual_seed(1)
    norm = GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x, s, sh = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 1, 1), torch.randn(2, 8, 1, 1)
    gn = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    assert torch.equal(norm(x), gn)
    assert torch.equal(norm(x, act=True), torch.nn.functional.silu(gn))
    assert torch.equal(norm(x, s, sh, act=True), torch.nn.functional.silu(gn * (1 + s) + sh))
    assert set(norm.state_dict()) == {"weight", "bias"}

    net = UNet.from_preset("tiny")
    keys = set(net.state_dict())
    net.set_kernels("torch")
    assert net.kernels == "torch" and net.attention_backend == "sdpa"
    assert set(net.state_dict()) == keys
    with pytest.raises(ValueError, match=r"choose from \('torch', 'fused'\)"):
        net.set_kernels("triton")
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        net.set_kernels("torch", channels_last="yes")
    net.set_attention_backend("math")
    assert net.kernels == "custom"


def test_set_kernels_fused_rejects_unsupported_head_dim_before_switching():
    pytest.importorskip("triton")
    net = UNet.from_preset("tiny", head_channels=16)
    with pytest.raises(ValueError, match="head_channels in"):
        net.set_kernels("fused")
    assert net.kernels == "custom" and net.attention_backend == "math"


def test_channels_last_keeps_the_function_and_the_callers_format():
    # Torch path in NHWC memory: the same function, where only the convolutions' summation
    # order may change, so the tolerance of the backend test above (2x the contiguous fp32
    # network's error against fp64, plus one ulp); parameters converted in place, and the
    # output in the input's memory format.
    torch.manual_seed(0)
    net = randomised(UNet.from_preset("tiny", in_channels=3)).eval().set_kernels("torch")
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    with torch.no_grad():
        ref = copy.deepcopy(net).double()(x.double(), t.double())
        base = net(x, t).double()
    params = [p for p in net.parameters()]
    with torch.no_grad():
        net.set_kernels("torch", channels_last=True)
        assert net.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert [p for p in net.parameters()] == params  # same Parameter objects
        out = net(x, t)
        out_cl = net(x.contiguous(memory_format=torch.channels_last), t)
    assert out.is_contiguous()
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, out_cl)
    err, err_base = (out.double() - ref).abs().max().item(), (base - ref).abs().max().item()
    assert err <= 2 * err_base + F32_EPS * max(1.0, ref.abs().max().item()), (err, err_base)
    net.set_kernels("torch")
    assert net.input_conv.weight.is_contiguous() and not net.channels_last


def test_fused_network_composes_with_torch_compile():
    # The Triton kernels are torch.library custom ops under torch.compile (opaque to dynamo),
    # so a fused network compiles as one graph (fullgraph=True fails on any graph break).
    # "aot_eager" traces forward and backward exactly as inductor would but runs them eagerly:
    # it needs no C++ compiler, and on CPU the kernels themselves run in the interpreter.
    # Output and gradients must agree with the eager fused network to the tolerance above.
    pytest.importorskip("triton")
    net = _small_fused_net().set_kernels("fused").to(DEVICE)
    x, t = torch.randn(2, 1, 4, 4, device=DEVICE), torch.tensor([0.1, 0.8], device=DEVICE)
    ref = run(copy.deepcopy(net).set_kernels("torch").cpu().double(), x.cpu().double(), t.cpu().double())
    eager = run(net, x, t)
    torch._dynamo.reset()
    compiled = run(torch.compile(net, backend="aot_eager", fullgraph=True), x, t)
    for got, base, r in zip(compiled, eager, ref):
        err, err_eager = (got.cpu() - r).abs().max().item(), (base.cpu() - r).abs().max().item()
        assert err <= 2 * err_eager + F32_EPS * max(1.0, r.abs().max().item()), (err, err_eager)
