"""The batching writer: requests hand calls over without waiting; one task writes them in batches.

submit() is synchronous and O(1): it appends to an in-memory queue and wakes the writer. The writer
takes what is queued (up to batch_max), parses captured calls (parse.materialize), prices them (the
on_batch hook) and writes them in one transaction. It prepares the next batch (parsing, driver values,
rollup sums: store.insert.PreparedBatch) while the database writes the previous one (one write in flight
on SQLite, two on PostgreSQL), so the Python work and the database's overlap. Where a record goes:
- the database, normally;
- the spool on disk when the database fails at the connection level (it is then marked down and
  retried with backoff) or stalls past write_timeout;
- the spool too when the database refuses the batch for its *data* (a constraint, a value out of
  range): the database stays up, and replay goes row by row so the offending rows are set aside in
  a rejected-*.jsonl file while the rest is committed;
- memory (bounded by queue_max) only while neither the database nor the spool can take it; past
  that, records are counted as lost, logged as errors, and health reports degraded.
A guard task bounds how long a finished record stays in memory only: a record submitted hold_max
seconds ago that is still queued, or in a batch the database has not confirmed, is spooled.
Replay is idempotent (request_id is unique), so a row both committed and spooled is written once.

One module (~680 lines) because it is one state machine: the queue, the batches prepared and in flight,
the database's health, the spool and the guard all decide from the same state (what is in memory only,
what is being written, what is healthy, what is waiting); split, each part would reach into the others'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from ..config import DatabaseConfig, default_spool_dir
from ..logs import log_access
from ..parse import Capture, CompletionRecord, materialize
from ..store.insert import BatchWriter, PreparedBatch
from ..store.rows import record_to_row
from .errors import describe, is_data_error
from .file_watch import SqliteFileWatch
from .health import Health
from .losses import LossCounter
from .protocol import WriterStats
from .replay import SpoolReplay, split_refused
from .spool import Spool
from .wal import WalCheckpoints

log = logging.getLogger(__name__)

IDLE_TICK = 1.0
HOLD_MAX = 1.0
RESCAN_INTERVAL = 30.0
ABANDONED_GRACE = 10.0
MIN_BATCH = 50

T = TypeVar("T")
OnBatch = Callable[[list[CompletionRecord]], None]


class _Pricer(Protocol):
    def apply(self, records: Sequence[CompletionRecord]) -> None: ...


def batch_hook(
    pricer: _Pricer, count: Callable[[list[CompletionRecord]], Any], access_log: bool = False
) -> OnBatch:
    """The writer's hook, once per batch before inserting: cost from the price book, then the metrics,
    then (with [logging] access_log) one access log line per call."""

    def on_batch(records: list[CompletionRecord]) -> None:
        try:
            pricer.apply(records)
        finally:
            count(records)
            if access_log:
                log_access(records)

    return on_batch


@dataclass(eq=False, slots=True)
class _Batch:
    """Rows taken from the queue that the database has not confirmed yet."""

    rows: list[dict[str, Any]]
    since: float | None  # when its oldest record was submitted
    spooled: bool = False  # the guard already put them on disk


@dataclass(eq=False, slots=True)
class _Write:
    """The write in flight: its batch, its task and when it began."""

    batch: _Batch
    task: asyncio.Future[None]
    started: float


class BatchRecorder:
    """The writer: queue, batches, spool, replay. Implements protocol.Recorder."""

    def __init__(
        self,
        engine: AsyncEngine,
        spool_dir: Path,
        *,
        queue_max: int = 100_000,
        batch_max: int = 5_000,
        write_timeout: float = 5.0,
        hold_max: float = HOLD_MAX,
        flush_interval: float = 0.0,
        on_batch: OnBatch | None = None,
    ) -> None:
        self._engine = engine
        self._writer = BatchWriter(engine.dialect.name)
        self.spool = Spool(spool_dir)
        self._queue_max = queue_max
        self._batch_max = batch_max
        self._batch = batch_max  # adapts: halved when the database times out, doubled back on success
        self._write_timeout = write_timeout
        self.hold_max = hold_max
        self._flush_interval = flush_interval
        self._on_batch = on_batch
        self._pending: deque[tuple[float, Capture | CompletionRecord]] = deque()  # (submitted at, item)
        self._overflow: list[Capture | CompletionRecord] = []
        self._unsaved: deque[dict[str, Any]] = deque()  # rows neither the database nor the spool took
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._guard_task: asyncio.Task[None] | None = None
        self._closing = False
        self._hurry = asyncio.Event()
        self._db = Health()
        self._disk = Health()
        self._backlog = True  # check for leftovers of an earlier run at start
        self._rescan_at = 0.0
        self._replay = SpoolReplay(self.spool)
        self._inflight: deque[_Batch] = deque()  # the batches being written and the one prepared behind
        self._writing: deque[_Write] = deque()  # oldest first
        # PostgreSQL runs each transaction in a backend process of its own: with two batches written at
        # once, the second uses another core while the first waits for the loop or its commit. SQLite
        # takes one writer at a time.
        self._writes_max = 1 if engine.dialect.name == "sqlite" else 2
        self._busy_since: float | None = None  # when the writer's current replay or reopen began
        self._failed_at = float("-inf")  # when a database operation last failed
        self._guard_busy = 0
        self._abandoned: set[asyncio.Future[Any]] = set()
        self.rows_written = 0
        self.rows_spooled = 0
        self.rows_replayed = 0
        self.rows_rejected = 0
        self._losses = LossCounter(self.spool.directory)
        self.last_error: str | None = None
        self._watch = SqliteFileWatch.for_engine(engine)
        self._checkpoints = WalCheckpoints(engine)  # SQLite: no commit of the writer pays for a checkpoint
        self._spool_problem: str | None = None

    @classmethod
    def from_config(cls, engine: AsyncEngine, config: DatabaseConfig, on_batch: OnBatch | None = None) -> BatchRecorder:
        return cls(
            engine,
            default_spool_dir(config),
            queue_max=config.queue_max,
            batch_max=config.batch_max,
            write_timeout=config.write_timeout,
            flush_interval=config.flush_interval,
            on_batch=on_batch,
        )

    # ---- request side -------------------------------------------------------------------------

    def submit(self, item: Capture | CompletionRecord) -> None:
        """Hand a call over; never blocks, never raises. Past queue_max it goes to the spool."""
        if len(self._pending) + len(self._unsaved) >= self._queue_max:  # memory holds queue_max at most
            self._overflow.append(item)
        else:
            self._pending.append((time.monotonic(), item))
        self._idle.clear()
        self._wakeup.set()

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + len(self._overflow) + len(self._unsaved)

    @property
    def rows_lost(self) -> int:
        return self._losses.total

    @property
    def file_problem(self) -> str | None:
        """The SQLite file or the spool directory was deleted under the writer (until restart)."""
        problems = [p for p in (self._watch and self._watch.problem, self._spool_problem) if p]
        return "; ".join(problems) if problems else None

    @property
    def degraded(self) -> bool:
        """True while records can be written nowhere (database and spool both failing), and for the
        rest of the process's life once any record was lost or a file was deleted under the writer."""
        lost = self.rows_lost > 0 or self.file_problem is not None
        return lost or (not self._disk.ok and not self._db.ok) or bool(self._unsaved)

    def stats(self) -> WriterStats:
        return WriterStats(
            rows_written=self.rows_written,
            rows_spooled=self.rows_spooled,
            rows_replayed=self.rows_replayed,
            rows_rejected=self.rows_rejected,
            rows_lost=self.rows_lost,
            queue_depth=self.queue_depth,
            database_ok=self._db.ok,
            spool_ok=self._disk.ok,
            degraded=self.degraded,
            last_error=self.last_error,
            file_problem=self.file_problem,
        )

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chatledger-recorder")
        self._guard_task = asyncio.create_task(self._guard(), name="chatledger-recorder-guard")
        self._checkpoints.start()

    async def close(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Drain to the database for up to `timeout` seconds (less if hurry() is called), then spool
        what is left and stop; what the spool refuses is counted as lost and logged."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            hurry = asyncio.ensure_future(self._hurry.wait())
            done, _ = await asyncio.wait({self._task, hurry}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
            if self._task not in done:
                log.error("recorder did not drain within its %.0fs; spooling what is left", timeout)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self._checkpoints.stop()
        if self._guard_task is not None:
            self._guard_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._guard_task
        self._replay.release()
        rows = list(self._unsaved) + self._rows([record for _, record in self._pending] + self._overflow)
        self._unsaved.clear()
        self._pending.clear()
        self._overflow = []
        if rows:
            try:
                self.rows_spooled += await asyncio.to_thread(self.spool.append, rows)
            except Exception as exc:
                self._losses.lose(len(rows), exc, log_now=True)
        self._losses.log_now(None)
        await asyncio.to_thread(self.spool.close)
        if self._abandoned:
            # timed-out writes: let them end (SQLite's busy_timeout ends them) before the engine goes
            # away; cancelling one now could leave its cleanup waiting on a closed aiosqlite thread
            _, stuck = await asyncio.wait(set(self._abandoned), timeout=ABANDONED_GRACE)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=1.0)
        self._idle.set()

    def hurry(self) -> None:
        """Stop draining to the database now: close() spools what is left (the shutdown deadline)."""
        self._hurry.set()

    async def wait_idle(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until every submitted record has been written or spooled (tests, shutdown)."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    # ---- writer task --------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._work()
        except asyncio.CancelledError:
            self._drop_inflight()
            raise

    def _drop_inflight(self) -> None:
        """Cancelled (close() ran out of time): the writes in flight stop; the rows the database has not
        confirmed wait in memory, and close() spools them (replay drops a duplicate if one committed)."""
        for writing in self._writing:
            self._abandon(writing.task, cancel=True)
        self._writing.clear()
        for batch in reversed(self._inflight):
            if not batch.spooled:
                self._unsaved.extendleft(reversed(batch.rows))
        self._inflight.clear()

    async def _work(self) -> None:
        while True:
            if self._overflow:
                await self._spool_rows(self._take_overflow())
                continue
            if self._unsaved and self._can_store():
                rows = [self._unsaved.popleft() for _ in range(min(len(self._unsaved), self._batch))]
                await self._store(rows)
                continue
            # with a write in flight, only a whole batch is taken (a writer behind its load prepares it
            # meanwhile); a partial one waits for the write to end and gathers what arrives until then
            if self._pending and self._can_store() and (not self._writing or self._batch_ready()):
                linger = self._pending[0][0] + self._flush_interval - time.monotonic()
                if linger > 0 and len(self._pending) < self._batch and not self._closing:
                    await asyncio.sleep(linger)  # let a batch gather: per-batch costs dwarf per-row ones
                    continue
                take = self._batch if self._db.usable() else len(self._pending)
                items = [self._pending.popleft() for _ in range(min(len(self._pending), take))]
                batch = _Batch(self._rows([record for _, record in items]), items[0][0])
                self._inflight.append(batch)
                prepared = await self._prepare(batch.rows)  # while the database writes the previous batch
                if len(self._writing) >= self._writes_max:
                    await self._settle()
                await self._begin(batch, prepared)
                continue
            if self._writing:  # the writes in flight end before anything else happens
                await self._settle_or_batch()
                continue
            if not self._closing and self._db.usable() and (self._backlog or self._replay.active):
                await self._replay_step()
                continue
            if not self._disk.ok and self._disk.usable():
                await self._probe_spool()
            if not self._pending and not self._overflow and not self._unsaved:
                if self._guard_busy == 0:
                    self._idle.set()
                if self._closing:
                    return
            elif self._closing and not self._can_store():
                return  # close() spools (or counts) what is left
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._sleep_time())
            if time.monotonic() >= self._rescan_at:
                self._backlog = True  # pick up segments a crashed or stopped worker left behind
            self._check_files()

    def _sleep_time(self) -> float:
        now = time.monotonic()
        waits = [IDLE_TICK]
        for health in (self._db, self._disk):
            if not health.ok:
                waits.append(health.retry_at - now)
        return max(0.01, min(waits))

    def _take_overflow(self) -> list[dict[str, Any]]:
        overflow, self._overflow = self._overflow, []
        return self._rows(overflow)

    def _rows(self, items: list[Capture | CompletionRecord]) -> list[dict[str, Any]]:
        """Rows of records (captured calls are parsed here, off the request path), after the on_batch
        hook (pricing, metrics) saw them: once per record."""
        if not items:
            return []
        records = [materialize(item) if type(item) is Capture else item for item in items]
        if self._on_batch is not None:
            try:
                self._on_batch(records)
            except Exception:
                log.exception("on_batch hook failed")
        return [record_to_row(record) for record in records]

    def _can_store(self) -> bool:
        return self._db.usable() or self._disk.usable()

    async def _timed(self, operation: Coroutine[Any, Any, T]) -> T:
        """One database operation, bounded by write_timeout.

        On timeout the writer moves on (to the spool) without waiting for the operation; if it
        commits after all, replay de-duplicates. A PostgreSQL operation is cancelled (asyncpg drops
        the connection). A SQLite one is left to finish: SQLite's busy_timeout ends it, whereas a
        cancelled aiosqlite call is closed without a rollback while its statement may still be
        alive, and such a zombie connection can keep the write lock for good.
        """
        task = asyncio.ensure_future(operation)
        self._busy_since = time.monotonic()
        try:
            done, _ = await asyncio.wait({task}, timeout=self._write_timeout)
            if task in done:
                return task.result()
            raise self._timed_out(task)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self._busy_since = None

    def _timed_out(self, task: asyncio.Future[Any]) -> TimeoutError:
        """A database operation past write_timeout: the writer moves on without it (see _timed)."""
        self._abandon(task, cancel=self._engine.dialect.name != "sqlite")
        return TimeoutError(f"database did not answer within {self._write_timeout:g}s")

    def _abandon(self, task: asyncio.Future[Any], *, cancel: bool) -> None:
        """Stop waiting for a database operation; close() gives it a grace period to end."""
        if cancel:
            task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned_done)

    def _abandoned_done(self, task: asyncio.Future[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("abandoned database operation ended with %s", describe(task.exception()))

    async def _store(self, rows: list[dict[str, Any]], since: float | None = None) -> None:
        """Write one batch and wait for the outcome (rows that waited in memory)."""
        batch = _Batch(rows, since)
        self._inflight.append(batch)  # before any await: a cancellation leaves them to close()
        while self._writing:
            await self._settle()
        await self._begin(batch, await self._prepare(rows))
        await self._settle()

    async def _prepare(self, rows: list[dict[str, Any]]) -> PreparedBatch | Exception | None:
        """The batch ready to write (None while the database is down: it will be spooled); a value the
        database cannot take is returned as the exception, the batch's outcome. Preparing is pure CPU work
        on the rows alone: it runs in a worker thread, so the event loop stays free to drive the write in
        flight (PostgreSQL's statements each wait for the loop)."""
        if not self._db.usable():
            return None
        try:
            return await asyncio.to_thread(self._writer.prepare, rows)
        except Exception as exc:
            return exc

    async def _begin(self, batch: _Batch, prepared: PreparedBatch | Exception | None) -> None:
        """Start writing a batch (_settle() waits for the outcome), or spool it."""
        if batch.spooled:  # the guard put it on disk while it waited: replay writes it
            self._inflight.remove(batch)
            return
        if not self._db.usable():
            await self._spool_rows(batch.rows)
            self._inflight.remove(batch)
            return
        if prepared is None:  # the database came back since
            prepared = await self._prepare(batch.rows)
        if isinstance(prepared, Exception):
            await self._written(batch, prepared)
            return
        if self._watch is not None and self._watch.stale:
            try:
                await self._timed(self._watch.reopen(self._engine))
            except Exception as exc:
                await self._written(batch, exc)
                return
        self._writing.append(_Write(batch, asyncio.ensure_future(self._write(prepared)), time.monotonic()))
        await asyncio.sleep(0)  # the write reaches the database before the loop prepares the next batch

    async def _settle_or_batch(self) -> None:
        """Wait for the oldest write in flight to end, unless a whole batch is queued first (then return, and
        the loop prepares it meanwhile)."""
        writing = self._writing[0]
        while not writing.task.done() and not self._batch_ready():
            remaining = writing.started + self._write_timeout - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            woken = asyncio.ensure_future(self._wakeup.wait())
            try:
                await asyncio.wait({writing.task, woken}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
        if writing.task.done() or not self._batch_ready():
            await self._settle()

    def _batch_ready(self) -> bool:
        """A whole batch is queued and can go somewhere: the loop takes it even with writes in flight."""
        return len(self._pending) >= self._batch and self._can_store()

    async def _settle(self) -> None:
        """Wait for the oldest write in flight (until write_timeout after it began) and act on its outcome.

        On timeout the writer moves on without it, as _timed() does."""
        if not self._writing:
            return
        writing = self._writing[0]
        task = writing.task
        remaining = writing.started + self._write_timeout - time.monotonic()
        done, _ = await asyncio.wait({task}, timeout=max(0.0, remaining))
        self._writing.popleft()
        error: BaseException | None
        if task in done:
            error = task.exception()
            if error is None and self._watch is not None:
                try:
                    self._watch.raise_if_replaced()  # committed to a deleted file: spool them after all
                except Exception as exc:
                    error = exc
        else:
            error = self._timed_out(task)
        await self._written(writing.batch, error, writing.started)

    async def _written(self, batch: _Batch, error: BaseException | None, started: float | None = None) -> None:
        """A batch's outcome: counted, or the database marked down (or the rows refused) and the rows
        spooled unless the guard already did. The batch stays in _inflight until then, so a cancellation
        meanwhile leaves its rows to close(). A write that began before the last failure says nothing of
        the database since: it does not mark it back up."""
        if error is None:
            self._inflight.remove(batch)
            self.rows_written += len(batch.rows)
            if started is None or started > self._failed_at:
                self._database_back()
            return
        if is_data_error(error):
            log.error(
                "database refused a batch of %d record(s) (%s); spooled for row-by-row replay",
                len(batch.rows),
                describe(error),
            )
            self._backlog = True
        else:
            self._database_failed(error)
        if not batch.spooled:
            await self._spool_rows(batch.rows)
        self._inflight.remove(batch)

    async def _write(self, batch: PreparedBatch) -> None:
        async with self._engine.connect() as conn:
            await self._writer.write(conn, batch, commit=True)

    async def _insert(self, rows: list[dict[str, Any]], *, skip_existing: bool = False) -> None:
        """One transaction (store.insert.BatchWriter); skip_existing for replayed rows."""
        async with self._engine.begin() as conn:
            await self._writer.insert(conn, rows, skip_existing=skip_existing)

    def _database_failed(self, exc: BaseException) -> None:
        self._failed_at = time.monotonic()
        if isinstance(exc, TimeoutError):  # a slow database gets smaller batches, so replay still progresses
            self._batch = max(MIN_BATCH, self._batch // 2)
        message = describe(exc)
        if self._db.ok:
            log.warning("database write failed, spooling records to %s: %s", self.spool.directory, message)
        self.last_error = message
        self._db.failed()

    def _database_back(self) -> None:
        if not self._db.ok:
            log.warning("database writable again; replaying spool")
            self._backlog = True
        self._db.back()
        self._batch = min(self._batch_max, self._batch * 2)

    # ---- spool --------------------------------------------------------------------------------

    async def _spool_rows(self, rows: list[dict[str, Any]]) -> bool:
        """Rows to disk; if the disk refuses, they wait in memory (up to queue_max) or are lost."""
        if not rows:
            return True
        if not self._disk.usable():
            self._keep_unsaved(rows, None)
            return False
        try:
            written = await asyncio.to_thread(self.spool.append, rows)
        except Exception as exc:
            self._spool_failed(exc)
            self._keep_unsaved(rows, exc)
            return False
        self.rows_spooled += written
        self._backlog = True
        self._count_vanished()
        if not self._disk.ok:
            log.warning("spool %s writable again", self.spool.directory)
        self._disk.back()
        return True

    def _check_files(self) -> None:
        """The idle tick's look at the SQLite file and the spool directory (see file_watch.py, spool.py)."""
        if self._watch is not None:
            self._watch.check()
        self.spool.check()
        self._count_vanished()

    def _count_vanished(self) -> None:
        lost = self.spool.take_vanished()
        if lost:
            self._spool_problem = f"the spool directory {self.spool.directory} was deleted with {lost} record(s)"
            self._losses.lose(lost, FileNotFoundError(self._spool_problem), log_now=True)

    async def _probe_spool(self) -> None:
        """The database took everything since the spool failed: find out whether the disk is back."""
        try:
            await asyncio.to_thread(self.spool.probe)
        except Exception as exc:
            self._spool_failed(exc)
        else:
            log.warning("spool %s writable again", self.spool.directory)
            self._disk.back()

    def _spool_failed(self, exc: BaseException) -> None:
        if self._disk.ok:
            log.error("cannot write the spool %s: %s", self.spool.directory, describe(exc))
        self._disk.failed()

    def _keep_unsaved(self, rows: list[dict[str, Any]], exc: BaseException | None) -> None:
        room = max(0, self._queue_max - len(self._unsaved) - len(self._pending))
        self._unsaved.extend(rows[:room])
        if len(rows) > room:
            self._losses.lose(len(rows) - room, exc, log_now=self._closing)

    # ---- guard: bounds the time a record lives in memory only ---------------------------------

    async def _guard(self) -> None:
        """Every hold_max/4: records submitted hold_max ago and still only in memory (queued behind a
        slow database, or in a batch the database has not answered) go to the spool."""
        tick = max(0.01, self.hold_max / 4)
        while True:
            await asyncio.sleep(tick)
            due = time.monotonic() - self.hold_max
            old = [batch for batch in self._inflight if batch.since is not None and batch.since <= due]
            inflight_due = [batch for batch in old if not batch.spooled]
            starts = [writing.started for writing in self._writing]  # and a replay step's, or a reopen's
            busy = min((*starts, self._busy_since) if self._busy_since is not None else starts, default=None)
            stalled = bool(old) or (busy is not None and busy <= due)  # a write or a replay step hangs
            # behind a stalled writer, everything queued goes now rather than a hold_max cohort at a time
            pending_due = bool(self._pending) and (stalled or self._pending[0][0] <= due)
            if not (inflight_due or pending_due or self._overflow) or not self._disk.usable():
                continue
            self._guard_busy += 1
            try:
                for batch in inflight_due:
                    if await self._spool_rows(list(batch.rows)):
                        batch.spooled = True
                rows = self._take_overflow()
                if pending_due:
                    records = [record for _, record in self._pending]
                    self._pending.clear()
                    rows += self._rows(records)
                if rows:
                    await self._spool_rows(rows)
            except Exception:
                log.exception("recorder guard failed")
            finally:
                self._guard_busy -= 1
                self._wakeup.set()

    # ---- replay -------------------------------------------------------------------------------

    async def _replay_step(self) -> None:
        """Replay one chunk of the oldest spool segment."""
        chunk = await self._replay.next_chunk(self._batch)
        if chunk is None:
            self._backlog = False
            self._rescan_at = time.monotonic() + RESCAN_INTERVAL
            return
        if chunk and not await self._replay_chunk(chunk):
            return  # keep the claim and the position; retry after the backoff
        await self._replay.advance(len(chunk))

    async def _replay_chunk(self, chunk: list[dict[str, Any]]) -> bool:
        try:
            if self._watch is not None and self._watch.stale:
                await self._timed(self._watch.reopen(self._engine))
            refused = await split_refused(chunk, lambda rows: self._timed(self._insert(rows, skip_existing=True)))
            if self._watch is not None:
                self._watch.raise_if_replaced()  # the chunk stays in the spool, replayed into the new file
        except Exception as exc:
            self._database_failed(exc)
            return False
        if refused:
            try:
                path = await asyncio.to_thread(self.spool.reject, refused)
            except Exception as exc:
                self._spool_failed(exc)
                return False
            self.rows_rejected += len(refused)
            log.error(
                "database refused %d record(s) (%s); set aside in %s (%d rejected so far)",
                len(refused),
                refused[0]["_error"],
                path,
                self.rows_rejected,
            )
        self.rows_replayed += len(chunk) - len(refused)
        self._database_back()
        return True
