"""Checkpoints: exact resumption (stopped + resumed == uninterrupted) and atomic writes that survive
a crash or SIGKILL mid-write. Training uses a small stand-in conv net, not the U-Net, for speed."""
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from train.engine import checkpoint as ckpt
from train.engine.config import Config
from train.jobs import image_training as training_loop

ROOT = Path(__file__).resolve().parents[1]



class StandIn(nn.Module):
    """conv -> (+ time embedding) -> conv -> conv: enough to make the losses move."""

    def __init__(self, c=1, w=8):
        super().__init__()
        self.inp, self.mid, self.out = nn.Conv2d(c, w, 3, padding=1), nn.Conv2d(w, w, 3, padding=1), nn.Conv2d(w, c, 3, padding=1)
        self.t = nn.Linear(8, w)
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000.0), 4)), persistent=False)

    def forward(self, x, t):
        e = t.float()[:, None] * self.freqs
        h = torch.nn.functional.silu(self.inp(x) + self.t(torch.cat([e.sin(), e.cos()], 1))[:, :, None, None])
        return self.out(torch.nn.functional.silu(self.mid(h)))


def make_nets(cfg):
    return StandIn(cfg.channels), StandIn(cfg.channels)


def _cfg(**over):
    cfg = {"dataset": "digits", "resolution": 16, "channels": 1, "preset": "tiny", "batch_size": 16,
           "iterations": 8, "lr": 1e-3, "warmup": 3, "weight_decay": 0.01, "grad_clip": 1.0, "ema_decay": 0.9,
           "delta_tau": [20, 40], "proj_weight": 1.0, "bf16": True, "num_workers": 0, "log_every": 1,
           "sample_every": 0, "ckpt_every": 2, "snapshot_every": 4, "seed": 3,
           "eval": {"metric": "digits-fd", "rows": ["em"], "steps": [2], "samples": 4, "batch": 4, "grid": 4}}
    cfg.update(over)
    return Config.from_dict(cfg)


@pytest.fixture(scope="module")
def digits():
    from train.data.datasets import make_dataset

    return make_dataset("digits", None, 16)


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_resume_is_exact(tmp_path, digits):
    cfg = _cfg()
    ema_e, ema_p, full = training_loop.train(cfg, tmp_path / "a", make_nets=make_nets, dataset=digits, progress=False)
    # interrupted after step 5: the last checkpoint is step 4, so steps 5.. are redone after resuming
    _, _, first = training_loop.train(cfg, tmp_path / "b", make_nets=make_nets, dataset=digits, progress=False, stop_at=5)
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    state = ckpt.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert state["step"] == 5  # stop_at writes a checkpoint, as the end of a run does
    resume = tmp_path / "b" / "checkpoints" / "ckpt_00000004.pt"  # resume from the snapshot at step 4
    rem_e, rem_p, rest = training_loop.train(cfg, tmp_path / "b", make_nets=make_nets, dataset=digits, progress=False,
                                      resume=resume)
    assert [r["step"] for r in rest] == [5, 6, 7, 8]
    assert _strip(first[:4] + rest) == _strip(full)  # bitwise-equal losses, lr and gradient norms
    for a, b in zip(list(ema_e.state_dict().values()) + list(ema_p.state_dict().values()),
                    list(rem_e.state_dict().values()) + list(rem_p.state_dict().values())):
        assert torch.equal(a, b)
    # the loss log was truncated to the resume step: no duplicated rows
    lines = (tmp_path / "b" / "losses.csv").read_text().strip().splitlines()
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(1, 9))
    # and the losses actually moved (the equality above is not between constants)
    assert len({r["loss"] for r in full}) == len(full)


def test_checkpoint_contents_load_weights_only(tmp_path, digits):
    cfg = _cfg(iterations=2)
    training_loop.train(cfg, tmp_path, make_nets=make_nets, dataset=digits, progress=False)
    path = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    assert set(state) >= {"step", "config", "world_size", "eps", "proj", "ema_eps", "ema_proj", "optimizer", "rng"}
    assert state["step"] == 2 and state["config"] == cfg.data and state["world_size"] == 1
    rng = state["rng"][0]
    assert set(rng) >= {"torch_cpu", "numpy", "python", "generators"} and "loss_noise" in rng["generators"]
    # EMA differs from the raw weights after a step with decay 0.9
    k = next(iter(state["eps"]))
    assert not torch.equal(state["eps"][k], state["ema_eps"][k])


def test_rng_capture_restore_roundtrip():
    g = torch.Generator().manual_seed(5)
    s = ckpt.capture_rng({"g": g})
    a = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=g)
    ckpt.restore_rng(s, {"g": g})
    b = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    assert a == b


def test_crash_mid_write_keeps_last_good(tmp_path, monkeypatch):
    good = {"step": 1, "w": torch.arange(10.0)}
    ckpt.save_checkpoint(good, tmp_path, 1)
    real_save = torch.save

    def exploding_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial zip header ...")  # some bytes reach the temp file
        raise OSError("simulated crash: disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(ckpt.CheckpointError, match="previous one is kept.*simulated crash"):  # one line, exit 2
        ckpt.save_checkpoint({"step": 2, "w": torch.zeros(10)}, tmp_path, 2)
    monkeypatch.setattr(torch, "save", real_save)
    back = ckpt.load(tmp_path / "last.pt")
    assert back["step"] == 1 and torch.equal(back["w"], good["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the temp file was removed
    assert ckpt.find_resumable(tmp_path) == tmp_path / "last.pt"


def test_sigkill_mid_write_keeps_last_good(tmp_path):
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        from train.engine import checkpoint as ckpt
        ckpt.save_checkpoint({{"step": 1, "w": torch.arange(4.0)}}, {str(tmp_path)!r}, 1)
        real = torch.save
        def slow_save(obj, f, *a, **k):
            f.write(b"x" * 4096)
            f.flush()
            open({str(marker)!r}, "w").close()
            time.sleep(60)  # killed here, halfway through writing step 2
            real(obj, f, *a, **k)
        torch.save = slow_save
        ckpt.save_checkpoint({{"step": 2, "w": torch.zeros(4)}}, {str(tmp_path)!r}, 2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 90
        while not marker.exists():
            assert proc.poll() is None, "the writer exited before reaching the slow write"
            assert time.time() < deadline, "the writer never reached the slow write"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".last.pt.tmp") for p in tmp_path.iterdir())  # the half-written temp file
    back = ckpt.load(tmp_path / "last.pt")
    assert back["step"] == 1 and torch.equal(back["w"], torch.arange(4.0))
    assert ckpt.find_resumable(tmp_path) == tmp_path / "last.pt"


def test_find_resumable_skips_damaged_files(tmp_path):
    ckpt.save_checkpoint({"step": 4}, tmp_path, 4, keep_snapshot=True)
    ckpt.save_atomic({"step": 8}, tmp_path / "ckpt_00000008.pt")
    (tmp_path / "last.pt").write_bytes(b"truncated")  # e.g. a copy made by hand that was cut short
    assert ckpt.find_resumable(tmp_path) == tmp_path / "ckpt_00000008.pt"
    (tmp_path / "ckpt_00000008.pt").write_bytes(b"")
    assert ckpt.find_resumable(tmp_path) == tmp_path / "ckpt_00000004.pt"
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load(tmp_path / "last.pt")
    assert ckpt.find_resumable(tmp_path / "missing") is None
