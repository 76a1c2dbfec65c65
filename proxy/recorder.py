"""The only database writer: requests hand records over without waiting; one task writes them in batches.

submit() is synchronous and O(1): it appends to an in-memory queue and wakes the writer. The writer
takes everything queued (up to batch_max) and writes it in one transaction: one INSERT for the
completions, one for their choices. Batches therefore size themselves by load. When the database
fails or stalls past write_timeout, the batch goes to the spool on disk instead, and the writer
replays the spool once the database answers again. Nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from .completions import ChoiceRecord, CompletionRecord
from .db import choices_table, completions_table
from .spool import Spool, row_from_spool

log = logging.getLogger(__name__)

COLUMNS = tuple(f.name for f in dataclasses.fields(CompletionRecord) if f.name != "choices")
CHOICE_COLUMNS = tuple(f.name for f in dataclasses.fields(ChoiceRecord))
RETRY_INITIAL = 0.5
RETRY_MAX = 10.0
IDLE_TICK = 1.0

_insert_completions = insert(completions_table)
_insert_choices = insert(choices_table).values(
    completion_pk=select(completions_table.c.id)
    .where(completions_table.c.request_id == bindparam("choice_request_id"))
    .scalar_subquery(),
    index=bindparam("choice_index"),
    finish_reason=bindparam("choice_finish_reason"),
    native_finish_reason=bindparam("choice_native_finish_reason"),
    role=bindparam("choice_role"),
)


def record_to_row(record: CompletionRecord) -> dict[str, Any]:
    """A record as a plain dict: the completions columns plus a `choices` list."""
    row = {name: getattr(record, name) for name in COLUMNS}
    row["choices"] = [{name: getattr(choice, name) for name in CHOICE_COLUMNS} for choice in record.choices]
    return row


def _choice_params(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "choice_request_id": row["request_id"],
            "choice_index": choice.get("index"),
            "choice_finish_reason": choice.get("finish_reason"),
            "choice_native_finish_reason": choice.get("native_finish_reason"),
            "choice_role": choice.get("role"),
        }
        for row in rows
        for choice in row.get("choices") or ()
    ]


class Recorder:
    def __init__(
        self,
        engine: AsyncEngine,
        spool_dir: Path,
        *,
        queue_max: int = 100_000,
        batch_max: int = 2_000,
        write_timeout: float = 5.0,
        on_batch: Callable[[list[CompletionRecord]], None] | None = None,
    ) -> None:
        self._engine = engine
        self.spool = Spool(spool_dir)
        self._queue_max = queue_max
        self._batch_max = batch_max
        self._write_timeout = write_timeout
        self._on_batch = on_batch
        self._pending: deque[CompletionRecord] = deque()
        self._overflow: list[CompletionRecord] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._db_ok = True
        self._retry_at = 0.0
        self._retry_delay = RETRY_INITIAL
        self._spool_backlog = True  # check for leftovers of an earlier run at start
        self.rows_written = 0
        self.rows_spooled = 0
        self.rows_replayed = 0
        self.rows_lost = 0
        self.last_error: str | None = None

    # ---- request side -------------------------------------------------------------------------

    def submit(self, record: CompletionRecord) -> None:
        """Hand a record over; never blocks, never raises. Past queue_max it goes to the spool."""
        if len(self._pending) >= self._queue_max:
            self._overflow.append(record)
        else:
            self._pending.append(record)
        self._idle.clear()
        self._wakeup.set()

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + len(self._overflow)

    @property
    def database_ok(self) -> bool:
        return self._db_ok

    @property
    def degraded(self) -> bool:
        """True when records could not be written anywhere (database and spool both failed)."""
        return self.rows_lost > 0

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chatledger-recorder")

    async def close(self, timeout: float = 30.0) -> None:
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
        leftover = list(self._pending) + self._overflow
        self._pending.clear()
        self._overflow = []
        if leftover:
            await self._spool_records(leftover)
        await asyncio.to_thread(self.spool.close)

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every submitted record has been written or spooled (tests, shutdown)."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    # ---- writer task --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self._overflow:
                overflow, self._overflow = self._overflow, []
                await self._spool_records(overflow)
            if self._pending:
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), self._batch_max))]
                await self._write(batch)
                continue
            if self._spool_backlog and self._db_usable():
                await self._replay_one()
                continue
            if not self._pending and not self._overflow:
                self._idle.set()
                if self._closing:
                    return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), IDLE_TICK)

    def _db_usable(self) -> bool:
        return self._db_ok or time.monotonic() >= self._retry_at

    async def _write(self, batch: list[CompletionRecord]) -> None:
        if self._on_batch is not None:
            try:
                self._on_batch(batch)
            except Exception:
                log.exception("metrics hook failed")
        if self._db_usable():
            rows = [record_to_row(record) for record in batch]
            try:
                await asyncio.wait_for(self._insert(rows, dedupe=False), self._write_timeout)
            except Exception as exc:  # any database failure: the spool takes the batch
                self._database_failed(exc)
            else:
                self.rows_written += len(rows)
                self._database_back()
                return
        await self._spool_records(batch)

    async def _insert(self, rows: list[dict[str, Any]], *, dedupe: bool) -> None:
        async with self._engine.begin() as conn:
            if dedupe:
                wanted = [row["request_id"] for row in rows]
                existing = set(
                    (
                        await conn.execute(
                            select(completions_table.c.request_id).where(
                                completions_table.c.request_id.in_(wanted)
                            )
                        )
                    ).scalars()
                )
                rows = [row for row in rows if row["request_id"] not in existing]
                if not rows:
                    return
            columns = [{name: row.get(name) for name in COLUMNS} for row in rows]
            if dedupe:
                await conn.execute(self._insert_ignoring_duplicates(), columns)
            else:
                await conn.execute(_insert_completions, columns)
            choices = _choice_params(rows)
            if choices:
                await conn.execute(_insert_choices, choices)

    def _insert_ignoring_duplicates(self) -> Any:
        if self._engine.dialect.name == "postgresql":
            return postgresql.insert(completions_table).on_conflict_do_nothing(index_elements=["request_id"])
        return sqlite.insert(completions_table).on_conflict_do_nothing(index_elements=["request_id"])

    def _database_failed(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}".strip()
        if self._db_ok:
            log.warning("database write failed, spooling records to %s: %s", self.spool.directory, message)
        self.last_error = message[:500]
        self._db_ok = False
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def _database_back(self) -> None:
        if not self._db_ok:
            log.warning("database writable again; replaying spool")
            self._spool_backlog = True
        self._db_ok = True
        self._retry_delay = RETRY_INITIAL

    async def _spool_records(self, records: list[CompletionRecord]) -> None:
        rows = [record_to_row(record) for record in records]
        try:
            written = await asyncio.to_thread(self.spool.append, rows)
        except Exception as exc:
            self.rows_lost += len(rows)
            log.error(
                "could not write %d record(s) to the database or the spool %s (%s); %d lost so far",
                len(rows),
                self.spool.directory,
                exc,
                self.rows_lost,
            )
            return
        self.rows_spooled += written
        self._spool_backlog = True

    async def _replay_one(self) -> None:
        """Replay the oldest spool segment; delete it only once its rows are committed."""
        await asyncio.to_thread(self.spool.rotate)
        segments = await asyncio.to_thread(self.spool.segments)
        for path in segments:
            handle = await asyncio.to_thread(self.spool.claim, path)
            if handle is None:
                continue
            committed = False
            try:
                rows = [row_from_spool(row) for row in await asyncio.to_thread(Spool.read, handle)]
                for start in range(0, len(rows), self._batch_max):
                    chunk = rows[start : start + self._batch_max]
                    await asyncio.wait_for(self._insert(chunk, dedupe=True), self._write_timeout * 4)
                committed = True
                self.rows_replayed += len(rows)
                self._database_back()
                log.info("replayed %d record(s) from %s", len(rows), path.name)
            except Exception as exc:
                self._database_failed(exc)
            finally:
                await asyncio.to_thread(Spool.release, path, handle, delete=committed)
            return
        self._spool_backlog = False


def spool_row_path(directory: Path) -> list[Path]:
    """Segment files in a spool directory (for `db status`)."""
    return sorted(directory.glob("spool-*.jsonl")) if directory.exists() else []
