"""Batch INSERTs at driver level: the writer's hot path.

SQLAlchemy's per-row parameter processing costs more than the database does for these small rows, so
a batch goes to the driver as plain tuples: SQLite gets multi-row INSERTs in one trip to its thread,
PostgreSQL a binary COPY for the completions and one INSERT from unnest() for the choices (asyncpg). Values
are converted here exactly as the SQLAlchemy types in db.py store them, so the ORM reads these rows back
unchanged. Choices find their completion by its unique request_id. Rows/s: bench/writer_bench (README,
Performance).
"""

from __future__ import annotations

import operator
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from itertools import chain
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from .db import choices_table, completions_table

COLUMNS: tuple[str, ...] = tuple(c.name for c in completions_table.columns if c.name != "id")
_column_values = operator.itemgetter(*COLUMNS)
CHOICE_COLUMNS = ("index", "finish_reason", "native_finish_reason", "role")
_JSON_COLUMNS = frozenset({"usage", "tags"})


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


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _sqlite_time(value: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME text, `YYYY-MM-DD HH:MM:SS.ffffff` in UTC. Records carry UTC times:
    isoformat() without its "+00:00" is half the cost of dropping the zone and calling str()."""
    if value.tzinfo is UTC:
        text = value.isoformat(" ")[:-6]
        return text if value.microsecond else text + ".000000"
    if value.tzinfo is not None:
        if value.utcoffset():
            value = value.astimezone(UTC)
        value = value.replace(tzinfo=None)
    text = str(value)
    return text if value.microsecond else text + ".000000"


def _sqlite_money(value: Any) -> float:
    return float(value)


def _postgres_time(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _postgres_money(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _converters(dialect: str) -> list[Callable[[Any], Any] | None]:
    sqlite = dialect == "sqlite"
    by_name: dict[str, Callable[[Any], Any]] = {
        "started_at": _sqlite_time if sqlite else _postgres_time,
        "cost": _sqlite_money if sqlite else _postgres_money,
        "usage": _json,
        "tags": _json,
    }
    if sqlite:
        by_name["stream"] = int
    return [by_name.get(name) for name in COLUMNS]


def choices_unnest_sql() -> str:
    """PostgreSQL: all of a batch's choices in one INSERT ... SELECT FROM unnest(arrays)."""
    return (
        f"INSERT INTO {choices_table.name} (completion_pk, {', '.join(map(_quoted, CHOICE_COLUMNS))}) "
        f"SELECT c.id, x.i, x.f, x.n, x.r FROM unnest($1::varchar[], $2::integer[], $3::text[], $4::text[], "
        f"$5::text[]) AS x(rid, i, f, n, r) JOIN {completions_table.name} c ON c.request_id = x.rid"
    )


# rows per SQLite INSERT: 200 x 33 columns stays under the 32766 variables of SQLite >= 3.32 (999 before)
CHUNK_ROWS = (200, 50, 10, 1) if sqlite3.sqlite_version_info >= (3, 32) else (25, 5, 1)


@lru_cache(maxsize=64)
def _multi_row(statement: str, rows: int) -> str:
    """`INSERT ... VALUES (row)` repeated for `rows` rows (cached: batch sizes repeat under load)."""
    head, _, row = statement.partition(" VALUES ")
    return f"{head} VALUES {', '.join([row] * rows)}"


class BatchWriter:
    """Inserts rows (dicts of column values plus a `choices` list) in one transaction, two statements."""

    def __init__(self, dialect: str) -> None:
        self._columnar = dialect == "postgresql"
        self._completions_sql, self._choices_sql = insert_sql(dialect)
        if self._columnar:  # COPY for completions (binary, the fastest path asyncpg has), unnest for choices
            self._choices_sql = choices_unnest_sql()
        self._convert = [(index, convert) for index, convert in enumerate(_converters(dialect)) if convert]

    def params(self, rows: Sequence[dict[str, Any]]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Row-major parameter tuples for both tables."""
        convert = self._convert
        completions: list[tuple[Any, ...]] = []
        choices: list[tuple[Any, ...]] = []
        for row in rows:
            try:
                values = list(_column_values(row))  # one C call, not a .get() per column
            except KeyError:  # a row without every column (record_to_row's have all): the rest are NULL
                values = [row.get(name) for name in COLUMNS]
            for index, converter in convert:
                value = values[index]
                if value is not None:
                    values[index] = converter(value)
            completions.append(tuple(values))
            row_choices = row.get("choices")
            if isinstance(row_choices, list):
                request_id = row.get("request_id")
                for choice in row_choices:
                    if isinstance(choice, dict):
                        choices.append(
                            (
                                request_id,
                                choice.get("index"),
                                choice.get("finish_reason"),
                                choice.get("native_finish_reason"),
                                choice.get("role"),
                            )
                        )
        return completions, choices

    async def insert(self, conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
        completions, choices = self.params(rows)
        if self._columnar:
            if completions:
                # SQLAlchemy's asyncpg adapter opens its transaction on the first statement it runs; a
                # COPY sent straight to the driver would otherwise commit on its own, apart from the choices
                await conn.exec_driver_sql("SELECT 1")
                raw = await conn.get_raw_connection()
                await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
                    completions_table.name, records=completions, columns=COLUMNS
                )
            if choices:
                await conn.exec_driver_sql(self._choices_sql, tuple(map(list, zip(*choices, strict=True))))
            return
        plan = [
            (_multi_row(statement, size), params)
            for statement, rows in ((self._completions_sql, completions), (self._choices_sql, choices))
            for size, params in _chunks(rows)
        ]
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        run_in_thread = getattr(driver, "_execute", None)
        sqlite_connection = getattr(driver, "_conn", None)
        if run_in_thread is not None and isinstance(sqlite_connection, sqlite3.Connection):
            # one trip to aiosqlite's thread for the whole batch: with the event loop busy, each trip
            # waits for the loop, and a batch of many statements took seconds
            await run_in_thread(_execute_plan, sqlite_connection, plan)
        else:  # another aiosqlite: the same statements, one trip each
            for sql, params in plan:
                await conn.exec_driver_sql(sql, params)


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


def _execute_plan(connection: sqlite3.Connection, plan: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Run in aiosqlite's thread, inside the transaction SQLAlchemy opened (and will commit)."""
    for sql, params in plan:
        connection.execute(sql, params)
