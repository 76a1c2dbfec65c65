"""The only database writer: requests hand records over without waiting; one task writes them in batches.

submit() is synchronous and O(1): it appends to an in-memory queue and wakes the writer. The writer
takes what is queued (up to batch_max) and writes it in one transaction. Where a record goes:
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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import operator
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from sqlalchemy import bindparam, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from .capture import CapturedCall, materialize
from .completions import CompletionRecord
from .completions import clean_text as safe_text
from .config import DatabaseConfig, default_spool_dir
from .db import choices_table, completions_table
from .spool import Spool, row_from_spool
from .writes import BatchWriter

log = logging.getLogger(__name__)

COLUMNS = tuple(f.name for f in dataclasses.fields(CompletionRecord) if f.name != "choices")
RETRY_INITIAL = 0.5
RETRY_MAX = 10.0
IDLE_TICK = 1.0
HOLD_MAX = 1.0
RESCAN_INTERVAL = 30.0
ABANDONED_GRACE = 10.0
LOSS_LOG_INTERVAL = 10.0
MIN_BATCH = 50
DATA_SQLSTATE_CLASSES = frozenset({"22", "23"})  # data exception, integrity constraint violation

T = TypeVar("T")

_insert_choices = insert(choices_table).values(
    completion_pk=select(completions_table.c.id)
    .where(completions_table.c.request_id == bindparam("choice_request_id"))
    .scalar_subquery(),
    index=bindparam("choice_index"),
    finish_reason=bindparam("choice_finish_reason"),
    native_finish_reason=bindparam("choice_native_finish_reason"),
    role=bindparam("choice_role"),
)


_record_values = operator.attrgetter(*COLUMNS)
_UNTRUSTED_TEXT = ("path", "user", "upstream_request_id", "error")  # may hold header bytes or OS messages


def record_to_row(record: CompletionRecord) -> dict[str, Any]:
    """A record as a plain dict: the completions columns plus a `choices` list.

    Text parsed from JSON is already clean (orjson refuses lone surrogates; parsing drops NUL); the
    few fields that can carry undecodable header bytes are cleaned here, so no row can poison a batch.
    """
    row = dict(zip(COLUMNS, _record_values(record), strict=False))  # the getter is made of COLUMNS: equal lengths
    for name in _UNTRUSTED_TEXT:
        value = row[name]
        if value is not None:
            row[name] = safe_text(value)
    if record.tags:
        row["tags"] = {safe_text(str(key)): safe_text(str(value)) for key, value in record.tags.items()}
    row["choices"] = [  # every ChoiceRecord field, spelled out: twice as fast as a getattr per name
        {
            "index": choice.index,
            "finish_reason": choice.finish_reason,
            "native_finish_reason": choice.native_finish_reason,
            "role": choice.role,
        }
        for choice in record.choices
    ]
    return row


def _choice_params(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "choice_request_id": row.get("request_id"),
            "choice_index": choice.get("index"),
            "choice_finish_reason": choice.get("finish_reason"),
            "choice_native_finish_reason": choice.get("native_finish_reason"),
            "choice_role": choice.get("role"),
        }
        for row in rows
        for choice in (row.get("choices") if isinstance(row.get("choices"), list) else ())
        if isinstance(choice, dict)
    ]


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 10:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__


def is_data_error(exc: BaseException) -> bool:
    """True when the database refused the rows themselves, not the connection: retrying the same
    rows cannot help, but the database is up."""
    for cause in _causes(exc):
        if isinstance(cause, sa_exc.IntegrityError | sa_exc.DataError | sqlite3.IntegrityError | sqlite3.DataError):
            return True  # (sqlite3's own: the batch writer runs its statements on the driver directly)
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in DATA_SQLSTATE_CLASSES:
            return True
        if isinstance(cause, UnicodeError | OverflowError | ValueError | TypeError):
            return True  # a value the driver cannot send (asyncpg's DataError is a ValueError)
        if type(cause).__module__ == "sqlite3" and "binding parameter" in str(cause):
            return True  # sqlite3: a value of an unsupported type
    return False


def describe(exc: BaseException) -> str:
    """A one-line reason without the SQL text and parameters SQLAlchemy appends."""
    cause = exc
    for cause in _causes(exc):  # noqa: B007 - the innermost cause names the real problem
        pass
    first_line = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first_line}"[:300].rstrip(": ")


@dataclasses.dataclass
class _Replay:
    """A claimed spool segment being replayed a chunk at a time (the claim is held until done)."""

    path: Path
    handle: BinaryIO
    rows: list[dict[str, Any]]
    position: int = 0


class Recorder:
    def __init__(
        self,
        engine: AsyncEngine,
        spool_dir: Path,
        *,
        queue_max: int = 100_000,
        batch_max: int = 2_000,
        write_timeout: float = 5.0,
        hold_max: float = HOLD_MAX,
        flush_interval: float = 0.0,
        on_batch: Callable[[list[CompletionRecord]], None] | None = None,
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
        self._pending: deque[tuple[float, CompletionRecord | CapturedCall]] = deque()  # (submitted at, record)
        self._overflow: list[CompletionRecord | CapturedCall] = []
        self._unsaved: deque[dict[str, Any]] = deque()  # rows neither the database nor the spool took
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._guard_task: asyncio.Task[None] | None = None
        self._closing = False
        self._db_ok = True
        self._retry_at = 0.0
        self._retry_delay = RETRY_INITIAL
        self._spool_ok = True
        self._spool_retry_at = 0.0
        self._spool_retry_delay = RETRY_INITIAL
        self._backlog = True  # check for leftovers of an earlier run at start
        self._rescan_at = 0.0
        self._replay: _Replay | None = None
        self._inflight: list[dict[str, Any]] | None = None
        self._inflight_since: float | None = None  # when its oldest record was submitted
        self._inflight_spooled = False
        self._busy_since: float | None = None  # when the writer's current database operation began
        self._guard_busy = 0
        self._abandoned: set[asyncio.Future[Any]] = set()
        self.rows_written = 0
        self.rows_spooled = 0
        self.rows_replayed = 0
        self.rows_rejected = 0
        self.rows_lost = 0
        self._unlogged_losses = 0
        self._loss_logged_at = -LOSS_LOG_INTERVAL
        self.last_error: str | None = None

    @classmethod
    def from_config(
        cls,
        engine: AsyncEngine,
        config: DatabaseConfig,
        on_batch: Callable[[list[CompletionRecord]], None] | None = None,
    ) -> Recorder:
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

    def submit(self, record: CompletionRecord | CapturedCall) -> None:
        """Hand a record over; never blocks, never raises. Past queue_max it goes to the spool."""
        if len(self._pending) + len(self._unsaved) >= self._queue_max:  # memory holds queue_max at most
            self._overflow.append(record)
        else:
            self._pending.append((time.monotonic(), record))
        self._idle.clear()
        self._wakeup.set()

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + len(self._overflow) + len(self._unsaved)

    @property
    def database_ok(self) -> bool:
        return self._db_ok

    @property
    def spool_ok(self) -> bool:
        return self._spool_ok

    @property
    def degraded(self) -> bool:
        """True while records can be written nowhere (database and spool both failing), and for the
        rest of the process's life once any record was lost."""
        return self.rows_lost > 0 or (not self._spool_ok and not self._db_ok) or bool(self._unsaved)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chatledger-recorder")
        self._guard_task = asyncio.create_task(self._guard(), name="chatledger-recorder-guard")

    async def close(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Drain everything to the database (or the spool) and stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                log.error("recorder did not drain within %.0fs; spooling what is left", timeout)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._guard_task is not None:
            self._guard_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._guard_task
        if self._abandoned:
            # timed-out writes: let them end (SQLite's busy_timeout ends them) before the engine goes
            # away; cancelling one now could leave its cleanup waiting on a closed aiosqlite thread
            _, stuck = await asyncio.wait(set(self._abandoned), timeout=ABANDONED_GRACE)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=1.0)
        self._release_replay()
        rows = list(self._unsaved) + self._rows([record for _, record in self._pending] + self._overflow)
        self._unsaved.clear()
        self._pending.clear()
        self._overflow = []
        if rows:
            try:
                self.rows_spooled += await asyncio.to_thread(self.spool.append, rows)
            except Exception as exc:
                self._lose(len(rows), exc)
        self._log_losses(None)
        await asyncio.to_thread(self.spool.close)
        self._idle.set()

    async def wait_idle(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until every submitted record has been written or spooled (tests, shutdown)."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    # ---- writer task --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self._overflow:
                await self._spool_rows(self._take_overflow())
                continue
            if self._unsaved and self._can_store():
                rows = [self._unsaved.popleft() for _ in range(min(len(self._unsaved), self._batch))]
                await self._store(rows)
                continue
            if self._pending and self._can_store():
                linger = self._pending[0][0] + self._flush_interval - time.monotonic()
                if linger > 0 and len(self._pending) < self._batch and not self._closing:
                    await asyncio.sleep(linger)  # let a batch gather: per-batch costs dwarf per-row ones
                    continue
                take = self._batch if self._db_usable() else len(self._pending)
                items = [self._pending.popleft() for _ in range(min(len(self._pending), take))]
                await self._store(self._rows([record for _, record in items]), items[0][0])
                continue
            if not self._closing and self._db_usable() and (self._backlog or self._replay is not None):
                await self._replay_step()
                continue
            if not self._spool_ok and self._spool_usable():
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

    def _sleep_time(self) -> float:
        now = time.monotonic()
        waits = [IDLE_TICK]
        if not self._db_ok:
            waits.append(self._retry_at - now)
        if not self._spool_ok:
            waits.append(self._spool_retry_at - now)
        return max(0.01, min(waits))

    def _take_overflow(self) -> list[dict[str, Any]]:
        overflow, self._overflow = self._overflow, []
        return self._rows(overflow)

    def _rows(self, items: list[CompletionRecord | CapturedCall]) -> list[dict[str, Any]]:
        """Rows of records (captured exchanges are parsed here, off the request path), after the
        on_batch hook (pricing, metrics) saw them: once per record."""
        if not items:
            return []
        records = [item if isinstance(item, CompletionRecord) else materialize(item) for item in items]
        if self._on_batch is not None:
            try:
                self._on_batch(records)
            except Exception:
                log.exception("on_batch hook failed")
        return [record_to_row(record) for record in records]

    def _db_usable(self) -> bool:
        return self._db_ok or time.monotonic() >= self._retry_at

    def _spool_usable(self) -> bool:
        return self._spool_ok or time.monotonic() >= self._spool_retry_at

    def _can_store(self) -> bool:
        return self._db_usable() or self._spool_usable()

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
            if self._engine.dialect.name != "sqlite":
                task.cancel()
            self._abandoned.add(task)
            task.add_done_callback(self._abandoned_done)
            raise TimeoutError(f"database did not answer within {self._write_timeout:g}s")
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self._busy_since = None

    def _abandoned_done(self, task: asyncio.Future[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("abandoned database operation ended with %s", describe(task.exception()))

    async def _store(self, rows: list[dict[str, Any]], since: float | None = None) -> None:
        if self._db_usable():
            self._inflight, self._inflight_spooled, self._inflight_since = rows, False, since
            try:
                await self._timed(self._insert(rows, dedupe=False))
            except Exception as exc:
                if is_data_error(exc):
                    log.error(
                        "database refused a batch of %d record(s) (%s); spooled for row-by-row replay",
                        len(rows),
                        describe(exc),
                    )
                    self._backlog = True
                else:
                    self._database_failed(exc)
            else:
                self.rows_written += len(rows)
                self._database_back()
                return
            finally:
                self._inflight = self._inflight_since = None
            if self._inflight_spooled:  # the guard already put them on disk
                return
        await self._spool_rows(rows)

    async def _insert(self, rows: list[dict[str, Any]], *, dedupe: bool) -> None:
        """One transaction. With dedupe (replay), rows whose request_id exists are skipped, and only
        the rows actually inserted get their choices, even if another writer races us."""
        if dedupe:  # the spool may hold a row twice (spooled by the guard, then again after a failure)
            rows = list({row.get("request_id"): row for row in reversed(rows)}.values())[::-1]
        async with self._engine.begin() as conn:
            if dedupe:
                columns = [{name: row.get(name) for name in COLUMNS} for row in rows]
                result = await conn.execute(
                    self._insert_ignoring_duplicates().returning(completions_table.c.request_id), columns
                )
                inserted = set(result.scalars())
                rows = [row for row in rows if row.get("request_id") in inserted]
            else:
                await self._writer.insert(conn, rows)
                return
            choices = _choice_params(rows)
            if choices:
                await conn.execute(_insert_choices, choices)

    def _insert_ignoring_duplicates(self) -> Any:
        if self._engine.dialect.name == "postgresql":
            return postgresql.insert(completions_table).on_conflict_do_nothing(index_elements=["request_id"])
        return sqlite.insert(completions_table).on_conflict_do_nothing(index_elements=["request_id"])

    def _database_failed(self, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError):  # a slow database gets smaller batches, so replay still progresses
            self._batch = max(MIN_BATCH, self._batch // 2)
        message = describe(exc)
        if self._db_ok:
            log.warning("database write failed, spooling records to %s: %s", self.spool.directory, message)
        self.last_error = message
        self._db_ok = False
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def _database_back(self) -> None:
        if not self._db_ok:
            log.warning("database writable again; replaying spool")
            self._backlog = True
        self._db_ok = True
        self._retry_delay = RETRY_INITIAL
        self._batch = min(self._batch_max, self._batch * 2)

    # ---- spool --------------------------------------------------------------------------------

    async def _spool_rows(self, rows: list[dict[str, Any]]) -> bool:
        """Rows to disk; if the disk refuses, they wait in memory (up to queue_max) or are lost."""
        if not rows:
            return True
        if not self._spool_usable():
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
        if not self._spool_ok:
            log.warning("spool %s writable again", self.spool.directory)
        self._spool_ok = True
        self._spool_retry_delay = RETRY_INITIAL
        return True

    async def _probe_spool(self) -> None:
        """The database took everything since the spool failed: find out whether the disk is back."""
        try:
            await asyncio.to_thread(self.spool.probe)
        except Exception as exc:
            self._spool_failed(exc)
        else:
            log.warning("spool %s writable again", self.spool.directory)
            self._spool_ok = True
            self._spool_retry_delay = RETRY_INITIAL

    def _spool_failed(self, exc: BaseException) -> None:
        if self._spool_ok:
            log.error("cannot write the spool %s: %s", self.spool.directory, describe(exc))
        self._spool_ok = False
        self._spool_retry_at = time.monotonic() + self._spool_retry_delay
        self._spool_retry_delay = min(self._spool_retry_delay * 2, RETRY_MAX)

    def _keep_unsaved(self, rows: list[dict[str, Any]], exc: BaseException | None) -> None:
        room = max(0, self._queue_max - len(self._unsaved) - len(self._pending))
        self._unsaved.extend(rows[:room])
        if len(rows) > room:
            self._lose(len(rows) - room, exc)

    def _lose(self, count: int, exc: BaseException | None) -> None:
        """Count records that could go nowhere; logged as an error at once, then every LOSS_LOG_INTERVAL."""
        self.rows_lost += count
        self._unlogged_losses += count
        now = time.monotonic()
        if now - self._loss_logged_at >= LOSS_LOG_INTERVAL or self._closing:
            self._log_losses(exc)
            self._loss_logged_at = now

    def _log_losses(self, exc: BaseException | None) -> None:
        if not self._unlogged_losses:
            return
        log.error(
            "could not write %d record(s) to the database or the spool %s (%s); %d lost so far",
            self._unlogged_losses,
            self.spool.directory,
            describe(exc) if exc is not None else "both unavailable, memory buffer full",
            self.rows_lost,
        )
        self._unlogged_losses = 0

    # ---- guard: bounds the time a record lives in memory only ---------------------------------

    async def _guard(self) -> None:
        """Every hold_max/4: records submitted hold_max ago and still only in memory (queued behind a
        slow database, or in a batch the database has not answered) go to the spool."""
        tick = max(0.01, self.hold_max / 4)
        while True:
            await asyncio.sleep(tick)
            due = time.monotonic() - self.hold_max
            inflight = self._inflight
            since, busy = self._inflight_since, self._busy_since
            old_batch = inflight is not None and since is not None and since <= due
            inflight_due = old_batch and not self._inflight_spooled
            stalled = old_batch or (busy is not None and busy <= due)  # a write or a replay step hangs
            # behind a stalled writer, everything queued goes now rather than a hold_max cohort at a time
            pending_due = bool(self._pending) and (stalled or self._pending[0][0] <= due)
            if not (inflight_due or pending_due or self._overflow) or not self._spool_usable():
                continue
            self._guard_busy += 1
            try:
                if (
                    inflight_due
                    and inflight is not None
                    and await self._spool_rows(list(inflight))
                    and self._inflight is inflight
                ):
                    self._inflight_spooled = True
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
        """Replay one chunk of the oldest spool segment; delete the segment once all of it is in."""
        if self._replay is None:
            self._replay = await self._claim_next()
            if self._replay is None:
                self._backlog = False
                self._rescan_at = time.monotonic() + RESCAN_INTERVAL
                return
        state = self._replay
        chunk = state.rows[state.position : state.position + self._batch]
        if chunk and not await self._replay_chunk(chunk):
            return  # keep the claim and the position; retry after the backoff
        state.position += len(chunk)
        if state.position >= len(state.rows):
            self._replay = None
            await asyncio.to_thread(Spool.release, state.path, state.handle, delete=True)
            log.info("replayed %d record(s) from %s", len(state.rows), state.path.name)

    async def _claim_next(self) -> _Replay | None:
        await asyncio.to_thread(self.spool.rotate)
        for path in await asyncio.to_thread(self.spool.segments):
            handle = await asyncio.to_thread(self.spool.claim, path)
            if handle is None:
                continue
            try:
                rows = [row_from_spool(row) for row in await asyncio.to_thread(Spool.read, handle)]
            except OSError as exc:
                log.error("cannot read spool segment %s: %s", path, exc)
                await asyncio.to_thread(Spool.release, path, handle, delete=False)
                continue
            return _Replay(path, handle, rows)
        return None

    async def _replay_chunk(self, chunk: list[dict[str, Any]]) -> bool:
        try:
            await self._timed(self._insert(chunk, dedupe=True))
        except Exception as exc:
            if not is_data_error(exc):
                self._database_failed(exc)
                return False
            refused = await self._replay_rows(chunk)
            if refused is None:
                return False
            if refused:
                try:
                    path = await asyncio.to_thread(self.spool.reject, refused)
                except Exception as reject_exc:
                    self._spool_failed(reject_exc)
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
        else:
            self.rows_replayed += len(chunk)
        self._database_back()
        return True

    async def _replay_rows(self, chunk: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Row by row: returns the rows the database refuses (with the reason), None if it went away."""
        refused: list[dict[str, Any]] = []
        for row in chunk:
            try:
                await self._timed(self._insert([row], dedupe=True))
            except Exception as exc:
                if not is_data_error(exc):
                    self._database_failed(exc)
                    return None
                refused.append({**row, "_error": describe(exc)})
        return refused

    def _release_replay(self) -> None:
        if self._replay is not None:
            Spool.release(self._replay.path, self._replay.handle, delete=False)
            self._replay = None
