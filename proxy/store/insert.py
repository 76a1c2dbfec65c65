"""The one insert path: a batch of rows into `completions` and `completion_choices`, and their sums into the
rollup tables (rollups.py, rollup_write.py), in one transaction.

SQLAlchemy's per-row parameter processing costs more than the database does for these small rows, so
a batch goes to the driver as plain tuples: SQLite gets multi-row INSERTs in one trip to its thread,
PostgreSQL a binary COPY for the completions and one INSERT from unnest() for the choices (asyncpg).
Values are converted as the column types bind them (types.driver_converter), so the ORM reads these
rows back unchanged. Choices find their completion by its unique request_id.

Replayed rows (`skip_existing`) may already be in the database (a write that timed out and committed
after all): their request_ids are looked up first, and only the rows not found are inserted.
"""

from __future__ import annotations

import operator
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import Any

from sqlalchemy import Integer, select
from sqlalchemy.ext.asyncio import AsyncConnection

from . import rollup_write
from .models import choices_table, completions_table
from .rollups import fold_tags, fold_values
from .rows import CHOICE_COLUMNS, COLUMNS, driver_converters

_column_values = operator.itemgetter(*COLUMNS)
LOOKUP_CHUNK = 500  # request ids per existence query: under every driver's parameter limit


def _placeholders(dialect: str, count: int, start: int = 1) -> list[str]:
    return ["?"] * count if dialect == "sqlite" else [f"${n}" for n in range(start, start + count)]


def _quoted(name: str) -> str:
    return f'"{name}"'


def insert_sql(dialect: str) -> tuple[str, str]:
    """(completions INSERT, choices INSERT) for a dialect's paramstyle."""
    marks = _placeholders(dialect, len(COLUMNS))
    completions = (
        f"INSERT INTO {completions_table.name} ({', '.join(map(_quoted, COLUMNS))}) VALUES ({', '.join(marks)})"
    )
    first, *rest = _placeholders(dialect, 1 + len(CHOICE_COLUMNS))
    choices = (
        f"INSERT INTO {choices_table.name} (completion_pk, {', '.join(map(_quoted, CHOICE_COLUMNS))}) "
        f"VALUES ((SELECT id FROM {completions_table.name} WHERE request_id = {first}), {', '.join(rest)})"
    )
    return completions, choices


def choices_unnest_sql() -> str:
    """PostgreSQL: all of a batch's choices in one INSERT ... SELECT FROM unnest(arrays)."""
    arrays = ["$1::varchar[]"] + [
        f"${n}::{'integer' if isinstance(choices_table.c[name].type, Integer) else 'text'}[]"
        for n, name in enumerate(CHOICE_COLUMNS, start=2)
    ]
    names = [f"x{n}" for n in range(len(CHOICE_COLUMNS))]
    return (
        f"INSERT INTO {choices_table.name} (completion_pk, {', '.join(map(_quoted, CHOICE_COLUMNS))}) "
        f"SELECT c.id, {', '.join(f'x.{name}' for name in names)} FROM unnest({', '.join(arrays)}) "
        f"AS x(rid, {', '.join(names)}) JOIN {completions_table.name} c ON c.request_id = x.rid"
    )


# rows per SQLite INSERT: 200 x 33 columns stays under the 32766 variables of SQLite >= 3.32 (999 before)
CHUNK_ROWS = (200, 50, 10, 1) if sqlite3.sqlite_version_info >= (3, 32) else (25, 5, 1)


