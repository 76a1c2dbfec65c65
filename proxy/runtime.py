"""Process-wide settings shared by the serving process and its writer process: event loop, garbage
collector, and how many CPUs there are to use."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import math
import os
import resource
import sys
from functools import cache
from pathlib import Path

GC_YOUNG_THRESHOLD = 20_000
WRITER_SWITCH_INTERVAL = 0.0005  # seconds; CPython's default is 0.005
FILE_LIMIT_CEILING = 1024 * 1024  # the soft limit raised to, when the hard limit is unlimited
RESERVED_FILES = 128  # descriptors kept for the database, the spool, the writer's pipes, logs
log = logging.getLogger("chatledger")


def tune_garbage_collector() -> None:
    """Freeze everything loaded at start-up out of the collector's reach, and collect young objects less
    often: each request allocates many short-lived containers, and full collections over the long-lived
    heap (SQLAlchemy, aiohttp, prometheus) cost more CPU than the proxying itself. The writer holds each
    batch's records (thousands of containers) until written, so at the default thresholds it collected
    every few hundred calls."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)


def tune_writer_threads() -> None:
    """The writer process's database thread (aiosqlite) takes the GIL to bind each statement between
    SQLite's steps, while the event loop prepares the next batch in Python; at the default switch interval
    each statement could wait 5 ms for it, and the writes became the bottleneck."""
    sys.setswitchinterval(WRITER_SWITCH_INTERVAL)


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


def raise_file_limit() -> int:
    """Raise the soft limit on open files (RLIMIT_NOFILE) to the hard limit: each proxied call holds two
    sockets, and distributions' default soft limit (1,024) caps a busy proxy far below its hard limit.
    Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FILE_LIMIT_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(configured: int) -> int:
    """server.max_connections, lowered so that the client connections and their upstream connections fit
    within the file limit; at least 16."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return configured
    fits = max(16, (soft - RESERVED_FILES) // 2)
    if fits < configured:
        log.info("server.max_connections %d lowered to %d to fit the open-files limit (%d)", configured, fits, soft)
    return min(configured, fits)
