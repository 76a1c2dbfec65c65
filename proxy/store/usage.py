"""Aggregates read from the rollup tables where they can answer, from the completions rows elsewhere.

A time range is cut into spans: whole days come from a daily table, whole hours from `usage_hourly`,
and what is left at either end (less than an hour) from the rows, so a range such as "the last 7 days"
reads a few thousand rollup rows instead of every call. Which tables: those of the narrowest family
(rollups.FAMILIES) that holds every dimension the query groups or filters by.
Tags, status codes and the stream flag are not rollup dimensions: such queries read the rows.

Every span yields the same measures, summed exactly (costs as integer pico-USD) and a duration
histogram, so a group's counts, tokens and cost equal the rows' sums; percentiles from the histogram
have its resolution (histogram.RESOLUTION).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, case, func, literal, or_, select, true
from sqlalchemy.ext.asyncio import AsyncConnection

from . import histogram
from .filters import Filters, key_matches, model_matches, where_clauses
from .models import ROLLUP_TABLES, TAG_TABLES, completions_table
from .rollups import DIMENSIONS, FAMILIES, TAG_SPECS
from .types import Money

c = completions_table.c
TIME_FIELDS = ("day", "hour")
TAG_FIELDS = ("tag", "value")  # the tag tables' dimensions
MEASURES = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "priced",
    "timed",
)
PICO = 10**12
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BIT = {name: 1 << i for i, name in enumerate(DIMENSIONS)}


@dataclass(slots=True)
class Aggregate:
    """One group's sums: what a rollup row holds, and what the rows give."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    priced: int = 0
    timed: int = 0
    cost_pusd: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * histogram.BUCKETS)

    def merge(self, other: Aggregate) -> None:
        for name in MEASURES:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cost_pusd += other.cost_pusd
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram, strict=True)]

    def without(self, other: Aggregate) -> Aggregate:
        """What is left of these sums once `other` (a part of them) is taken out."""
        left = Aggregate(cost_pusd=self.cost_pusd - other.cost_pusd)
        for name in MEASURES:
            setattr(left, name, getattr(self, name) - getattr(other, name))
        left.histogram = [a - b for a, b in zip(self.histogram, other.histogram, strict=True)]
        return left

    @property
    def cost(self) -> Decimal | None:
        """None when no row of the group has a cost, as SQL's SUM gives."""
        if not self.priced:
            return None
        value = Decimal(self.cost_pusd).scaleb(-12)
        return value.quantize(Decimal(1)) if value == value.to_integral() else value.normalize()

    def percentile(self, p: float) -> float | None:
        return histogram.percentile(self.histogram, p)


def answerable(filters: Filters, fields: Sequence[str]) -> bool:
    """Whether the rollups hold every dimension these filters and groups need. The tag tables hold no other
    dimension: grouped by tag, only the time range may filter."""
    if filters.tags or filters.status is not None or filters.stream is not None:
        return False
    if "tag" in fields:
        return set(fields) <= {*TAG_FIELDS, *TIME_FIELDS} and not dimensions_used(filters, ())
    return set(fields) <= {*DIMENSIONS, *TIME_FIELDS}


@dataclass(frozen=True, slots=True)
class Span:
    """A piece of the time range and the table it is read from ("rows" = the completions)."""

    source: str
    start: datetime | None
    end: datetime | None


