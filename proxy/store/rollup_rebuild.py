"""Recomputing the rollup tables from the rows (`chatledger db rollup --rebuild`), one UTC day per transaction.

usage_hourly is summed from `completions` (per row, the duration's histogram bucket is a CASE over the
bounds of histogram.py, bound as parameters so the database compares with the very doubles the writer
bisects); the narrower tables are then summed from that day's usage_hourly rows. Days before
the ledger's prune horizon (ledger_meta 'pruned_before') are never touched: their rows are gone and the
rollups are all that is left of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .histogram import LOWER_BOUNDS
from .models import completions_table, usage_hourly_table
from .retention import pruned_before
from .rollups import DIMENSIONS, ROLLUP_SPECS, SOURCES, TAG_SPECS, VALUES, RollupSpec

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _q(name: str) -> str:
    return f'"{name}"'


def _bucket_case(low: int, high: int) -> str:
    """The bucket of duration_ms among buckets low..high, as a balanced tree of CASEs (a handful of
    comparisons per row, not one per bucket)."""
    if low == high:
        return str(low)
    middle = (low + high + 1) // 2  # buckets >= middle start at LOWER_BOUNDS[middle - 1]
    return (
        f"CASE WHEN duration_ms < :b{middle} THEN {_bucket_case(low, middle - 1)} "
        f"ELSE {_bucket_case(middle, high)} END"
    )


def _or_empty(name: str) -> str:
    return f"COALESCE({_q(name)}, '')"


def _null_dims(dimensions: tuple[str, ...]) -> str:
    return " + ".join(
        f"CASE WHEN {_q(name)} IS NULL THEN {1 << DIMENSIONS.index(name)} ELSE 0 END" for name in dimensions
    )


def _measures(dialect: str) -> tuple[str, str]:
    """(inner, outer) select lists: the inner one sums rows per group and duration bucket `b`, the outer one
    those sums per group, with the histogram pivoted into h00..h55."""
    tokens = [name for name in VALUES if name.endswith("_tokens")]
    if dialect == "sqlite":
        pico = "CAST(ROUND(cost * 1000000000000.0) AS INTEGER)"
    else:
        pico = "CAST(cost * 1000000000000 AS BIGINT)"  # NUMERIC with scale 12: an exact integer
    inner = ", ".join(
        [
            "COUNT(*) AS requests",
            *(f"COALESCE(SUM({name}), 0) AS {name}" for name in tokens),
            "COUNT(cost) AS priced",
            "COUNT(duration_ms) AS timed",
            f"COALESCE(SUM({pico}), 0) AS cost_pusd",
        ]
    )
    outer = ", ".join(
        [
            "SUM(requests)",
            "SUM(CASE WHEN outcome = 'ok' THEN 0 ELSE requests END)",
            *(f"SUM({name})" for name in tokens),
            "SUM(priced)",
            "SUM(timed)",
            "SUM(cost_pusd)",
            *(f"SUM(CASE WHEN b = {i} THEN timed ELSE 0 END)" for i in range(len(LOWER_BOUNDS) + 1)),
        ]
    )
    return inner, outer


def hourly_sql(dialect: str) -> str:
    """INSERT into usage_hourly the sums of the rows with :low <= started_hour < :high."""
    dims = ", ".join(map(_q, DIMENSIONS))
    inner, outer = _measures(dialect)
    columns = ", ".join(map(_q, ("hour", *DIMENSIONS, "null_dims", *VALUES)))
    return (
        f"INSERT INTO usage_hourly ({columns}) "
        f"SELECT started_hour, {', '.join(map(_or_empty, DIMENSIONS))}, "
        f"{_null_dims(DIMENSIONS)}, {outer} FROM ("
        f"SELECT started_hour, {dims}, {_bucket_case(0, len(LOWER_BOUNDS))} AS b, {inner} "
        f"FROM completions WHERE started_hour >= :low AND started_hour < :high "
        f"GROUP BY started_hour, {dims}, b) AS g "
        f"GROUP BY started_hour, {dims}"
    )


def hourly_tags_sql(dialect: str) -> str:
    """INSERT into usage_hourly_tags the sums of the rows with :low <= started_hour < :high, each row under
    each of its tag pairs, a row without tags under ('', '') as the writer counts them (rollups.fold_tags)."""
    inner, outer = _measures(dialect)
    if dialect == "sqlite":
        pairs = "LEFT JOIN json_each(CASE WHEN json_type(tags) = 'object' THEN tags END) AS t"
    else:
        pairs = "LEFT JOIN LATERAL json_each_text(CASE WHEN json_typeof(tags) = 'object' THEN tags END) AS t ON true"
    columns = ", ".join(map(_q, ("hour", "tag", "value", *VALUES)))
    return (
        f"INSERT INTO usage_hourly_tags ({columns}) SELECT started_hour, tag, value, {outer} FROM ("
        f"SELECT started_hour, COALESCE(t.key, '') AS tag, COALESCE(t.value, '') AS value, outcome, "
        f"{_bucket_case(0, len(LOWER_BOUNDS))} AS b, {inner} "
        f"FROM completions {pairs} WHERE started_hour >= :low AND started_hour < :high "
        f"GROUP BY started_hour, tag, value, outcome, b) AS g "
        f"GROUP BY started_hour, tag, value"
    )


DAILY_TAGS_SQL = (
    f"INSERT INTO usage_daily_tags ({', '.join(map(_q, ('day', 'tag', 'value', *VALUES)))}) "
    f"SELECT hour / 24, tag, value, {', '.join(f'SUM({_q(name)})' for name in VALUES)} FROM usage_hourly_tags "
    "WHERE hour >= :low AND hour < :high GROUP BY hour / 24, tag, value"
)


def from_hourly_sql(spec: RollupSpec) -> str:
    """INSERT into a narrower rollup table the sums of its source's rows (rollups.SOURCES: usage_hourly, or
    the family's hourly table for a daily one) with :low <= hour < :high."""
    period = "hour" if spec.period == "hour" else "hour / 24"
    keys = ", ".join([period, *map(_q, spec.dimensions), f"null_dims & {spec.mask}"])
    columns = ", ".join(map(_q, (spec.period, *spec.dimensions, "null_dims", *VALUES)))
    sums = ", ".join(f"SUM({_q(name)})" for name in VALUES)
    return (
        f"INSERT INTO {spec.name} ({columns}) SELECT {keys}, {sums} FROM {SOURCES[spec.name]} "
        f"WHERE hour >= :low AND hour < :high GROUP BY {keys}"
    )


