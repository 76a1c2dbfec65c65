"""`stats`: sums, counts and latency percentiles of logged completions, grouped by one dimension.

Filters come from filters.py, so `stats` and `logs` select the same rows. Where the rollups hold the
grouping and every filter (usage.py), they answer, with percentiles from their duration histograms;
otherwise, and with `exact`, the rows do, as below.

Exact percentiles: PostgreSQL has percentile_cont. SQLite has none, so the same interpolated value is
computed from the two rows around the wanted rank, found with row_number() over the filtered rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Integer,
    and_,
    cast,
    func,
    literal_column,
    or_,
    select,
    true,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from . import histogram, usage
from .filters import FilterError, Filters, tag_key, where_clauses
from .models import ApiKey, completions_table
from .types import Money

c = completions_table.c
DIMENSIONS = ("model", "day", "hour", "user", "key", "tag", "provider", "upstream", "api")
PERCENTILES = (0.5, 0.95)
MAX_WANTED_RANKS = 8000

STAT_FIELDS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost",
    "unknown_cost",
)


@dataclass(slots=True)
class StatsRow:
    key: Any
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: Decimal | None = None
    unknown_cost: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    label: str | None = None
    timed: int = field(default=0, repr=False)

    def add(self, row: Any) -> None:
        if not hasattr(row, "unknown_cost"):
            self.unknown_cost += row.requests - row.priced
        for name in STAT_FIELDS:
            value = getattr(row, name, None)
            if value is None:
                continue
            current = getattr(self, name)
            setattr(self, name, value if current is None else current + value)
        self.timed += row.timed

    def as_dict(self) -> dict[str, Any]:
        data = {"key": self.key}
        if self.label is not None:
            data["label"] = self.label
        data.update({name: getattr(self, name) for name in (*STAT_FIELDS, "p50_ms", "p95_ms")})
        return data


@dataclass(slots=True)
class Stats:
    by: str
    rows: list[StatsRow]
    totals: StatsRow
    percentiles: str = "exact"  # or the histogram's resolution, when read from the rollups

    def as_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "rows": [row.as_dict() for row in self.rows],
            "totals": self.totals.as_dict(),
            "percentiles": self.percentiles,
        }


# the rollup fields each grouping reads (usage.py); tags are not in the rollups
ROLLUP_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("model", "requested_model"),
    "day": ("day",),
    "hour": ("hour",),
    "user": ("user",),
    "key": ("api_key_hash",),
    "provider": ("provider",),
    "upstream": ("upstream",),
    "api": ("api",),
}


def _aggregates() -> list[Any]:
    """count() of a nullable column is the cheapest aggregate on SQLite; unknown cost = requests - priced."""
    return [
        func.count().label("requests"),
        func.count(func.nullif(c.outcome, "ok")).label("errors"),
        func.sum(c.prompt_tokens).label("prompt_tokens"),
        func.sum(c.completion_tokens).label("completion_tokens"),
        func.sum(c.cached_tokens).label("cached_tokens"),
        func.sum(c.reasoning_tokens).label("reasoning_tokens"),
        func.sum(c.cost, type_=Money()).label("cost"),
        func.count(c.cost).label("priced"),
        func.count(c.duration_ms).label("timed"),
    ]


def parse_dimension(by: str) -> str:
    if by in DIMENSIONS:
        return by
    if by.startswith("tag:") and by[4:]:
        tag_key("by", by[4:])
        return by
    raise FilterError("by", f"expected one of {', '.join(DIMENSIONS)} or tag:NAME, got {by!r}")


def _group(by: str, dialect: str) -> tuple[Any, Any]:
    """The grouping expression and the FROM clause it needs."""
    table: Any = completions_table
    if by == "model":
        return func.coalesce(c.model, c.requested_model), table
    if by in ("day", "hour"):
        if dialect == "sqlite":
            return func.strftime("%Y-%m-%d" if by == "day" else "%Y-%m-%d %H:00", c.started_at), table
        moment = func.timezone("UTC", c.started_at)
        return func.to_char(moment, "YYYY-MM-DD" if by == "day" else "YYYY-MM-DD HH24:00"), table
    if by in ("user", "key", "provider", "upstream", "api"):
        column = c.api_key_hash if by == "key" else c[by]
        # SQLite would walk the user/key index to group without sorting, one table lookup per row, even
        # when a time filter leaves a small range: as an expression the index no longer tempts it
        return (column.concat("") if dialect == "sqlite" else column), table
    if by.startswith("tag:"):
        return c.tags[by[4:]].as_string(), table
    pairs = usage.tag_pairs(dialect)  # by == "tag": one group per key=value pair
    return pairs.c.key + "=" + pairs.c.value, table.outerjoin(pairs, true())


def _percentile(values: Mapping[int, float], count: int, p: float) -> float | None:
    """percentile_cont from the 0-based ranks floor(h) and floor(h)+1, h = p * (count - 1)."""
    if count == 0:
        return None
    h = p * (count - 1)
    low = int(h)
    lower = values[low]
    upper = values.get(low + 1, lower)
    return lower + (h - low) * (upper - lower)


_ELSEWHERE = object()  # a tag table's group that another tag's grouping does not show


def _rollup_key(by: str, values: tuple[Any, ...]) -> Any:
    if by == "tag":  # ('', '') counts the calls without tags
        return f"{values[0]}={values[1]}" if values[0] else None
    if by.startswith("tag:"):
        return values[1] if values[0] == by[4:] else _ELSEWHERE
    if by == "model":
        return values[0] if values[0] is not None else values[1]
    if by == "day":
        return usage.day_label(values[0])
    if by == "hour":
        return usage.hour_label(values[0])
    return values[0]


def _from_aggregate(key: Any, found: usage.Aggregate, percentiles: bool = True) -> StatsRow:
    row = StatsRow(key)
    for name in ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"):
        setattr(row, name, getattr(found, name))
    row.cost = found.cost
    row.unknown_cost = found.requests - found.priced
    row.timed = found.timed
    if percentiles:
        row.p50_ms, row.p95_ms = (found.percentile(p) for p in PERCENTILES)
    return row


def _rollup_fields(by: str) -> tuple[str, ...]:
    return usage.TAG_FIELDS if by.startswith("tag") else ROLLUP_FIELDS[by]


async def _rollup_stats(conn: AsyncConnection, by: str, filters: Filters, percentiles: bool) -> Stats:
    merged: dict[Any, usage.Aggregate] = {}
    found_groups = await usage.aggregate(conn, filters, _rollup_fields(by), histograms=percentiles)
    everything = usage.Aggregate()
    if by.startswith("tag"):  # a call counts under each of its tags: the totals count it once
        for found in (await usage.aggregate(conn, filters, (), histograms=percentiles)).values():
            everything.merge(found)
    for values, found in found_groups.items():
        key = _rollup_key(by, values)
        if key is not _ELSEWHERE:
            merged.setdefault(key, usage.Aggregate()).merge(found)
    if by.startswith("tag:"):  # calls without this tag: all calls but those with it
        tagged = usage.Aggregate()
        for found in merged.values():
            tagged.merge(found)
        merged[None] = everything.without(tagged)
    elif not by.startswith("tag"):
        for found in merged.values():
            everything.merge(found)
    groups = {key: _from_aggregate(key, found, percentiles) for key, found in merged.items() if found.requests}
    if by == "key":
        await _attach_labels(conn, groups)
    rows = sorted(groups.values(), key=_order)
    resolution = histogram.RESOLUTION if percentiles else "none"
    return Stats(by, rows, _from_aggregate("total", everything, percentiles), resolution)


def _order(row: StatsRow) -> tuple[Any, ...]:
    return (row.cost is None, -(row.cost or 0), -row.requests, str(row.key))


async def fetch_stats(
    conn: AsyncConnection, by: str, filters: Filters, *, exact: bool = False, percentiles: bool = True
) -> Stats:
    """Per-group sums, from the rollups where they can answer (percentiles from histograms; without
    `percentiles`, none: the histograms are most of what a rollup row holds), else, or with `exact`, from
    the rows (exact percentiles)."""
    by = parse_dimension(by)
    if not exact and usage.answerable(filters, _rollup_fields(by)):
        return await _rollup_stats(conn, by, filters, percentiles)
    dialect = conn.dialect.name
    where = where_clauses(filters, dialect)
    key_expr, from_ = _group(by, dialect)
    groups: dict[Any, StatsRow] = {}
    extra = []
    if dialect != "sqlite" and percentiles:
        extra = [func.percentile_cont(p).within_group(c.duration_ms).label(f"p{i}") for i, p in enumerate(PERCENTILES)]
    query = select(key_expr.label("key"), *_aggregates(), *extra).select_from(from_).where(*where)
    for row in await conn.execute(query.group_by(key_expr)):
        stats = groups[row.key] = StatsRow(row.key)
        stats.add(row)
        if extra:
            stats.p50_ms, stats.p95_ms = row.p0, row.p1
    if dialect == "sqlite" and groups and percentiles:
        await _window_percentiles(conn, key_expr, from_, where, groups)
    if by == "key":
        await _attach_labels(conn, groups)
    rows = sorted(groups.values(), key=_order)
    return Stats(by, rows, await _totals(conn, by, where, rows))


async def _totals(conn: AsyncConnection, by: str, where: list[Any], rows: list[StatsRow]) -> StatsRow:
    totals = StatsRow("total")
    if by != "tag":
        for row in rows:
            totals.add(row)
        return totals
    # one row can carry several tags: count each row once
    row = (await conn.execute(select(*_aggregates()).where(*where))).one()
    totals.add(row)
    return totals


async def _window_percentiles(
    conn: AsyncConnection, key_expr: Any, from_: Any, where: list[Any], groups: dict[Any, StatsRow]
) -> None:
    """Rank durations within each group (one sort) and keep only the rows around the wanted ranks."""
    ranked = (
        select(
            key_expr.label("key"),
            c.duration_ms.label("d"),
            func.row_number().over(partition_by=key_expr, order_by=c.duration_ms).label("rn"),
        )
        .select_from(from_)
        .where(*where, c.duration_ms.is_not(None))
        .subquery()
    )
    wanted: set[tuple[Any, int]] = set()
    for key, stats in groups.items():
        for p in PERCENTILES if stats.timed else ():
            low = int(p * (stats.timed - 1))
            wanted.update({(key, low + 1), (key, min(low + 2, stats.timed))})
    if not wanted:
        return
    if len(wanted) <= MAX_WANTED_RANKS:
        known = sorted((pair for pair in wanted if pair[0] is not None), key=repr)
        conditions = [tuple_(ranked.c.key, ranked.c.rn).in_(known)] if known else []
        nulls = sorted(rn for key, rn in wanted if key is None)
        if nulls:
            conditions.append(and_(ranked.c.key.is_(None), ranked.c.rn.in_(nulls)))
        query = select(ranked.c.key, ranked.c.d, ranked.c.rn).where(or_(*conditions))
    else:  # too many groups for one IN list: let SQL find each group's ranks
        counted = select(ranked, func.count().over(partition_by=ranked.c.key).label("n")).subquery()
        lows = [cast((counted.c.n - 1) * literal_column(repr(p)), Integer) for p in PERCENTILES]
        query = select(counted.c.key, counted.c.d, counted.c.rn).where(
            or_(*(counted.c.rn.between(low + 1, low + 2) for low in lows))
        )
    found: dict[Any, dict[int, float]] = {}
    for row in await conn.execute(query):
        found.setdefault(row.key, {})[row.rn - 1] = row.d
    for key, values in found.items():
        if key in groups:
            stats = groups[key]
            stats.p50_ms, stats.p95_ms = (_percentile(values, stats.timed, p) for p in PERCENTILES)


async def _attach_labels(conn: AsyncConnection, groups: dict[Any, StatsRow]) -> None:
    hashes = [key for key in groups if key is not None]
    if not hashes:
        return
    for row in await conn.execute(select(ApiKey.api_key_hash, ApiKey.label).where(ApiKey.api_key_hash.in_(hashes))):
        groups[row.api_key_hash].label = row.label
