"""The networks a config builds: the projection network T may have its own width (cfg.proj_net)."""
import pytest
import torch

from train.engine.config import build, validate
from train.engine.errors import UsageError
from train.engine.networks import build_nets


def _cfg(**over):
    cfg = build("digits", True, None, {}, None)  # the --quick config: tiny U-Nets of width 16
    assert cfg.net == {"model_channels": 16, "head_channels": 32}
    return cfg.with_changes(**over)


def _params(net):
    return sum(p.numel() for p in net.parameters())


def test_projection_width_is_its_own():
    torch.manual_seed(0)
    eps_same, proj_same = build_nets(_cfg())
    torch.manual_seed(0)
    eps_narrow, proj_narrow = build_nets(_cfg(proj_net={"model_channels": 8, "head_channels": 16}))
    assert _params(proj_same) == _params(eps_same)
    assert proj_narrow.model_channels == 8 and eps_narrow.model_channels == 16
    assert _params(proj_narrow) < _params(proj_same) / 3  # width enters the conv weights squared
    # the score net is built first, from the same generator state: identical whatever T's width
    for a, b in zip(eps_same.state_dict().values(), eps_narrow.state_dict().values()):
        assert torch.equal(a, b)
    x, t = torch.randn(2, 1, 16, 16), torch.full((2,), 0.5)
    assert proj_narrow(x, t).shape == x.shape


def test_bad_projection_override_is_one_line():
    with pytest.raises(UsageError, match="projection U-Net .*proj_net"):
        build_nets(_cfg(proj_net={"no_such_argument": 3}))
    with pytest.raises(UsageError, match="proj_net must be an object"):
        validate({"proj_net": 8}, partial=True)
