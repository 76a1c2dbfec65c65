"""Processes under test: start, wait until ready, read RSS and CPU time from /proc, stop with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.extend(int(c) for c in handle.read().split())
    except OSError:
        pass
    return found


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (chatledger --workers N runs N children)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(children(current))
    return pids


def rss_mb(pid: int) -> float:
    """Resident memory of the process tree in MiB."""
    total = 0
    for member in tree(pid):
        try:
            with open(f"/proc/{member}/statm") as handle:
                total += int(handle.read().split()[1]) * PAGE_KB
        except OSError:
            pass
    return total / 1024


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process, not its children (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process tree (live members only)."""
    return sum(process_cpu(member) for member in tree(pid))


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


@dataclass
class Service:
    name: str
    command: list[str]
    port: int
    log: Path
    health: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLEDGER_")}
        env.update(self.env)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log}")
            if self._ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready on port {self.port} after {timeout:.0f}s; see {self.log}")

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                pass
        except OSError:
            return False
        if self.health is None:
            return True
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{self.health}", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait for a clean exit (chatledger drains its writer), SIGKILL the group past timeout."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            return None


def listening_sockets(port: int) -> int:
    """Sockets listening on a local TCP port (IPv4 and IPv6): with --workers N, one per worker once all
    have bound (SO_REUSEPORT). Linux only; -1 elsewhere."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            if table.endswith("tcp"):
                return -1
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def wait_listening(port: int, count: int, timeout: float = 30.0) -> None:
    """Until `count` sockets listen on the port: connections made earlier all go to the workers that
    had bound, and keep-alive connections stay there (measured: a soak started at once loaded one of
    two workers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = listening_sockets(port)
        if found < 0 or found >= count:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{count} workers not all listening on port {port} after {timeout:.0f}s")


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
