"""The writer process: parsing, pricing and database writes run beside the event loop, not on it.

By default (`[database] writer = "process"`) each serving process starts one child,
`python -m proxy.writer_process`, which owns a Recorder (queue, batches, spool, replay) exactly as the
in-process writer does. The serving process keeps a RecorderLink: submit() appends to an outbox that a
timer sends every few milliseconds as one pickled frame over the child's stdin. The child answers on
its stdout with its counters and each batch's metric sums, so /_ledger/health and /metrics read the same
figures as before. Frames are a 4-byte big-endian length and a pickle; the child speaks only to its
parent, and captured exchanges carry a key fingerprint, never the key.

If the child dies, the records it held only in memory are lost, as they would be if the whole process
died: they are counted in rows_lost and logged, and a new child is started.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import logging
import math
import os
import pickle
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

from .capture import CapturedCall, Exchange, materialize
from .completions import CompletionRecord
from .config import Config, default_spool_dir
from .gc_tuning import tune_garbage_collector
from .metrics import BatchSummary, LedgerMetrics, summarize
from .ring import MIN_CALL_BYTES, RingReader, RingWriter, make_ring_writer
from .spool import Spool

log = logging.getLogger(__name__)

HEADER = struct.Struct(">I")
SEND_INTERVAL = 0.02  # how long a record may wait in the outbox: batching frames saves syscalls
STATS_INTERVAL = 0.25
START_TIMEOUT = 60.0
BEHIND_LOG_INTERVAL = 60.0
STAT_NAMES = (
    "rows_written",
    "rows_spooled",
    "rows_replayed",
    "rows_rejected",
    "rows_lost",
    "queue_depth",
    "database_ok",
    "spool_ok",
    "degraded",
    "last_error",
)


def frame(message: Any) -> list[bytes]:
    """A message as (length header, pickle), for writelines: a frame of stream captures runs to
    megabytes, and uvloop's pipes write the two without joining them (asyncio's join them)."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return [HEADER.pack(len(payload)), payload]


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at end of stream."""
    try:
        header = await reader.readexactly(HEADER.size)
        payload = await reader.readexactly(HEADER.unpack(header)[0])
    except asyncio.IncompleteReadError:
        return None
    return pickle.loads(payload)


class FrameReader(asyncio.Protocol):
    """The child's stdin: frames unpickled straight from the bytes received. asyncio's StreamReader
    copies each frame once more and wakes its reader for every pipe read of a large frame."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._frames: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        with memoryview(buffer) as view:
            while len(buffer) - start >= HEADER.size:
                (size,) = HEADER.unpack_from(view, start)
                end = start + HEADER.size + size
                if end > len(buffer):
                    break
                self._frames.append(pickle.loads(view[start + HEADER.size : end]))
                start = end
        if start:
            del buffer[:start]
            self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof_received()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> Any:
        """The next message, or None at end of stream."""
        while not self._frames:
            if self._eof:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._frames.popleft()


READS = Exchange._fields.index("chunks")  # a CapturedCall's response reads: a list, or a RingSlice


def _in_ring(item: CompletionRecord | CapturedCall) -> bool:
    """A captured call whose response reads are in the ring (a RingSlice in place of the list)."""
    return type(item) is tuple and type(item[READS]) is tuple


def _with_reads(item: CapturedCall, reads: Any) -> CapturedCall:
    return (*item[:READS], reads, *item[READS + 1 :])


PIPE_BYTES = 1024 * 1024  # Linux's default pipe-max-size


