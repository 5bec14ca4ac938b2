"""DDP on CPU: `torchrun --nproc_per_node=2 train/run.py ...` with gloo on 127.0.0.1 trains a few steps,
splits evaluation sampling across the ranks, and only rank 0 writes."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from train.engine import distributed as D
from train.data.order import batch_indices

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_shards_partition_the_global_batch():
    n, gb = 100, 12
    ranks = [D.Dist(rank=r, world=3) for r in range(3)]
    for step in (0, 1, 7, 8, 9):  # 8 steps per epoch: 7 -> 8 crosses into a new permutation
        parts = [batch_indices(step, n, gb, seed=1, d=d) for d in ranks]
        assert all(len(p) == 4 for p in parts)
        allidx = torch.cat(parts)
        assert len(set(allidx.tolist())) == gb  # disjoint shards
        single = batch_indices(step, n, gb, seed=1, d=D.Dist())
        assert torch.equal(allidx, single)  # K ranks see exactly the single-process batch
    epoch0 = torch.cat([batch_indices(s, n, gb, 1, D.Dist()) for s in range(8)])
    assert len(set(epoch0.tolist())) == 96  # an epoch visits distinct images (last partial batch dropped)
    assert [D.shard(10, D.Dist(r, 3)) for r in range(3)] == [range(0, 3), range(3, 6), range(6, 10)]


def test_torchrun_two_gloo_processes(tmp_path):
    cfg = tmp_path / "ddp.json"
    cfg.write_text(json.dumps({"batch_size": 8, "log_every": 1, "ckpt_every": 3, "warmup": 2,
                               "net": {"model_channels": 16, "head_channels": 32},
                               "eval": {"rows": ["em", "pp"], "steps": [2], "samples": 6, "batch": 2, "grid": 4,
                                        "classifier_epochs": 1}}))
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           str(ROOT / "train" / "run.py"), "--quick", "--config", str(cfg), "--iterations", "3", "--device", "cpu",
           "--runs-dir", str(tmp_path / "runs"), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = [p for p in (tmp_path / "runs").iterdir() if p.name != ".cache"]
    assert len(runs) == 1  # both ranks agreed on one (rank 0's) run folder
    run = runs[0]
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 3 and state["world_size"] == 2
    assert len(state["rng"]) == 2  # both ranks' noise generators, for an exact resume
    g0, g1 = (s["generators"]["loss_noise"] for s in state["rng"])
    assert not torch.equal(g0, g1)  # ranks draw different noise
    # one writer: each step logged once (two writers would duplicate rows or clobber the header)
    with open(run / "losses.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [1, 2, 3]
    # evaluation: 6 samples in batches of 2, dealt to 2 ranks, gathered into one statistic
    with open(run / "results.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["sampler"] != "data"]
    assert {row["row"] for row in rows} == {"em", "pp", "pp_minus_em"}
    assert all(int(row["n_samples"]) == 6 for row in rows)
    val = {row["row"]: float(row["value"]) for row in rows}
    # the paired value is recomputed from the gathered features (not the streamed sums): equal to rounding
    assert abs(val["pp_minus_em"] - (val["pp"] - val["em"])) < 1e-4 * max(1.0, abs(val["pp"]))
    assert r.stdout.count("| Predict-Project |") == 1  # only rank 0 prints the table


def test_nproc_per_node_launches_the_same_run(tmp_path):
    """`train/run.py --nproc-per-node 2` starts the processes as torchrun does (the same elastic launcher)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    cfg = tmp_path / "ddp.json"
    cfg.write_text(json.dumps({"batch_size": 8, "log_every": 1, "ckpt_every": 2, "warmup": 2,
                               "net": {"model_channels": 16, "head_channels": 32}}))
    r = subprocess.run([sys.executable, str(ROOT / "train" / "run.py"), "--nproc-per-node=2", "--quick", "--config",
                        str(cfg), "--iterations", "2", "--device", "cpu", "--out", str(tmp_path / "r"), "--no-eval",
                        "--no-progress"], capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2 and state["world_size"] == 2 and len(state["rng"]) == 2
