"""The feature network behind "digits-FD": a small CNN classifier of the 16x16 digits, trained once
and cached; the Fréchet distance is taken on its 32-d penultimate features (ALGORITHMS §7).

This is not FID (no Inception, no ImageNet features); it is reported under its own name.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import load_digits_tensor
from ..engine.checkpoint import load, save_atomic

#: bump when the architecture or training recipe changes, so stale caches are not reused
VERSION = 2
#: small on purpose: the CPU budget allows ~100 samples per cell, and a covariance in d dimensions
#: needs n >> d samples to be estimated
FEATURE_DIMS = 32


class DigitsNet(nn.Module):
    """conv(16) pool conv(32) pool conv(64) -> linear 32 (the features) -> linear 10."""

    def __init__(self, in_channels: int = 1, resolution: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        self.feat = nn.Linear(64 * (resolution // 4) ** 2, FEATURE_DIMS)
        self.head = nn.Linear(FEATURE_DIMS, 10)

    def features(self, x):
        # pre-activation features: a ReLU here would leave dead units and singular covariances
        return self.feat(self.body(x))

    def forward(self, x):
        return self.head(F.relu(self.features(x)))


def _split(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_test = n // 5
    return perm[n_test:], perm[:n_test]


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translations by up to one pixel (zero padding at -1), a cheap augmentation."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
    return pad[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def train_classifier(resolution: int = 16, epochs: int = 12, seed: int = 0, progress: bool = False):
    """Train on 80% of the digits, report accuracy on the other 20%. Returns (net, test_accuracy)."""
    from tqdm.auto import tqdm

    x, y = load_digits_tensor(resolution)
    tr, te = _split(x.shape[0], seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsNet(1, resolution)
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = (len(tr) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    net.train()
    for _ in tqdm(range(epochs), desc="digits classifier", disable=not progress, leave=False):
        perm = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(net(_shift(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[te]).argmax(1) == y[te]).float().mean().item()
    return net, acc


def _cache_key(resolution: int, epochs: int, seed: int) -> str:
    spec = json.dumps({"v": VERSION, "res": resolution, "epochs": epochs, "seed": seed}, sort_keys=True)
    return hashlib.sha1(spec.encode()).hexdigest()[:10]


def get_classifier(cache_dir, resolution: int = 16, epochs: int = 12, seed: int = 0, progress: bool = False):
    """The cached classifier (trained on first use); returns (net in eval mode, test_accuracy)."""
    path = Path(cache_dir) / f"digits_classifier_{_cache_key(resolution, epochs, seed)}.pt"
    net = DigitsNet(1, resolution)
    if path.is_file():
        state = load(path)
        net.load_state_dict(state["model"])
        return net.eval(), float(state["test_accuracy"])
    net, acc = train_classifier(resolution, epochs, seed, progress)
    save_atomic({"model": net.state_dict(), "test_accuracy": acc, "version": VERSION}, path)
    return net, acc


class DigitsFeatures:
    """Images in [-1, 1] (B, 1, R, R) -> classifier features (B, 32) float64, for "digits-FD".

    Samples are clamped to [-1, 1] first, as they would be when saved as images."""

    name = "digits-FD"
    dims = FEATURE_DIMS

    def __init__(self, net: DigitsNet, device="cpu", batch: int = 1000):
        self.net, self.device, self.batch = net.to(device).eval(), torch.device(device), batch

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, x.shape[0], self.batch):
            xb = x[i:i + self.batch].to(self.device).float().clamp(-1, 1)
            out.append(self.net.features(xb).double().cpu())
        return torch.cat(out)


__all__ = ["DigitsNet", "train_classifier", "get_classifier", "DigitsFeatures", "FEATURE_DIMS"]
