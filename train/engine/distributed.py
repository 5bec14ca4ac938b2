"""Process-group plumbing for `torchrun --nproc_per_node=K train/run.py ...`.

NCCL on GPUs, gloo on CPU. Without torchrun's environment (RANK, WORLD_SIZE) everything here
degrades to a single process: collectives become identities, so the trainer has one code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UsageError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Only rank 0 writes files, logs and shows progress bars."""
        return self.rank == 0


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} was requested but torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def init(device: str | None = None) -> Dist:
    """Join the process group if launched by torchrun, and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(minutes=30),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def launch(nproc: int, script: str, argv: list[str]) -> int:
    """`python script argv` in `nproc` processes on this machine, as torchrun would start them (the same
    elastic launcher, in this process); returns the first failed process's exit code, else 0. Unlike
    torchrun, a user error inside the processes stays one line and exit code 2: the launcher's own
    failure report is not printed."""
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    try:
        elastic_launch(cfg, sys.executable)(script, *argv)
    except ChildFailedError as e:
        return int(e.get_first_failure()[1].exitcode) or 1
    return 0


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_object(d: Dist, obj):
    """rank 0's `obj` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy); float64 sums for statistics stay exact enough."""
    if not d.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks in rank order (sizes may differ by rank)."""
    if not d.enabled:
        return t
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(d.world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = max(sizes)
    buf = t.new_zeros((pad, *t.shape[1:]))
    buf[: t.shape[0]] = t
    out = [torch.empty_like(buf) for _ in range(d.world)]
    dist.all_gather(out, buf)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def shard(n: int, d: Dist) -> range:
    """This rank's contiguous share of n items (ranks differ by at most one item)."""
    lo = n * d.rank // d.world
    hi = n * (d.rank + 1) // d.world
    return range(lo, hi)


__all__ = ["Dist", "init", "launch", "shutdown", "barrier", "broadcast_object", "all_reduce_sum", "all_gather_cat",
           "shard"]
