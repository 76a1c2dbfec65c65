"""Reading logged completions: a page, one call, or all matching rows streamed (logs, export, the API).
Aggregates are in stats.py; filters in filters.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import ARRAY, Integer, Select, any_, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .filters import Filters, where_clauses
from .models import choices_table, completions_table
from .rows import CHOICE_COLUMNS, DERIVED

c = completions_table.c
COLUMNS = tuple(column.name for column in completions_table.c if column.name not in DERIVED)
MIN_PREFIX = 6
HOUR_CHUNK = 500  # hours probed per completion-id query: under SQLite's variable limit


def completions_query(filters: Filters, dialect: str) -> Select[Any]:
    return select(completions_table).where(*where_clauses(filters, dialect))


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def to_json(value: Any, *, indent: bool = False) -> bytes:
    """Rows as JSON: times in RFC 3339 UTC (`Z`), costs as numbers."""
    option = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(value, default=_json_default, option=option)


def row_dict(row: Any, choices: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    data = dict(row._mapping)
    for name in DERIVED:
        data.pop(name, None)
    data["choices"] = list(choices)
    return data


async def _choices_for(conn: AsyncConnection, ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    found: dict[int, list[dict[str, Any]]] = {pk: [] for pk in ids}
    if not ids:
        return found
    query = (
        select(choices_table.c.completion_pk, *(choices_table.c[name] for name in CHOICE_COLUMNS))
        .where(choices_table.c.completion_pk.in_(ids))
        .order_by(choices_table.c.completion_pk, choices_table.c.index)
    )
    for row in await conn.execute(query):
        found[row.completion_pk].append({name: getattr(row, name) for name in CHOICE_COLUMNS})
    return found


async def fetch_completions(
    conn: AsyncConnection, filters: Filters, *, limit: int = 20, before_id: int | None = None
) -> list[dict[str, Any]]:
    """Newest first (by id, the order rows were logged), with their choices; limit 0 = all."""
    dialect = conn.dialect.name
    query = completions_query(filters, dialect).order_by(c.id.desc())
    if before_id is not None:
        query = query.where(c.id < before_id)
    if limit:
        query = query.limit(limit)
    if limit and dialect == "sqlite" and query.whereclause is not None:
        # SQLite takes a filter's index (model, user, key...) and sorts every match by id: sorting bare
        # ids, then reading the page's rows by id, keeps the sort small where whole rows made it slow
        ids = select(c.id).where(query.whereclause).order_by(c.id.desc()).limit(limit)
        query = select(completions_table).where(c.id.in_(ids.scalar_subquery())).order_by(c.id.desc())
    rows = (await conn.execute(query)).all()
    choices = await _choices_for(conn, [row.id for row in rows])
    return [row_dict(row, choices[row.id]) for row in rows]


def short_id(request_id: str) -> str:
    """What `logs` prints for a request id: its last 8 characters. Request ids are UUIDv7, whose first 8
    characters are the time and are the same for every call in the same minute; the end is random."""
    return request_id[-8:]


class AmbiguousId(LookupError):
    """A short id or prefix that matches more than one request id; `rows` are the matches, newest first."""

    def __init__(self, ident: str, rows: list[dict[str, Any]]) -> None:
        super().__init__(f"{ident!r} matches {len(rows)} request ids")
        self.rows = rows
        self.request_ids = [row["request_id"] for row in rows]


async def fetch_completion(conn: AsyncConnection, ident: str) -> list[dict[str, Any]]:
    """The completion with this request_id, else those with this upstream completion id (several rows may
    share one), else the one whose request_id ends with `ident` (the short id `logs` prints) or starts
    with it; raises AmbiguousId when that suffix or prefix matches several. A suffix match reads the
    whole table (no index helps), which an interactive lookup can afford."""
    ident = ident.strip()
    conditions: list[Any] = [c.request_id == ident, None]
    if MIN_PREFIX <= len(ident) < 36:
        conditions.append(c.request_id.endswith(ident, autoescape=True))
        conditions.append(c.request_id.startswith(ident, autoescape=True))
    for number, condition in enumerate(conditions):
        if condition is None:
            rows = await _by_completion_id(conn, ident)
        else:
            rows = (await conn.execute(select(completions_table).where(condition).order_by(c.id.desc()))).all()
        if rows:
            choices = await _choices_for(conn, [row.id for row in rows])
            found = [row_dict(row, choices[row.id]) for row in rows]
            if len(found) > 1 and number >= 2:
                raise AmbiguousId(ident, found)
            return found
    return []


async def _by_completion_id(conn: AsyncConnection, completion_id: str) -> list[Any]:
    """Rows with this upstream completion id, newest first. The index is (started_hour, completion_id),
    so the lookup probes it at every hour from the oldest row's to the newest's, HOUR_CHUNK hours per
    query: an index search per hour, where `completion_id = ?` alone would read the whole table."""
    # two subqueries: SQLite reads min() or max() off the index only when each stands alone
    bounds = select(
        select(func.min(c.started_hour)).scalar_subquery(), select(func.max(c.started_hour)).scalar_subquery()
    )
    low, high = (await conn.execute(bounds)).one()
    found: list[Any] = []
    if low is not None:
        for top in range(high, low - 1, -HOUR_CHUNK):
            hours = list(range(top, max(low, top - HOUR_CHUNK + 1) - 1, -1))
            found += (await conn.execute(completion_id_probe(conn.dialect.name, hours, completion_id))).all()
    # rows without an hour (inserted around the writer): their own part of the index
    query = select(completions_table).where(c.started_hour.is_(None), c.completion_id == completion_id)
    found += (await conn.execute(query)).all()
    return sorted(found, key=lambda row: row.id, reverse=True)


def completion_id_probe(dialect: str, hours: Sequence[int], completion_id: str) -> Select[Any]:
    """The rows of `completion_id` in these hours: one index search per hour."""
    if dialect == "postgresql":  # one array parameter: the same prepared statement for any number of hours
        in_hours = c.started_hour == any_(bindparam("hours", list(hours), type_=ARRAY(Integer)))
    else:
        in_hours = c.started_hour.in_(list(hours))
    return select(completions_table).where(in_hours, c.completion_id == completion_id)


async def iter_completions(
    engine: AsyncEngine, filters: Filters, *, limit: int = 0, chunk: int = 1000, newest_first: bool = False
) -> AsyncIterator[dict[str, Any]]:
    """Oldest first (or newest), streamed with a server-side cursor in chunks: memory stays flat however
    many rows."""
    async with engine.connect() as conn, engine.connect() as side:
        query = completions_query(filters, conn.dialect.name).order_by(c.id.desc() if newest_first else c.id)
        if limit:
            query = query.limit(limit)
        result = await conn.stream(query.execution_options(yield_per=chunk))
        async for partition in result.partitions():
            choices = await _choices_for(side, [row.id for row in partition])
            for row in partition:
                yield row_dict(row, choices[row.id])