@lru_cache(maxsize=64)
def _multi_row(statement: str, rows: int) -> str:
    """`INSERT ... VALUES (row)` repeated for `rows` rows (cached: batch sizes repeat under load)."""
    head, _, row = statement.partition(" VALUES ")
    return f"{head} VALUES {', '.join([row] * rows)}"


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A batch ready for the database: everything computed before the transaction (driver values, the
    rollups' sums, the statements), so a writer can prepare one batch while the previous one is written."""

    rows: Sequence[dict[str, Any]]
    copy_records: list[tuple[Any, ...]]  # PostgreSQL: the completions, for COPY (SQLite: in statements)
    statements: list[tuple[str, Any]]  # run in order, after the COPY


class BatchWriter:
    """Inserts rows (dicts of column values plus a `choices` list) in the caller's transaction."""

    def __init__(self, dialect: str) -> None:
        self._columnar = dialect == "postgresql"
        self._completions_sql, self._choices_sql = insert_sql(dialect)
        if self._columnar:  # COPY for completions (binary, the fastest path asyncpg has), unnest for choices
            self._choices_sql = choices_unnest_sql()
        self._convert = driver_converters(dialect)

    def params(self, rows: Sequence[dict[str, Any]]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Row-major parameter tuples for both tables."""
        convert = self._convert
        completions: list[tuple[Any, ...]] = []
        choices: list[tuple[Any, ...]] = []
        for row in rows:
            try:
                values = list(_column_values(row))  # one C call, not a .get() per column
            except KeyError:  # a row without every column (an older spool line): the rest are NULL
                values = [row.get(name) for name in COLUMNS]
            try:
                for index, converter in convert:
                    value = values[index]
                    if value is not None:
                        values[index] = converter(value)
            except (AttributeError, TypeError, ValueError, ArithmeticError) as exc:  # a bad spooled value
                raise ValueError(f"column {COLUMNS[index]}: {type(exc).__name__}: {exc}") from exc
            completions.append(tuple(values))
            row_choices = row.get("choices")
            if isinstance(row_choices, list):
                request_id = row.get("request_id")
                for choice in row_choices:
                    if isinstance(choice, dict):
                        choices.append((request_id, *map(choice.get, CHOICE_COLUMNS)))
        return completions, choices

    def prepare(self, rows: Sequence[dict[str, Any]]) -> PreparedBatch:
        """The batch's driver values, rollup sums and statements (CPU only: no database). Raises
        ValueError for a value the column cannot take."""
        completions, choices = self.params(rows)
        folded = (*fold_values(completions, COLUMNS), *fold_tags(rows))
        if self._columnar:
            statements: list[tuple[str, Any]] = []
            if choices:
                statements.append((self._choices_sql, tuple(map(list, zip(*choices, strict=True)))))
            statements.extend(rollup_write.postgres_plan(folded))
            return PreparedBatch(rows, completions, statements)
        statements = [
            (_multi_row(statement, size), params)
            for statement, table_rows in ((self._completions_sql, completions), (self._choices_sql, choices))
            for size, params in _chunks(table_rows)
        ]
        statements.extend(rollup_write.sqlite_plan(folded))
        return PreparedBatch(rows, [], statements)

    async def write(self, conn: AsyncConnection, batch: PreparedBatch, *, commit: bool = False) -> None:
        """Run a prepared batch in the caller's transaction; `commit` ends it here (on SQLite in the same trip
        to aiosqlite's thread as the statements, so the write needs nothing from a busy event loop)."""
        if self._columnar:
            if batch.copy_records:
                # SQLAlchemy's asyncpg adapter opens its transaction on the first statement it runs; a
                # COPY sent straight to the driver would otherwise commit on its own, apart from the choices
                await conn.exec_driver_sql("SELECT 1")
                raw = await conn.get_raw_connection()
                await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
                    completions_table.name, records=batch.copy_records, columns=COLUMNS
                )
            for sql, arrays in batch.statements:
                await conn.exec_driver_sql(sql, arrays)
            if commit:
                await conn.commit()
            return
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        run_in_thread = getattr(driver, "_execute", None)
        sqlite_connection = getattr(driver, "_conn", None)
        if run_in_thread is not None and isinstance(sqlite_connection, sqlite3.Connection):
            # one trip to aiosqlite's thread for the whole batch: with the event loop busy, each trip
            # waits for the loop, and a batch of many statements took seconds
            await run_in_thread(_execute_plan, sqlite_connection, batch.statements, commit)
        else:  # another aiosqlite: the same statements, one trip each
            for sql, params in batch.statements:
                await conn.exec_driver_sql(sql, params)
            if commit:
                await conn.commit()

    async def insert(
        self, conn: AsyncConnection, rows: Sequence[dict[str, Any]], *, skip_existing: bool = False
    ) -> Sequence[dict[str, Any]]:
        """Insert the rows; returns those inserted (with skip_existing, the ones not already there)."""
        if skip_existing:
            rows = await _new_rows(conn, rows)
        await self.write(conn, self.prepare(rows))
        return rows


async def _new_rows(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose request_id is neither in the database nor earlier in `rows` (the spool may hold a
    row twice: spooled by the guard, then again after a failure)."""
    unique = list({row.get("request_id"): row for row in reversed(rows)}.values())[::-1]
    ids = [row.get("request_id") for row in unique]
    existing: set[Any] = set()
    request_id = completions_table.c.request_id
    for start in range(0, len(ids), LOOKUP_CHUNK):
        chunk = ids[start : start + LOOKUP_CHUNK]
        existing.update((await conn.execute(select(request_id).where(request_id.in_(chunk)))).scalars())
    return [row for row in unique if row.get("request_id") not in existing]


def _chunks(rows: list[tuple[Any, ...]]) -> list[tuple[int, tuple[Any, ...]]]:
    """Rows cut into multi-row INSERTs of CHUNK_ROWS sizes, each with its flat parameter tuple.

    Multi-row VALUES, not executemany, which releases and retakes the GIL for every row (each retake
    waits out the switch interval while the event loop is busy). Sizes come from a fixed set so SQLite's
    statement cache holds a handful of compiled statements, not one large statement per batch size.
    """
    out = []
    start = 0
    while start < len(rows):
        size = next(size for size in CHUNK_ROWS if size <= len(rows) - start)
        out.append((size, tuple(chain.from_iterable(rows[start : start + size]))))
        start += size
    return out


def _execute_plan(connection: sqlite3.Connection, plan: list[tuple[str, tuple[Any, ...]]], commit: bool) -> None:
    """Run in aiosqlite's thread, in the transaction sqlite3 begins at the first INSERT; commit ends it."""
    for sql, params in plan:
        connection.execute(sql, params)
    if commit:
        connection.commit()
