"""The serving process's end of the writer process: parsing, pricing and database writes run beside the
event loop, not on it.

By default (`[database] writer = "process"`) each serving process starts one child,
`python -m proxy.writer.child`, which owns a BatchRecorder exactly as the in-process writer does. The
serving process keeps a RecorderLink: submit() appends to an outbox that a timer sends every few
milliseconds as one frame over the child's stdin (framing.py); a long response's reads go through a
shared-memory ring instead (ring.py). The child answers on its stdout with its WriterStats and each
batch's metric sums, so /_ledger/health and /_ledger/metrics read the same figures either way.

The serving process keeps every call it sent until the child reports having read it (a few ms normally;
as long as the pipe is backed up otherwise). If the child dies, those calls go to the new child; the
records it had read and held only in memory are lost, as they would be if the whole process died: they are
counted in rows_lost and logged. On shutdown (close) the child gets the drain time to write; past it the
child is told to stop reading (SIGUSR1) and spool what it holds, and the calls it never read are spooled
here, so a backlog goes to the spool instead of being dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..config import Config, default_spool_dir
from ..parse import Capture, CompletionRecord, materialize
from ..parse.decoders import is_identity
from ..store.rows import record_to_row
from .framing import Close, IdleReply, IdleRequest, Items, Ready, Start, StatsReport, frame, read_frame, widen_pipe
from .protocol import WriterStats
from .ring import RingWriter, in_ring, make_ring_writer, via_ring
from .spool import Spool
from .summary import BatchSummary

log = logging.getLogger(__name__)

SEND_INTERVAL = 0.02  # how long a record may wait in the outbox: batching frames saves syscalls
START_TIMEOUT = 60.0
BEHIND_LOG_INTERVAL = 60.0
STOP_GRACE = 10.0  # after SIGUSR1: time for the child to spool what it holds before it is killed


class RecorderLink:
    """The Recorder interface (protocol.py), backed by the writer process."""

    def __init__(
        self,
        config: Config,
        on_summary: Callable[[BatchSummary], None],
        price: Callable[[list[CompletionRecord]], None] | None = None,
    ) -> None:
        self._config = config
        self._on_summary = on_summary
        self._price = price  # for the calls spooled here at shutdown
        self._backlog_bytes = config.database.writer_backlog_mb * 1024 * 1024
        # more than a batch, and a tenth of the records the child may hold
        queue_max = config.database.queue_max
        self._backlog_records = min(queue_max, max(config.database.batch_max, queue_max // 10))
        self.spool = Spool(default_spool_dir(config.database))  # read-only here: health lists its files
        self._outbox: list[Capture | CompletionRecord] = []
        self._send_handle: asyncio.TimerHandle | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._ring: RingWriter | None = None  # the current child's
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
        self._received = 0
        self._unread: deque[Capture | CompletionRecord] = deque()  # sent, not yet reported read
        self._lost_here = 0
        self._spooled_here = 0
        self._child_stats = WriterStats()  # as of the child's last report

    # ---- the Recorder interface -----------------------------------------------------------------

    def submit(self, item: Capture | CompletionRecord) -> None:
        """Never blocks: the record goes out with the next frame (see _send_outbox). A long response's
        reads go into the ring at once, so that they are freed now, not a frame later."""
        if self._ring is not None and type(item) is Capture:
            item = via_ring(self._ring, item)
        self._outbox.append(item)
        if self._send_handle is None:
            self._send_handle = asyncio.get_running_loop().call_later(SEND_INTERVAL, self._send_outbox)

    def stats(self) -> WriterStats:
        child = self._child_stats
        return dataclasses.replace(
            child,
            rows_lost=child.rows_lost + self._lost_here,
            rows_spooled=child.rows_spooled + self._spooled_here,
            queue_depth=child.queue_depth + self.in_flight + len(self._outbox),  # in the child, the pipe, here
            degraded=child.degraded or self._lost_here > 0,
            calls_parsed_in_server=self.calls_parsed_here,
        )

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
        queued = self._child_stats.queue_depth  # at the child's last report, 4 times a second
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
        return max(0, self._sent - self._received)

    async def start(self) -> None:
        await self._spawn()

    async def wait_idle(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Until the child has written or spooled everything submitted so far."""
        token = next(self._tokens)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[token] = waiter
        self._send_outbox()
        self._send(IdleRequest(token))
        try:
            await asyncio.wait_for(waiter, timeout)
        finally:
            self._waiters.pop(token, None)

    async def close(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Send what is left and give the child `timeout` seconds to write it; past that, it spools what
        it holds (SIGUSR1) and the calls it never read are spooled here. Whatever could go nowhere is
        counted in rows_lost and logged as an error."""
        self._closing = True
        self._send_outbox()
        process = self._process
        if process is not None:
            self._send(Close(drain=max(0.0, timeout - 1)))
            with contextlib.suppress(Exception):
                if process.stdin is not None:
                    process.stdin.close()
            if not await self._exited(process, timeout):
                log.warning(
                    "writer process still busy after %.0fs (%d call(s) unread); it spools what it holds",
                    timeout,
                    len(self._unread),
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGUSR1)
                if not await self._exited(process, STOP_GRACE):
                    held = self._child_stats.queue_depth
                    log.error("writer process did not stop within %.0fs; killing it", STOP_GRACE)
                    process.kill()
                    await process.wait()
                    self._lose(held, "the writer process was killed at shutdown holding them")
            if self._reader_task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(self._reader_task, 5)
        left = [self._off_ring(item) for item in (*self._unread, *self._outbox)]
        self._unread.clear()
        self._outbox = []
        self._close_ring()
        if left:
            await self._spool_here(left)

    async def _exited(self, process: asyncio.subprocess.Process, timeout: float) -> bool:  # noqa: ASYNC109
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), timeout)
        except TimeoutError:
            return False
        return True

    async def _spool_here(self, items: list[Capture | CompletionRecord]) -> None:
        """Calls the child never read, parsed and spooled by this process at shutdown."""

        def spool() -> int:
            records = [materialize(item) if type(item) is Capture else item for item in items]
            if self._price is not None:
                try:
                    self._price(records)
                except Exception:
                    log.exception("pricing the calls spooled at shutdown failed")
            return self.spool.append([record_to_row(record) for record in records])

        try:
            written = await asyncio.to_thread(spool)
        except Exception as exc:
            self._lose(len(items), f"could not spool them at shutdown: {exc}")
            return
        self._spooled_here += written
        log.warning("spooled %d call(s) the writer process had not read; they are replayed at the next start", written)
        self.spool.close()

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
                "proxy.writer.child",
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
        widen_pipe(self._process.stdin)
        self._ready = loop.create_future()
        self._reader_task = asyncio.create_task(self._read(self._process), name="chatledger-writer-link")
        self._send(Start(self._config, None if ring is None else ring.fd))
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
        if self._behind():
            # an encoded response is left to the child: decoding one costs far more than its size here
            raw = [
                index
                for index, item in enumerate(items)
                if type(item) is Capture and not in_ring(item) and is_identity(item.encoding)
            ]
            for index in raw:
                items[index] = materialize(items[index])
            self.calls_parsed_here += len(raw)
        if not self._send(Items(items)):
            if self._closing:
                self._outbox = items + self._outbox  # spooled here by close()
            else:
                self._lose(len(items), "the writer process is not running")
            return
        self._sent += len(items)
        self._unread.extend(items)

    def _off_ring(self, item: Capture | CompletionRecord) -> Capture | CompletionRecord:
        if type(item) is not Capture or not in_ring(item):
            return item
        assert self._ring is not None
        return item._replace(chunks=self._ring.read(item.chunks))

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
            if type(message) is StatsReport:
                self._child_stats = message.stats
                for _ in range(min(len(self._unread), message.received - self._received)):
                    self._unread.popleft()
                self._received = message.received
                if message.summary is not None:
                    self._on_summary(message.summary)
            elif type(message) is IdleReply:
                waiter = self._waiters.get(message.token)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif type(message) is Ready and self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        code = await process.wait()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError(f"the writer process exited at start (code {code})"))
            return
        if not self._closing:
            self._died(code)

    def _died(self, code: int) -> None:
        self._lose(self._child_stats.queue_depth, f"the writer process exited with code {code}")
        self._child_stats = dataclasses.replace(self._child_stats, queue_depth=0)
        self._outbox = [*self._unread, *self._outbox]  # never read by the old child: the new one gets them
        self._unread.clear()
        self._sent = self._received = 0
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