def _floor(moment: datetime, unit: timedelta) -> datetime:
    return EPOCH + ((moment - EPOCH) // unit) * unit


def _ceil(moment: datetime, unit: timedelta) -> datetime:
    floor = _floor(moment, unit)
    return floor if floor == moment else floor + unit


def dimensions_used(filters: Filters, fields: Sequence[str]) -> set[str]:
    used = {name for name in fields if name in DIMENSIONS}
    for name, value in (
        ("model", filters.model),
        ("requested_model", filters.model),
        ("user", filters.user),
        ("api_key_hash", filters.key),
        ("outcome", filters.outcome),
        ("api", filters.api),
    ):
        if value is not None:
            used.add(name)
    return used


def tables_for(filters: Filters, fields: Sequence[str]) -> tuple[str, str | None]:
    """(hourly, daily) rollup tables of the narrowest family that holds every dimension used; daily is None
    when only hours will do (grouped by hour, or no daily table holds those dimensions)."""
    if "tag" in fields:
        return TAG_SPECS[0].name, None if "hour" in fields else TAG_SPECS[1].name
    used = dimensions_used(filters, fields)
    family = next(family for family in FAMILIES if used <= set(family.dimensions))
    return family.hourly, None if "hour" in fields else family.daily


def plan(filters: Filters, fields: Sequence[str]) -> list[Span]:
    """The spans that together cover [since, until) exactly once."""
    start, end = filters.since, filters.until
    spans: list[Span] = []
    if start is not None and start != _floor(start, HOUR):
        edge = _ceil(start, HOUR) if end is None else min(_ceil(start, HOUR), end)
        spans.append(Span("rows", start, edge))
        start = edge
    if end is not None and start is not None and start >= end:
        return spans
    if end is not None and end != _floor(end, HOUR):
        edge = _floor(end, HOUR) if start is None else max(_floor(end, HOUR), start)
        spans.append(Span("rows", edge, end))
        end = edge
    if start is not None and end is not None and start >= end:
        return spans
    hourly, daily = tables_for(filters, fields)
    if daily is None:
        return [*spans, Span(hourly, start, end)]
    day_start = _ceil(start, DAY) if start is not None else None
    day_end = _floor(end, DAY) if end is not None else None
    if day_start is not None and day_end is not None and day_start >= day_end:
        return [*spans, Span(hourly, start, end)]
    if start is not None and start != day_start:
        spans.append(Span(hourly, start, day_start))
    spans.append(Span(daily, day_start, day_end))
    if end is not None and end != day_end:
        spans.append(Span(hourly, day_end, end))
    return spans


_TABLES = {table.name: table for table in (*ROLLUP_TABLES, *TAG_TABLES)}


def _units(moment: datetime, unit: timedelta) -> int:
    return (moment - EPOCH) // unit


def _rollup_where(table: Any, filters: Filters, dialect: str, span: Span) -> list[Any]:
    t = table.c
    hourly = "hour" in t
    time_column, unit = (t.hour, HOUR) if hourly else (t.day, DAY)
    where: list[Any] = []
    if span.start is not None:
        where.append(time_column >= _units(span.start, unit))
    if span.end is not None:
        where.append(time_column < _units(span.end, unit))

    def known(name: str, clause: Any) -> Any:  # '' holds a NULL: the bit says which
        return and_(clause, t.null_dims.op("&")(_BIT[name]) == 0)

    if filters.model:
        by_model, by_requested = model_matches(filters.model, dialect, t.model, t.requested_model)
        where.append(or_(known("model", by_model), known("requested_model", by_requested)))
    if filters.user is not None:
        where.append(known("user", t.user == filters.user))
    if filters.key:
        where.append(known("api_key_hash", key_matches(filters.key, t.api_key_hash)))
    if filters.outcome is not None:
        where.append(t.outcome == filters.outcome)
    if filters.api is not None:
        where.append(known("api", t.api == filters.api))
    return where


def _rollup_query(
    table: Any, filters: Filters, fields: Sequence[str], dialect: str, span: Span, histograms: bool
) -> Any:
    t = table.c
    groups: list[Any] = []
    mask = 0
    for name in fields:
        if name == "hour":
            groups.append(t.hour.label(name))
        elif name == "day":
            groups.append((t.hour // 24 if "hour" in t else t.day).label(name))
        else:
            groups.append(t[name].label(name))
            mask |= _BIT.get(name, 0)
    nulls = (t.null_dims.op("&")(mask) if "null_dims" in t else literal(0)).label("nulls")
    buckets = histogram.BUCKET_COLUMNS if histograms else ()  # most of the columns: summed only when wanted
    measures = [func.sum(t[name]).label(name) for name in (*MEASURES, "cost_pusd", *buckets)]
    query = select(*groups, nulls, *measures).where(*_rollup_where(table, filters, dialect, span))
    return query.group_by(*groups, nulls)


def _rows_query(filters: Filters, fields: Sequence[str], dialect: str, span: Span) -> Any:
    """The rows of a short span, grouped like a rollup table plus the duration bucket."""
    groups: list[Any] = []
    source: Any = completions_table
    pairs = tag_pairs(dialect) if "tag" in fields else None
    if pairs is not None:
        source = source.outerjoin(pairs, true())
    for name in fields:
        if name == "hour":
            groups.append(c.started_hour.label(name))
        elif name == "day":
            groups.append((c.started_hour // 24).label(name))
        elif pairs is not None and name in TAG_FIELDS:  # as the writer counts: no tags is ('', '')
            groups.append(func.coalesce(pairs.c.key if name == "tag" else pairs.c.value, "").label(name))
        else:
            groups.append(c[name].label(name))
    bucket = histogram_bucket(c.duration_ms).label("bucket")
    measures = [
        func.count().label("requests"),
        func.count(func.nullif(c.outcome, "ok")).label("errors"),
        *(func.coalesce(func.sum(c[name]), 0).label(name) for name in MEASURES if name.endswith("_tokens")),
        func.count(c.cost).label("priced"),
        func.count(c.duration_ms).label("timed"),
        func.sum(c.cost, type_=Money()).label("cost"),
    ]
    narrowed = dataclasses.replace(filters, since=span.start, until=span.end)
    query = select(*groups, bucket, *measures).select_from(source).where(*where_clauses(narrowed, dialect))
    return query.group_by(*groups, bucket)


def tag_pairs(dialect: str) -> Any:
    """A row's tag pairs as a joinable table (key, value); none for a row without tags."""
    if dialect == "sqlite":
        each = func.json_each(case((func.json_type(c.tags) == "object", c.tags))).table_valued("key", "value")
        return each.alias("tag_pairs")
    each = func.json_each_text(case((func.json_typeof(c.tags) == "object", c.tags))).table_valued("key", "value")
    return each.lateral("tag_pairs")


def histogram_bucket(duration: Any) -> Any:
    """The histogram bucket of a duration, in SQL (a CASE over the bucket bounds: SQLite may lack ln())."""
    whens = [(duration < histogram.bounds(i)[1], i) for i in range(histogram.BUCKETS - 1)]
    return case(*whens, else_=case((duration.is_not(None), histogram.BUCKETS - 1)))


def _key(row: Any, fields: Sequence[str], nulls: int) -> tuple[Any, ...]:
    values = []
    for name in fields:
        value = getattr(row, name)
        if name in _BIT and nulls & _BIT[name]:
            value = None
        values.append(value)
    return tuple(values)


async def aggregate(
    conn: AsyncConnection, filters: Filters, fields: Sequence[str], *, histograms: bool = True
) -> dict[tuple[Any, ...], Aggregate]:
    """Sums per group of `fields` (dimension names, "day" or "hour" as integers since the epoch), read from
    the rollups and, for the sub-hour ends of the range, the rows. Callers check `answerable` first."""
    dialect = conn.dialect.name
    groups: dict[tuple[Any, ...], Aggregate] = {}
    for span in plan(filters, fields):
        if span.source == "rows":
            for row in await conn.execute(_rows_query(filters, fields, dialect, span)):
                found = Aggregate(
                    **{name: int(getattr(row, name) or 0) for name in MEASURES},
                    cost_pusd=_pico(row.cost),
                )
                if row.bucket is not None:
                    found.histogram[row.bucket] = found.timed
                groups.setdefault(_key(row, fields, 0), Aggregate()).merge(found)
            continue
        table = _TABLES[span.source]
        for row in await conn.execute(_rollup_query(table, filters, fields, dialect, span, histograms)):
            found = Aggregate(
                **{name: int(getattr(row, name)) for name in MEASURES},
                cost_pusd=int(row.cost_pusd),
                histogram=[int(getattr(row, name)) for name in histogram.BUCKET_COLUMNS]
                if histograms
                else [0] * histogram.BUCKETS,
            )
            groups.setdefault(_key(row, fields, row.nulls), Aggregate()).merge(found)
    return groups


def _pico(cost: Decimal | None) -> int:
    return 0 if cost is None else int((cost * PICO).to_integral_value())


def day_label(day: int) -> str:
    return (EPOCH + day * DAY).strftime("%Y-%m-%d")


def hour_label(hour: int) -> str:
    return (EPOCH + hour * HOUR).strftime("%Y-%m-%d %H:00")


def bucket_start(value: int, unit: str) -> datetime:
    return EPOCH + value * (DAY if unit == "day" else HOUR)
