"""The order in which training images are visited: a function of (seed, step, rank) only, so that a
run resumed at any step, or split across any number of processes, sees exactly the same batches.
"""
from __future__ import annotations

import functools

import torch

from ..engine import distributed as D
from ..engine.config import Config
from ..engine.errors import UsageError
from .datasets import DatasetError, worker_error_message


@functools.lru_cache(maxsize=2)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step: int, n: int, global_batch: int, seed: int, d: D.Dist) -> torch.Tensor:
    """Indices of this rank's share of the global batch at `step`.

    Epoch e uses randperm(n) from a generator seeded by (seed, e); a step takes the next
    `global_batch` indices (the last incomplete batch of an epoch is dropped), and rank r its r-th slice.
    """
    per_epoch = n // global_batch
    if per_epoch < 1:
        raise ValueError(f"the dataset has {n} images, fewer than one global batch of {global_batch}")
    epoch, j = divmod(step, per_epoch)
    perm = _epoch_perm(n, int(seed), epoch)
    per_rank = global_batch // d.world
    lo = j * global_batch + d.rank * per_rank
    return perm[lo:lo + per_rank]


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields `batch_indices(step)` for step = start .. stop-1 (for file datasets read by a DataLoader)."""

    def __init__(self, n, global_batch, seed, d, start, stop):
        self.args, self.start, self.stop = (n, global_batch, seed, d), start, stop

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        n, gb, seed, d = self.args
        for step in range(self.start, self.stop):
            yield batch_indices(step, n, gb, seed, d).tolist()


def check_batch(n: int, cfg: Config, world: int = 1) -> None:
    """A one-line UsageError unless a set of n items holds one global batch that splits evenly."""
    if n < cfg.batch_size:
        raise UsageError(f"the {cfg.dataset} set has {n} images, fewer than one batch of {cfg.batch_size}: "
                         "lower --batch-size")
    if cfg.batch_size % world:
        raise UsageError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")


def batches(dataset, cfg: Config, d: D.Dist, start: int, stop: int):
    """Iterator over (step, x0 on device) from `start` to `stop`."""
    n, gb, seed = len(dataset), cfg.batch_size, cfg.seed
    data = getattr(dataset, "data", None)
    if data is not None:  # in memory: index directly
        for step in range(start, stop):
            yield step, data[batch_indices(step, n, gb, seed, d)].to(d.device, non_blocking=True)
        return
    workers = cfg.num_workers
    if workers > 0 and hasattr(dataset, "release"):
        dataset.release()  # handles open in this process must not be inherited by the forked workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatchSampler(n, gb, seed, d, start, stop), num_workers=workers,
        pin_memory=d.device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None)
    it = iter(loader)
    for step in range(start, stop):
        try:
            x = next(it)
        except DatasetError as e:  # raised in a worker: keep its one-line message, not the worker traceback
            raise DatasetError(worker_error_message(str(e))) from None
        except StopIteration:
            return
        yield step, x.to(d.device, non_blocking=True)


__all__ = ["batch_indices", "StepBatchSampler", "batches", "check_batch"]
