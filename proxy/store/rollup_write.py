"""Adding folded sums (rollups.fold) to the rollup tables: driver-level upserts, in the caller's transaction.

Each group becomes `INSERT ... ON CONFLICT (key) DO UPDATE SET value = value + excluded.value`: SQLite
gets multi-row statements (run with insert.py's others in one trip to aiosqlite's thread), PostgreSQL one
statement per table from unnest() arrays. Keys go in sorted order, so writers that add to the same groups
at once lock their rows in the same order and never deadlock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from functools import lru_cache
from itertools import chain, repeat
from typing import Any

from sqlalchemy import BigInteger, Integer, Table
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import TypeEngine

from .histogram import BUCKET_COLUMNS
from .models import ROLLUP_TABLES, TAG_TABLES
from .rollups import HISTOGRAM, MEASURES, VALUES, Sums, dense

# rollups.ROLLUP_SPECS then TAG_SPECS: the order of fold()'s sums, then fold_tags()'
TABLES: tuple[Table, ...] = (*ROLLUP_TABLES, *TAG_TABLES)
# groups per SQLite statement: 100 x 77 columns stays under the 32766 variables of SQLite >= 3.32 (999 before)
CHUNK_ROWS = (100, 10, 1) if sqlite3.sqlite_version_info >= (3, 32) else (10, 1)


def _quoted(name: str) -> str:
    return f'"{name}"'


def _key_columns(table: Table) -> list[str]:
    return [column.name for column in table.primary_key.columns]


def _conflict_clause(table: Table) -> str:
    keys = ", ".join(map(_quoted, _key_columns(table)))
    updates = ", ".join(f"{_quoted(v)} = {table.name}.{_quoted(v)} + excluded.{_quoted(v)}" for v in VALUES)
    return f"ON CONFLICT ({keys}) DO UPDATE SET {updates}"


def _columns(table: Table) -> list[str]:
    return [*_key_columns(table), *VALUES]


@lru_cache(maxsize=16)
def sqlite_upsert(table_name: str, rows: int) -> str:
    """A multi-row upsert of `rows` groups into a rollup table (cached: the sizes come from CHUNK_ROWS)."""
    table = _table(table_name)
    columns = _columns(table)
    row = f"({', '.join(['?'] * len(columns))})"
    return (
        f"INSERT INTO {table.name} ({', '.join(map(_quoted, columns))}) VALUES {', '.join([row] * rows)} "
        f"{_conflict_clause(table)}"
    )


@lru_cache(maxsize=4)
def postgres_upsert(table_name: str) -> str:
    """One upsert of a whole batch's groups: one array per key and measure column, in key order, and the
    histogram sparse, as (group's position, bucket, count) arrays of its non-zero buckets (a group of a few
    rows fills a bucket or two, and sending the 56 columns whole made the parameters most of the cost)."""
    table = _table(table_name)
    head = [*_key_columns(table), *MEASURES]
    arrays = ", ".join(f"${n}::{_array_type(table.c[name].type)}[]" for n, name in enumerate(head, start=1))
    names = [f"g.{_quoted(name)}" for name in head]
    first = len(head) + 1
    pivot = ", ".join(f"sum(c) FILTER (WHERE b = {i}) AS {name}" for i, name in enumerate(BUCKET_COLUMNS))
    return (
        f"INSERT INTO {table.name} ({', '.join(map(_quoted, (*head, *BUCKET_COLUMNS)))}) "
        f"SELECT {', '.join(names)}, {', '.join(f'coalesce(h.{name}, 0)' for name in BUCKET_COLUMNS)} "
        f"FROM unnest({arrays}) WITH ORDINALITY AS g({', '.join(map(_quoted, head))}, n) "
        f"LEFT JOIN (SELECT n, {pivot} FROM unnest(${first}::bigint[], ${first + 1}::integer[], "
        f"${first + 2}::integer[]) AS x(n, b, c) GROUP BY n) AS h ON h.n = g.n "
        f"ORDER BY g.n {_conflict_clause(table)}"
    )


def _array_type(kind: TypeEngine[Any]) -> str:
    if isinstance(kind, BigInteger):
        return "bigint"
    return "integer" if isinstance(kind, Integer) else "text"


def _table(name: str) -> Table:
    return next(table for table in TABLES if table.name == name)


def _rows(sums: Sums) -> list[tuple[Any, ...]]:
    return [(*key, *sums[key][:HISTOGRAM], *dense(sums[key][HISTOGRAM])) for key in sorted(sums)]


def sqlite_plan(folded: tuple[Sums, ...]) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """(statement, parameters) for each multi-row upsert the folded sums need."""
    for table, sums in zip(TABLES, folded, strict=True):
        rows = _rows(sums)
        start = 0
        while start < len(rows):
            size = next(size for size in CHUNK_ROWS if size <= len(rows) - start)
            yield sqlite_upsert(table.name, size), tuple(chain.from_iterable(rows[start : start + size]))
            start += size


def postgres_plan(folded: tuple[Sums, ...]) -> Iterator[tuple[str, tuple[list[Any], ...]]]:
    """(statement, its arrays) for each table with groups to add."""
    for table, sums in zip(TABLES, folded, strict=True):
        if not sums:
            continue
        keys = sorted(sums)
        rows = [(*key, *sums[key][:HISTOGRAM]) for key in keys]
        positions: list[int] = []
        buckets: list[int] = []
        counts: list[int] = []
        for position, key in enumerate(keys, start=1):
            histogram = sums[key][HISTOGRAM]
            positions.extend(repeat(position, len(histogram)))
            buckets.extend(histogram)
            counts.extend(histogram.values())
        yield postgres_upsert(table.name), (*map(list, zip(*rows, strict=True)), positions, buckets, counts)


async def add_sums(conn: AsyncConnection, folded: tuple[Sums, ...]) -> None:
    """Add folded sums to the tables in the caller's transaction, a statement at a time (the writer's
    batches go with its own statements instead: insert.py)."""
    if conn.dialect.name == "postgresql":
        for sql, arrays in postgres_plan(folded):
            await conn.exec_driver_sql(sql, arrays)
    else:
        for sql, params in sqlite_plan(folded):
            await conn.exec_driver_sql(sql, params)
