"""The writer process (`python -m proxy.writer.child`): a BatchRecorder fed by its serving process.

It reads Items frames from stdin, parses each captured call as it arrives (parse.materialize) and hands
the records to its recorder (and runs the retention task, retention.py); four times a second it reports
its WriterStats and the batches' metric sums on stdout. It stops when its parent says Close or its stdin
ends, after draining to the database for the Close's drain seconds and spooling the rest. SIGUSR1 (the
parent's shutdown deadline) stops it reading at once: what it holds is spooled, and the parent spools the
calls it never read. See link.py for the parent's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

from ..logs import configure as configure_logging
from ..parse import Capture, CompletionRecord, materialize
from ..runtime import tune_garbage_collector, tune_writer_threads, usable_cpus
from .framing import Close, FrameReader, IdleReply, IdleRequest, Items, Ready, Start, StatsReport, frame
from .recorder import BatchRecorder, batch_hook
from .retention import Retention
from .ring import RingReader, in_ring
from .summary import BatchSummary, summarize

STATS_INTERVAL = 0.25
PARSE_SLICE = 0.02  # the longest the writer parses without letting its other tasks run


def writer_nice(workers: int, cpus: int) -> int:
    """The writer process's nice value. While the serving processes leave a core spare, the writer
    yields to them (10): it uses what they leave, and one that falls behind hands parsing back to its
    serving process (RecorderLink._send_outbox). With as many serving processes as cores, a saturated
    machine leaves a nice-10 writer a tenth of a core: its records wait past the recorder's hold_max and
    go through the spool, so it runs at their priority instead."""
    return 10 if workers < cpus else 0


async def _child(reader: FrameReader, writer: asyncio.StreamWriter) -> None:
    from ..store.engine import create_engine
    from ..store.pricing.pricer import Pricer

    start = await reader.next()
    if type(start) is not Start:
        return
    config = start.config
    ring = None if start.ring_fd is None else RingReader(start.ring_fd)
    with contextlib.suppress(OSError):
        os.nice(writer_nice(config.server.workers, usable_cpus()))
    configure_logging(config.logging)
    engine = create_engine(config.database.url)
    pricer = Pricer(engine, config.pricing.models, config.pricing.reload_interval)
    await pricer.start()
    summary = BatchSummary()  # the batches' metrics since the last report
    received = 0  # items taken from the parent, reported so it can tell what a crash would lose

    recorder = BatchRecorder.from_config(
        engine,
        config.database,
        batch_hook(pricer, lambda records: summarize(records, into=summary), config.logging.access_log),
    )
    await recorder.start()
    retention = Retention(engine, config.retention)
    await retention.start()
    tune_garbage_collector()
    tune_writer_threads()

    def report_stats() -> None:
        nonlocal summary
        writer.writelines(frame(StatsReport(recorder.stats(), received, summary if summary.requests else None)))
        summary = BatchSummary()

    async def report() -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            report_stats()

    async def answer_when_idle(token: int) -> None:
        with contextlib.suppress(TimeoutError):
            await recorder.wait_idle(3600)
        report_stats()
        writer.writelines(frame(IdleReply(token)))

    writer.writelines(frame(Ready()))
    reporter = asyncio.create_task(report())
    pending: set[asyncio.Task[None]] = set()
    drain = 30.0

    async def read() -> None:
        nonlocal received, drain
        while True:
            message = await reader.next()
            if message is None:
                break
            if type(message) is Close:
                drain = message.drain
                break
            if type(message) is Items:
                # parsed as they arrive, a frame (a few ms of traffic) at a time: the raw copies are
                # freed at once, and reading never waits behind a whole batch being parsed. Parsing
                # yields every PARSE_SLICE: the recorder's writes, its guard (which spools) and the
                # stats reports that health reads must not wait behind a frame of large responses.
                sliced = time.perf_counter()
                for item in message.items:
                    recorder.submit(_record(item, ring))
                    received += 1
                    if time.perf_counter() - sliced > PARSE_SLICE:
                        await asyncio.sleep(0)
                        sliced = time.perf_counter()
                await asyncio.sleep(0)  # frames queued here must not keep the recorder's writes waiting
            elif type(message) is IdleRequest:
                task = asyncio.create_task(answer_when_idle(message.token))
                pending.add(task)
                task.add_done_callback(pending.discard)

    reading = asyncio.create_task(read())
    stopped = False

    def stop_now() -> None:
        nonlocal stopped
        stopped = True
        reading.cancel()
        recorder.hurry()

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop_now)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    finally:
        reporter.cancel()
        await retention.stop()
        await recorder.close(timeout=0.0 if stopped else drain)
        await pricer.stop()
        await engine.dispose()
        with contextlib.suppress(Exception):
            report_stats()
            await writer.drain()


def _record(item: Capture | CompletionRecord, ring: RingReader | None) -> CompletionRecord:
    if type(item) is not Capture:
        return item
    if in_ring(item):
        assert ring is not None
        item = item._replace(chunks=ring.take(item.chunks))
    return materialize(item)


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