def _widen_pipe(stream: asyncio.StreamWriter | None) -> None:
    """Grow the pipe to the child from 64 KiB: a streamed call's frame is often bigger, and a wider pipe
    takes it in one write() instead of a partial write, a wait for the child and a second write."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    pipe = stream.transport.get_extra_info("pipe") if stream is not None else None
    if set_size is None or pipe is None:
        return
    with contextlib.suppress(OSError):  # the limit (/proc/sys/fs/pipe-max-size) may be lower
        fcntl.fcntl(pipe.fileno(), set_size, PIPE_BYTES)


class RecorderLink:
    """The serving process's side: the Recorder's interface, backed by the writer process."""

    def __init__(self, config: Config, metrics: LedgerMetrics) -> None:
        self._config = config
        self._metrics = metrics
        self._backlog_bytes = config.database.writer_backlog_mb * 1024 * 1024
        # more than a batch, and a tenth of the records the child may hold
        queue_max = config.database.queue_max
        self._backlog_records = min(queue_max, max(config.database.batch_max, queue_max // 10))
        self.spool = Spool(default_spool_dir(config.database))  # read-only here: health lists its files
        self._outbox: list[CompletionRecord | CapturedCall] = []
        self._send_handle: asyncio.TimerHandle | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._ring: RingWriter | None = None  # the current child's (see proxy/ring.py)
        self._reader_task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._tokens = itertools.count()
        self._closing = False
        self._was_behind = False
        self._behind_episodes = 0
        self._behind_logged_at = -BEHIND_LOG_INTERVAL
        self.calls_parsed_here = 0  # captured calls this process parsed while the child was behind
        self._sent = 0  # records sent to the current child; it reports how many it received
        self._lost_here = 0
        self._stats: dict[str, Any] = {name: 0 for name in STAT_NAMES}
        self._stats["received"] = 0
        self._stats.update(database_ok=True, spool_ok=True, degraded=False, last_error=None)

    # ---- the Recorder's interface ---------------------------------------------------------------

    def submit(self, item: CompletionRecord | CapturedCall) -> None:
        """Never blocks: the record goes out with the next frame (see _send_outbox). A long response's
        reads go into the ring at once, so that they are freed now, not a frame later."""
        if self._ring is not None and type(item) is tuple:
            item = self._via_ring(item)
        self._outbox.append(item)
        if self._send_handle is None:
            self._send_handle = asyncio.get_running_loop().call_later(SEND_INTERVAL, self._send_outbox)

    def __getattr__(self, name: str) -> Any:
        if name in STAT_NAMES:
            value = self._stats[name]
            if name == "rows_lost":
                return value + self._lost_here
            if name == "queue_depth":  # records in the child, in the pipe, and not yet sent
                return value + self.in_flight + len(self._outbox)
            if name == "degraded":
                return value or self._lost_here > 0
            return value
        raise AttributeError(name)

    def _behind(self) -> bool:
        """True from when the child falls behind until it has caught up by half: more than the configured
        backlog of frames waits for it to read, or more records wait in it for the database than a batch
        and a tenth of database.queue_max. The second happens when the machine is saturated: the child reads and
        parses at once, but at nice 10 (see writer_nice) it gets too little CPU left to write. Parsing here
        then slows the serving process, which leaves the writer the CPU it needs, instead of letting records
        pile up.
        A slow database trips it too; parsing here then costs CPU and helps nothing, but loses nothing."""
        process = self._process
        waiting = 0
        if process is not None and process.stdin is not None:
            waiting = process.stdin.transport.get_write_buffer_size()
        queued = self._stats["queue_depth"]  # at the child's last report, 4 times a second
        if self._was_behind:
            if waiting < self._backlog_bytes // 2 and queued <= self._backlog_records // 2:
                self._was_behind = False
        elif waiting > self._backlog_bytes or queued > self._backlog_records:
            self._was_behind = True
            self._behind_episodes += 1
            now = time.monotonic()
            if now - self._behind_logged_at >= BEHIND_LOG_INTERVAL:  # at most one warning a minute
                self._behind_logged_at = now
                log.warning(
                    "writer process behind (%d MiB of frames unread, %d records not yet written); the "
                    "serving process parses calls until that halves (%d such episode(s) since the last warning)",
                    waiting // (1024 * 1024),
                    queued,
                    self._behind_episodes,
                )
                self._behind_episodes = 0
        return self._was_behind

    @property
    def in_flight(self) -> int:
        """Records sent that the child had not read at its last report."""
        return max(0, self._sent - self._stats["received"])

    async def start(self) -> None:
        await self._spawn()

    async def wait_idle(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Until the child has written or spooled everything submitted so far."""
        token = next(self._tokens)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[token] = waiter
        self._send_outbox()
        self._send(("idle", token))
        try:
            await asyncio.wait_for(waiter, timeout)
        finally:
            self._waiters.pop(token, None)

    async def close(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Send what is left, let the child drain to the database (or its spool), and wait for it."""
        self._closing = True
        self._send_outbox()
        process = self._process
        if process is None:
            return
        self._send(("close",))
        with contextlib.suppress(Exception):
            if process.stdin is not None:
                process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), timeout + 5)
        except TimeoutError:
            log.error("writer process did not finish within %.0fs; killing it", timeout + 5)
            process.kill()
            await process.wait()
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader_task, 5)
        self._close_ring()

    # ---- plumbing ---------------------------------------------------------------------------------

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        if self._ring is not None:  # calls not yet sent whose reads are in the old child's ring
            self._outbox = [self._off_ring(item) for item in self._outbox]
            self._close_ring()
        ring = make_ring_writer()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy.writer_process",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=16 * 1024 * 1024,
                pass_fds=() if ring is None else (ring.fd,),
            )
        except BaseException:
            if ring is not None:
                ring.close()
            raise
        self._ring = ring
        _widen_pipe(self._process.stdin)
        self._ready = loop.create_future()
        self._reader_task = asyncio.create_task(self._read(self._process), name="chatledger-writer-link")
        self._send(("start", self._config, None if ring is None else ring.fd))
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
        except TimeoutError:
            self._process.kill()
            raise RuntimeError(f"the writer process did not start within {START_TIMEOUT:.0f}s") from None

    def _send_outbox(self) -> None:
        """Send the outbox as one frame.

        While the child is behind (see _behind: frames unread, or records not yet written), captured
        calls are parsed here before they go: the serving process then pays for parsing, as the
        in-process writer does, which slows it to a pace the writer can follow instead of letting raw
        copies or records pile up in memory. Calls whose reads are already in the ring go as they are:
        the ring is bounded, and once it is full the calls that follow carry their reads again.
        """
        if self._send_handle is not None:
            self._send_handle.cancel()
            self._send_handle = None
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        self._sent += len(items)
        if self._behind():
            raw = [index for index, item in enumerate(items) if type(item) is tuple and not _in_ring(item)]
            for index in raw:
                items[index] = materialize(items[index])
            self.calls_parsed_here += len(raw)
        if not self._send(("items", items)):  # captured calls go as plain tuples: they pickle fastest
            self._lose(len(items), "the writer process is not running")

    def _via_ring(self, item: CapturedCall) -> CapturedCall:
        """The call with its response reads put in the ring, when they are big enough and fit."""
        reads = item[READS]
        total = len(reads[0]) if len(reads) == 1 else sum(map(len, reads))
        if total < MIN_CALL_BYTES:
            return item
        assert self._ring is not None
        where = self._ring.put(reads, total)
        if where is None:
            return item
        return _with_reads(item, where)

    def _off_ring(self, item: CompletionRecord | CapturedCall) -> CompletionRecord | CapturedCall:
        if not _in_ring(item):
            return item
        assert self._ring is not None
        return _with_reads(item, self._ring.read(item[READS]))

    def _close_ring(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def _send(self, message: Any) -> bool:
        process = self._process
        if process is None or process.stdin is None or process.returncode is not None:
            return False
        try:
            process.stdin.writelines(frame(message))
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            message = await read_frame(process.stdout)
            if message is None:
                break
            kind = message[0]
            if kind == "stats":
                self._stats.update(message[1])
                if message[2] is not None:
                    self._metrics.apply(message[2])
            elif kind == "idle":
                waiter = self._waiters.get(message[1])
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif kind == "ready" and self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        code = await process.wait()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError(f"the writer process exited at start (code {code})"))
            return
        if not self._closing:
            self._died(code)

    def _died(self, code: int) -> None:
        held = self._stats["queue_depth"] + self._sent - self._stats["received"]
        self._lose(held, f"the writer process exited with code {code}")
        self._stats.update(queue_depth=0, received=0)
        self._sent = 0
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(RuntimeError("the writer process exited"))
        log.error("writer process exited with code %s; starting a new one", code)
        task = asyncio.get_running_loop().create_task(self._respawn())
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _respawn(self) -> None:
        try:
            await self._spawn()
        except Exception:
            log.exception("could not restart the writer process; records submitted now are lost")

    def _lose(self, count: int, reason: str) -> None:
        if count > 0:
            self._lost_here += count
            log.error("%d record(s) lost: %s", count, reason)


# ---- the child ------------------------------------------------------------------------------------


def writer_nice(workers: int, cpus: int) -> int:
    """The writer process's nice value. While the serving processes leave a core spare, the writer
    yields to them (10): it uses what they leave, and one that falls behind hands parsing back to its
    serving process (RecorderLink._send_outbox). With as many serving processes as cores, a saturated
    machine leaves a nice-10 writer a tenth of a core: its records wait past the recorder's hold_max and
    go through the spool (measured, 2 workers on 2 cores: over half of them), so it runs at their
    priority instead."""
    return 10 if workers < cpus else 0


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


async def _child(reader: FrameReader, writer: asyncio.StreamWriter) -> None:
    from .db import create_engine
    from .pricing import Pricer
    from .recorder import Recorder

    start = await reader.next()
    if start is None:
        return
    config: Config = start[1]
    ring = None if start[2] is None else RingReader(start[2])
    with contextlib.suppress(OSError):
        os.nice(writer_nice(config.server.workers, usable_cpus()))
    logging.basicConfig(
        level=config.logging.level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    engine = create_engine(config.database.url)
    pricer = Pricer(engine, config.pricing.models)
    await pricer.start()
    summary = BatchSummary()  # the batches' metrics since the last stats message
    received = 0  # records taken from the parent, reported so it can tell what a crash would lose

    def on_batch(records: list[CompletionRecord]) -> None:
        try:
            pricer.apply(records)
        finally:
            summarize(records, into=summary)

    recorder = Recorder.from_config(engine, config.database, on_batch)
    recorder.start()
    tune_garbage_collector()

    def stats() -> None:
        nonlocal summary
        state = {name: getattr(recorder, name) for name in STAT_NAMES}
        state["received"] = received
        writer.writelines(frame(("stats", state, summary if summary.requests else None)))
        summary = BatchSummary()

    async def report() -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            stats()

    async def answer_when_idle(token: int) -> None:
        with contextlib.suppress(TimeoutError):
            await recorder.wait_idle(3600)
        stats()
        writer.writelines(frame(("idle", token)))

    writer.writelines(frame(("ready",)))
    reporter = asyncio.create_task(report())
    pending: set[asyncio.Task[None]] = set()
    try:
        while True:
            message = await reader.next()
            if message is None or message[0] == "close":
                break
            if message[0] == "items":
                # parsed as they arrive, a frame (a few ms of traffic) at a time: the raw copies are
                # freed at once, and reading never waits behind a whole batch being parsed
                for item in message[1]:
                    if _in_ring(item):
                        assert ring is not None
                        item = _with_reads(item, ring.take(item[READS]))
                    recorder.submit(item if isinstance(item, CompletionRecord) else materialize(item))
                received += len(message[1])
                await asyncio.sleep(0)  # frames queued here must not keep the recorder's writes waiting
            elif message[0] == "idle":
                task = asyncio.create_task(answer_when_idle(message[1]))
                pending.add(task)
                task.add_done_callback(pending.discard)
    finally:
        reporter.cancel()
        await recorder.close()
        await pricer.stop()
        await engine.dispose()
        with contextlib.suppress(Exception):
            stats()
            await writer.drain()


async def _child_main() -> None:
    loop = asyncio.get_running_loop()
    reader = FrameReader()
    await loop.connect_read_pipe(lambda: reader, sys.stdin.buffer)
    channel = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # a stray print() must not corrupt the frames
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, channel)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    await _child(reader, writer)


def main() -> None:
    # the parent decides when the writer stops (it drains on close); Ctrl-C reaches the whole group
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        asyncio.run(_child_main())
    else:
        uvloop.run(_child_main())


if __name__ == "__main__":
    main()
