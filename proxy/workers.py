"""`--workers N`: N serving processes, each with its own listening sockets (SO_REUSEPORT) bound by the
parent, supervised: a worker that dies is logged and started again on the same sockets, with a doubling
backoff while it keeps dying young. Connections the kernel queues on a dead worker's sockets wait in
their backlog for the replacement instead of being refused."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from types import FrameType

from .config import Config

log = logging.getLogger("chatledger")

RESTART_INITIAL = 0.5
RESTART_MAX = 30.0
HEALTHY_AFTER = 60.0  # a worker that ran this long before dying is restarted at once, backoff reset
CLEAN_EXITS = (0, -signal.SIGTERM, -signal.SIGINT)

WorkerMain = Callable[[Config, Sequence[socket.socket]], None]


class _Slot:
    """One worker position: its sockets, its current process, and its restart backoff."""

    def __init__(self, number: int, sockets: Sequence[socket.socket]) -> None:
        self.number = number
        self.sockets = sockets
        self.process: BaseProcess | None = None
        self.started_at = 0.0
        self.delay = RESTART_INITIAL
        self.restart_at: float | None = None
        self.exitcode: int | None = None


def supervise(config: Config, socket_sets: Sequence[Sequence[socket.socket]], target: WorkerMain) -> int:
    """Run one worker per socket set until SIGTERM/SIGINT; 0 when every worker stopped cleanly."""
    context = multiprocessing.get_context("spawn")
    slots = [_Slot(n, sockets) for n, sockets in enumerate(socket_sets)]
    stopping = False

    def start(slot: _Slot) -> None:
        process = context.Process(
            target=target, args=(config, list(slot.sockets)), name=f"chatledger-worker-{slot.number}"
        )
        process.start()
        slot.process, slot.started_at, slot.restart_at = process, time.monotonic(), None

    def forward_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for slot in slots:
            process = slot.process
            if process is not None and process.is_alive() and process.pid is not None:
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward_signal)
    signal.signal(signal.SIGINT, forward_signal)
    for slot in slots:
        start(slot)
    code = 0
    while True:
        running = [slot for slot in slots if slot.process is not None]
        if not running and (stopping or all(slot.restart_at is None for slot in slots)):
            break
        now = time.monotonic()
        timeout = min((slot.restart_at - now for slot in slots if slot.restart_at is not None), default=1.0)
        sentinels = {slot.process.sentinel: slot for slot in running if slot.process is not None}
        ready = multiprocessing.connection.wait(list(sentinels), timeout=max(0.0, min(timeout, 1.0)))
        for sentinel in ready:
            slot = sentinels[sentinel]  # type: ignore[index]
            assert slot.process is not None
            slot.process.join()
            exitcode = slot.process.exitcode
            slot.process = None
            if exitcode not in CLEAN_EXITS:
                code = 1
            if stopping:
                continue
            ran = time.monotonic() - slot.started_at
            if ran >= HEALTHY_AFTER:
                slot.delay = RESTART_INITIAL
            log.error(
                "worker %d exited with %s after %.0fs; starting a new one in %.1fs",
                slot.number,
                _describe(exitcode),
                ran,
                slot.delay,
            )
            slot.restart_at = time.monotonic() + slot.delay
            slot.delay = min(slot.delay * 2, RESTART_MAX)
        if stopping:
            for slot in slots:
                slot.restart_at = None
            continue
        now = time.monotonic()
        for slot in slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                start(slot)
                log.warning("worker %d restarted (pid %s)", slot.number, slot.process and slot.process.pid)
    return code


def _describe(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"code {exitcode}"
