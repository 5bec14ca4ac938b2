"""Shared benchmark helpers: device skips, the session's copy bandwidth, and achieved-rate records.

Every row stores its figures in `benchmark.extra_info` (time per call, GB/s, % of the measured
device-to-device copy bandwidth, TFLOP/s or images/s where they apply) so that a saved
`--benchmark-json` file holds them; `bench/summarize.py` turns that file into a table.
Helpers are fixtures (`copy_bandwidth`, `record_rates`), not imports: `conftest` is not a module
name that bench files can import reliably next to tests/conftest.py.
"""
from __future__ import annotations

import time

import pytest
import torch

import kernels  # first: decides TRITON_INTERPRET before any @triton.jit is defined

ON_GPU = torch.cuda.is_available() and not kernels.INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"



def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu"


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _copy_bandwidth() -> float:
    """Best-of-N device-to-device `copy_` bandwidth in GB/s, counting read + write (2 x bytes)."""
    nbytes = (1 << 30) if ON_GPU else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(10 if ON_GPU else 5):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t0
        best = min(best, dt)
    del src, dst
    return 2 * nbytes / best / 1e9


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """The session's device-to-device copy bandwidth (GB/s), measured once: the 100% line."""
    return _copy_bandwidth()


@pytest.fixture
def record_rates():
    """`record_rates(benchmark, calls=..., nbytes=..., flops=..., copy_bw=..., items=...)`: see `record`."""
    return record


def record(benchmark, *, calls: int = 1, nbytes: int | None = None, flops: float | None = None,
           copy_bw: float | None = None, items: int | None = None, item_name: str = "images", **info):
    """Store achieved rates in benchmark.extra_info.

    Each timed round made `calls` calls; nbytes is the minimum traffic of one call (inputs read
    once, outputs written once), flops its floating-point work, items what one call produces.
    Rates use the median round, so one slow round (clock ramp, other tenants) does not skew them.
    """
    ex = benchmark.extra_info
    ex["device"] = device_name()
    ex["calls_per_round"] = calls
    ex.update(info)
    if nbytes is not None:
        ex["bytes_per_call"] = int(nbytes)
    if copy_bw is not None:
        ex["copy_bw_gb_s"] = round(copy_bw, 2)
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    t = benchmark.stats.stats.median / calls
    ex["time_per_call_s"] = t
    if nbytes is not None:
        ex["gb_s"] = nbytes / t / 1e9
        if copy_bw:
            ex["pct_copy_bw"] = 100.0 * ex["gb_s"] / copy_bw
    if flops is not None:
        ex["tflop_s"] = flops / t / 1e12
    if items is not None:
        ex[f"{item_name}_per_s"] = items / t
