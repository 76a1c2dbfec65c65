"""Retention: deleting the rows of calls before a day, in short batches, and recording how far the ledger
was pruned (ledger_meta 'pruned_before'), so reads that need rows can say what is gone.

Only `completions` and `completion_choices` lose rows; the rollup tables keep every day's totals, and
the rollup rebuild never rebuilds a day before 'pruned_before'. Each batch is its own short write
transaction, so a writer sharing the ledger (SQLite has one write lock) waits at most one batch.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .engine import passive_checkpoint
from .models import LedgerMeta, choices_table, completions_table
from .rows import started_hour

c = completions_table.c
meta = LedgerMeta.__table__
PRUNED_BEFORE = "pruned_before"
BATCH_ROWS = 2000  # the most rows one batch deletes; batches shrink below it to stay under BATCH_SECONDS
BATCH_SECONDS = 0.05  # a concurrent insert waits for at most one batch (plus SQLite's busy-wait step)
MIN_BATCH_ROWS = 50
VACUUM_STEP_PAGES = 512  # 2 MiB of 4 KiB pages per incremental_vacuum: one short write lock each


@dataclass(slots=True)
class PruneReport:
    """What a prune deleted (or, dry run, would delete); `space_returned` is bytes given back to the file
    system (SQLite with auto_vacuum incremental; None elsewhere, where the freed space is reused)."""

    cut: datetime
    rows: int = 0
    choices: int = 0
    batches: int = 0
    longest_batch_ms: float = 0.0
    seconds: float = 0.0
    dry_run: bool = False
    space_returned: int | None = None
    batch_ms: list[float] = field(default_factory=list, repr=False)

    def add_batch(self, seconds: float) -> None:
        self.batch_ms.append(seconds * 1000)
        self.longest_batch_ms = max(self.longest_batch_ms, seconds * 1000)

    @property
    def p99_batch_ms(self) -> float:
        ordered = sorted(self.batch_ms)
        return ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)] if ordered else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["batch_ms"]
        data["cut"] = self.cut.isoformat()
        data["p99_batch_ms"] = self.p99_batch_ms
        return data


def day_floor(moment: datetime) -> datetime:
    """The UTC midnight at or before `moment` (naive times are UTC)."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


async def read_meta(conn: AsyncConnection, key: str) -> str | None:
    return (await conn.execute(select(meta.c.value).where(meta.c.key == key))).scalar_one_or_none()


async def pruned_before(conn: AsyncConnection) -> datetime | None:
    """The day before which rows were pruned, or None if the ledger was never pruned."""
    value = await read_meta(conn, PRUNED_BEFORE)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)  # naive is UTC


def reaches_pruned(horizon: datetime | None, since: datetime | None) -> bool:
    """Whether a selection starting at `since` (None: the beginning) reaches into pruned days."""
    return horizon is not None and (since is None or since < horizon)


def pruned_note(horizon: datetime) -> str:
    return f"rows before {horizon.date().isoformat()} were pruned; stats still cover them"


async def record_pruned_before(engine: AsyncEngine, cut: datetime) -> datetime:
    """Set 'pruned_before' to `cut` unless it is already later; returns the value now in effect. Written
    before any row goes, so a reader never sees rows missing without the note."""
    async with engine.begin() as conn:
        current = await pruned_before(conn)
        if current is not None and current >= cut:
            return current
        if current is None:
            inserted = await conn.execute(
                insert_ignore(conn.dialect.name).values(key=PRUNED_BEFORE, value=cut.isoformat())
            )
            if inserted.rowcount:
                return cut
        # ISO strings of UTC times in one format sort as the times do: the update only moves forward
        await conn.execute(
            update(meta)
            .where(meta.c.key == PRUNED_BEFORE, meta.c.value < cut.isoformat())
            .values(value=cut.isoformat())
        )
        return max(cut, await pruned_before(conn) or cut)