BOUND_PARAMS = {f"b{i}": bound for i, bound in enumerate(LOWER_BOUNDS, start=1)}


@dataclass(slots=True)
class RebuildReport:
    days: int = 0
    rows: int = 0
    seconds: float = 0.0
    first_day: str | None = None
    last_day: str | None = None
    pruned_before: str | None = None


def day_number(moment: datetime) -> int:
    """Days since the Unix epoch of a UTC time (floored)."""
    return (moment.astimezone(UTC) - EPOCH) // timedelta(days=1)


def day_start(day: int) -> datetime:
    return EPOCH + timedelta(days=day)


async def rebuild_day(conn: AsyncConnection, day: int) -> int:
    """Replace one day's rollups by the sums of its rows, in the caller's transaction; returns the rows."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        await conn.exec_driver_sql("SET LOCAL jit = off")  # compiling these wide aggregates costs more than it saves
        # writers add to these tables after inserting their rows: holding them off until this day's sums are
        # in means a row committed meanwhile is either in the sums read here or added after them, never both
        names = ", ".join(spec.name for spec in (*ROLLUP_SPECS, *TAG_SPECS))
        await conn.exec_driver_sql(f"LOCK TABLE {names} IN SHARE ROW EXCLUSIVE MODE")
    window = {"low": day * 24, "high": day * 24 + 24}
    for spec in (*ROLLUP_SPECS, *TAG_SPECS):
        if spec.period == "hour":
            await conn.execute(text(f"DELETE FROM {spec.name} WHERE hour >= :low AND hour < :high"), window)
        else:
            await conn.execute(text(f"DELETE FROM {spec.name} WHERE day = :day"), {"day": day})
    await conn.execute(text(hourly_sql(dialect)), {**window, **BOUND_PARAMS})
    for spec in ROLLUP_SPECS[1:]:
        await conn.execute(text(from_hourly_sql(spec)), window)
    await conn.execute(text(hourly_tags_sql(dialect)), {**window, **BOUND_PARAMS})
    await conn.execute(text(DAILY_TAGS_SQL), window)
    rows = (
        await conn.execute(
            select(func.coalesce(func.sum(usage_hourly_table.c.requests), 0)).where(
                usage_hourly_table.c.hour >= window["low"], usage_hourly_table.c.hour < window["high"]
            )
        )
    ).scalar_one()
    return int(rows)


async def rebuild(engine: AsyncEngine, since: datetime | None = None) -> RebuildReport:
    """Recompute the rollups of every day from `since` (floored to a UTC day; default: the first row's)
    through the last day holding rows or rollups, never before the prune horizon."""
    report = RebuildReport()
    started = time.perf_counter()
    hours = completions_table.c.started_hour
    async with engine.connect() as conn:
        horizon = await pruned_before(conn)
        first_hour, last_hour = (await conn.execute(select(func.min(hours), func.max(hours)))).one()
        rolled = usage_hourly_table.c.hour
        first_rollup, last_rollup = (await conn.execute(select(func.min(rolled), func.max(rolled)))).one()
    if horizon is not None:
        report.pruned_before = horizon.isoformat()
    ends = [hour // 24 for hour in (last_hour, last_rollup) if hour is not None]
    if not ends:
        report.seconds = time.perf_counter() - started
        return report
    first = min(hour // 24 for hour in (first_hour, first_rollup) if hour is not None)  # nothing before it
    if since is not None:
        first = max(first, day_number(since))
    if horizon is not None:
        first = max(first, -(-(horizon - EPOCH) // timedelta(days=1)))  # a partly pruned day is left alone
    last = max(ends)
    for day in range(first, last + 1):
        async with engine.begin() as conn:
            report.rows += await rebuild_day(conn, day)
        report.days += 1
    if report.days:
        report.first_day = day_start(first).date().isoformat()
        report.last_day = day_start(last).date().isoformat()
    report.seconds = time.perf_counter() - started
    return report
