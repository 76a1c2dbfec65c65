"""Process-wide settings shared by the serving process and its writer process: event loop, garbage
collector, and how many CPUs there are to use."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import math
import os
from functools import cache
from pathlib import Path

GC_YOUNG_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Freeze everything loaded at start-up out of the collector's reach, and collect young objects less
    often: each request allocates many short-lived containers, and full collections over the long-lived
    heap (SQLAlchemy, aiohttp, prometheus) cost more CPU than the proxying itself. The writer holds each
    batch's records (thousands of containers) until written, so at the default thresholds it collected
    every few hundred calls."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)


def install_uvloop() -> bool:
    """Use uvloop when it is installed (the `fast` extra); it cuts per-request overhead."""
    if os.environ.get("CHATLEDGER_NO_UVLOOP"):
        return False
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: those it may run on (a container's cpuset, not the host's count),
    capped by a CPU quota (a container's --cpus: cgroup v2 cpu.max, v1 cpu.cfs_quota_us), rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cpu_quota(cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cpu_quota(cgroup: Path) -> float | None:
    """CPUs' worth of time per period the cgroup may use; None when unlimited or not known."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return int(quota) / int(period) if int(period) > 0 else None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


@cache
def _malloc_trim() -> object | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def release_free_memory() -> bool:
    """Hand memory the allocator keeps after a burst back to the system (glibc's malloc_trim): freed
    blocks scattered through its heaps otherwise keep the process at its peak size. False where the C
    library has no such call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)  # type: ignore[operator]
    return True