def insert_ignore(dialect: str) -> Any:
    """INSERT that does nothing when the key exists (another process got there first)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(meta).on_conflict_do_nothing(index_elements=["key"])
    return insert(meta).prefix_with("OR IGNORE")


async def count_before(conn: AsyncConnection, cut_hour: int) -> tuple[int, int]:
    """(completions, choices) whose call started before the hour `cut_hour`."""
    doomed = select(c.id).where(c.started_hour < cut_hour)
    rows = (await conn.execute(select(func.count()).select_from(doomed.subquery()))).scalar_one()
    choices = (
        await conn.execute(
            select(func.count()).select_from(choices_table).where(choices_table.c.completion_pk.in_(doomed))
        )
    ).scalar_one()
    return rows, choices


async def prune(
    engine: AsyncEngine,
    before: datetime,
    *,
    dry_run: bool = False,
    batch_rows: int = BATCH_ROWS,
    batch_seconds: float = BATCH_SECONDS,
    vacuum: bool = True,
    stop: asyncio.Event | None = None,
) -> PruneReport:
    """Delete the calls that started before `before` floored to its UTC day, with their choices.

    Batches are chosen through the (started_hour, completion_id) index and each is committed on its own;
    a batch that takes longer than `batch_seconds` halves the next one (never above `batch_rows`).
    Between batches the pruner pauses as long as the batch took, so a writer waiting for SQLite's lock
    gets it before the next batch. On SQLite the freed pages then go back to the file system in small
    incremental_vacuum steps (when the file has auto_vacuum incremental). Setting `stop` ends the prune
    after the batch in progress (never in the middle of one).
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    started = time.perf_counter()
    cut = day_floor(before)
    cut_hour = started_hour(cut)
    report = PruneReport(cut=cut, dry_run=dry_run)
    sqlite = engine.dialect.name == "sqlite"
    if dry_run:
        async with engine.connect() as conn:
            report.rows, report.choices = await count_before(conn, cut_hour)
        report.seconds = time.perf_counter() - started
        return report
    await record_pruned_before(engine, cut)
    size = min(batch_rows, MIN_BATCH_ROWS)  # the first batches read cold pages: start small, grow
    low_hour: int | None = None  # keyset: hours below it hold no more rows to delete
    while stop is None or not stop.is_set():
        async with engine.connect() as conn:
            query = select(c.id, c.started_hour).where(c.started_hour < cut_hour)
            if low_hour is not None:
                query = query.where(c.started_hour >= low_hour)
            found = (await conn.execute(query.order_by(c.started_hour).limit(size))).all()
            await conn.rollback()  # end the read: SQLite cannot upgrade a read snapshot others wrote past
        if not found:
            break
        ids = [row.id for row in found]
        low_hour = found[-1].started_hour
        began = time.perf_counter()
        async with engine.begin() as conn:  # the first statement writes: SQLite's busy wait applies
            choices = await conn.execute(delete(choices_table).where(choices_table.c.completion_pk.in_(ids)))
            rows = await conn.execute(delete(completions_table).where(c.id.in_(ids)))
        took = time.perf_counter() - began
        report.rows += rows.rowcount
        report.choices += choices.rowcount
        report.batches += 1
        report.add_batch(took)
        if took > batch_seconds:
            size = max(1, min(size // 2, batch_rows))
        elif took < batch_seconds / 3:
            size = min(batch_rows, size * 2)
        if sqlite:
            await passive_checkpoint(engine)
            await asyncio.sleep(max(took, 0.005))
        else:
            await asyncio.sleep(0)
    if sqlite and vacuum:
        report.space_returned = await incremental_vacuum(engine, stop=stop, report=report)
    report.seconds = time.perf_counter() - started
    return report


async def incremental_vacuum(
    engine: AsyncEngine,
    step_pages: int = VACUUM_STEP_PAGES,
    stop: asyncio.Event | None = None,
    report: PruneReport | None = None,
) -> int | None:
    """SQLite: give free pages back to the file system, `step_pages` per write lock; returns bytes freed,
    or None when the file is not in auto_vacuum incremental mode (only VACUUM shrinks it)."""
    freed = 0
    async with engine.connect() as conn:
        mode = (await conn.exec_driver_sql("PRAGMA auto_vacuum")).scalar_one()
        page_size = (await conn.exec_driver_sql("PRAGMA page_size")).scalar_one()
        await conn.rollback()
    if mode != 2:
        return None
    while stop is None or not stop.is_set():
        async with engine.connect() as conn:
            free = (await conn.exec_driver_sql("PRAGMA freelist_count")).scalar_one()
            if not free:
                await conn.rollback()
                break
            await conn.rollback()
            began = time.perf_counter()
            # each step of this statement frees one page, and the sqlite3 module's execute() takes one
            # step: executescript runs it to the end
            raw = await conn.get_raw_connection()
            await raw.driver_connection.executescript(  # type: ignore[union-attr]
                f"PRAGMA incremental_vacuum({min(free, step_pages)})"
            )
            took = time.perf_counter() - began
            after = (await conn.exec_driver_sql("PRAGMA freelist_count")).scalar_one()
            await conn.rollback()
        if report is not None:
            report.add_batch(took)
        if after >= free:
            break
        freed += (free - after) * page_size
        await passive_checkpoint(engine)
        await asyncio.sleep(max(took, 0.005))
    return freed


def cut_for_days(days: int, now: datetime | None = None) -> datetime:
    """The cut that keeps the last `days` whole UTC days plus today."""
    return day_floor((now or datetime.now(UTC)) - timedelta(days=days))
