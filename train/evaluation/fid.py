"""FID with pytorch-fid's Inception (pool3, 2048 features), built offline, plus streaming statistics.

ALGORITHMS §7. The network is pytorch-fid's `InceptionV3` with the weights file
`pt_inception-2015-12-05-6726825d.pth` read from the torch hub cache or a given path; nothing is
downloaded. Statistics are accumulated as float64 sums (sum x, sum x x^T), so they can be summed
across DDP ranks and never hold all 50K x 2048 features; the distance is pytorch-fid's own
`calculate_frechet_distance`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wgfcore.metrics import frechet_distance  # pytorch-fid's calculate_frechet_distance

from ..engine.checkpoint import write_atomic
from ..engine.errors import InceptionWeightsMissing, one_line

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
DIMS = 2048


def default_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def weights_instructions(given=None, problem: str = "does not exist") -> str:
    from pytorch_fid.inception import FID_WEIGHTS_URL

    where = f"the Inception weights file {given} {problem}" if given else \
        f"the FID Inception weights are not in the torch hub cache ({default_weights_path()})"
    return (f"{where}. FID needs pytorch-fid's Inception weights, which this program never downloads: fetch "
            f"{FID_WEIGHTS_URL} on a machine with internet access, then copy the file to {default_weights_path()} "
            f"(the torch hub cache; TORCH_HOME moves it) or pass --inception-weights /path/to/{INCEPTION_FILE}")


def find_weights(path=None) -> Path:
    """The weights file: `path` if given, else the torch hub cache; InceptionWeightsMissing otherwise."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsMissing(weights_instructions(path))
        return p
    p = default_weights_path()
    if not p.is_file():
        raise InceptionWeightsMissing(weights_instructions())
    return p


def _random_state_dict(seed: int = 0) -> dict:
    """State dict of pytorch-fid's FID Inception with random weights (for tests without the file).

    Mirrors the module layout of `pytorch_fid.inception.fid_inception_v3`; a mismatch would make
    pytorch-fid's own strict `load_state_dict` fail in `build_inception`.
    """
    from pytorch_fid import inception as pfi

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = pfi.FIDInceptionE_1(1280)
        net.Mixed_7c = pfi.FIDInceptionE_2(2048)
        # He initialisation keeps activations O(1) through the 20-odd layers (PyTorch's default
        # init, which torchvision skips here, would shrink them to ~1e-8 and make tests vacuous).
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.state_dict()


def build_inception(weights=None, *, random_weights: bool = False, device="cpu"):
    """pytorch-fid's `InceptionV3([pool3])`, built by pytorch-fid itself with its URL loader pointed at
    a local state dict: the weights file (`weights` or the hub cache) or, for tests, random weights."""
    from pytorch_fid import inception as pfi

    path = None
    if random_weights:
        state = _random_state_dict()
    else:
        path = find_weights(weights)
        if path.stat().st_size == 0:
            raise InceptionWeightsMissing(weights_instructions(path, "is an empty file"))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InceptionWeightsMissing(weights_instructions(path, f"cannot be read ({one_line(e)[:200]})")) \
                from None

    def local_loader(url, *args, **kwargs):
        return state

    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = local_loader
    try:
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[DIMS]])
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:  # a state dict of another network
        raise InceptionWeightsMissing(weights_instructions(
            path, f"is not pytorch-fid's Inception weights ({one_line(e)[:160]})")) from None
    finally:
        pfi.load_state_dict_from_url = original
    return model.eval().requires_grad_(False).to(device)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8, rounded as an 8-bit PNG would store them."""
    return ((x.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


class InceptionFeatures:
    """Images in [-1, 1] (B, 1|3, H, W) -> pool3 features (B, 2048) float64, quantised to 8 bits first
    (as if saved to PNG), then resized to 299 by pytorch-fid's bilinear interpolation."""

    name = "FID"
    dims = DIMS

    def __init__(self, model, device="cpu", batch: int = 200):
        self.model, self.device, self.batch = model, torch.device(device), batch

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, x.shape[0], self.batch):
            xb = to_uint8(x[i:i + self.batch]).to(self.device).float().div_(255.0)
            if xb.shape[1] == 1:
                xb = xb.expand(-1, 3, -1, -1)
            out.append(self.model(xb)[0].flatten(1).double().cpu())
        return torch.cat(out)


class Stats:
    """Streaming mean / covariance of feature vectors (float64 sums; np.cov's unbiased estimate)."""

    def __init__(self, dims: int):
        self.n = torch.zeros((), dtype=torch.float64)
        self.s1 = torch.zeros(dims, dtype=torch.float64)
        self.s2 = torch.zeros(dims, dims, dtype=torch.float64)

    def add(self, f: torch.Tensor) -> "Stats":
        f = f.double().cpu()
        self.n += f.shape[0]
        self.s1 += f.sum(0)
        self.s2 += f.T @ f
        return self

    def packed(self) -> torch.Tensor:
        return torch.cat([self.n.view(1), self.s1, self.s2.flatten()])

    @classmethod
    def unpack(cls, v: torch.Tensor, dims: int) -> "Stats":
        s = cls(dims)
        s.n, s.s1, s.s2 = v[0].clone(), v[1:1 + dims].clone(), v[1 + dims:].view(dims, dims).clone()
        return s

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        n = float(self.n)
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {n:g}")
        mu = self.s1 / n
        sigma = (self.s2 - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), sigma.numpy()


def save_stats(path, mu, sigma, **meta) -> None:
    """pytorch-fid's .npz layout (mu, sigma), written atomically."""
    write_atomic(path, lambda f: np.savez(f, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()}),
                 "FID statistics")


def load_stats(path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} is not a pytorch-fid statistics file (needs arrays mu and sigma)")
        return f["mu"][:], f["sigma"][:]


__all__ = ["INCEPTION_FILE", "InceptionWeightsMissing", "default_weights_path", "weights_instructions",
           "find_weights", "build_inception", "InceptionFeatures", "Stats", "frechet_distance", "to_uint8",
           "save_stats", "load_stats"]
