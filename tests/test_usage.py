"""Reading aggregates from the rollups (proxy.store.usage): which spans and tables a range reads, and that
stats, the dashboard's series and headline percentiles from the rollups equal what the rows give, on
SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.store import series, usage
from proxy.store.engine import create_engine
from proxy.store.filters import Filters, parse_filters
from proxy.store.latency import fetch_percentiles
from proxy.store.migrate import upgrade
from proxy.store.stats import fetch_stats

from .querydata import base_time, filter_cases, insert_rows, make_rows, percentile, within_histogram_resolution

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
FULL = "usage_hourly"
HOURLY, DAILY = "usage_hourly_models", "usage_daily_models"
HOURLY_TOTALS, TOTALS = "usage_hourly_totals", "usage_daily_totals"
ROUTES = "usage_daily_routes"
HOURLY_USERS, USERS = "usage_hourly_users", "usage_daily_users"
HOURLY_KEYS, KEYS = "usage_hourly_keys", "usage_daily_keys"


# ---- planning (pure) ----------------------------------------------------------------------------


def spans(filters: Filters, fields: tuple[str, ...] = ("model", "requested_model")) -> list[tuple[Any, ...]]:
    return [(span.source, span.start, span.end) for span in usage.plan(filters, fields)]


def test_all_time_reads_the_daily_table_only() -> None:
    assert spans(Filters()) == [(DAILY, None, None)]


def test_a_range_reads_rows_at_its_sub_hour_ends_hours_to_the_day_and_days_between() -> None:
    since = datetime(2026, 3, 3, 12, 34, 56, tzinfo=UTC)
    until = datetime(2026, 3, 10, 9, 15, tzinfo=UTC)
    assert spans(Filters(since=since, until=until)) == [
        ("rows", since, datetime(2026, 3, 3, 13, tzinfo=UTC)),
        ("rows", datetime(2026, 3, 10, 9, tzinfo=UTC), until),
        (HOURLY, datetime(2026, 3, 3, 13, tzinfo=UTC), datetime(2026, 3, 4, tzinfo=UTC)),
        (DAILY, datetime(2026, 3, 4, tzinfo=UTC), datetime(2026, 3, 10, tzinfo=UTC)),
        (HOURLY, datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 3, 10, 9, tzinfo=UTC)),
    ]


def test_a_range_within_one_hour_reads_the_rows_only() -> None:
    since, until = T0 + timedelta(minutes=5), T0 + timedelta(minutes=50)
    assert spans(Filters(since=since, until=until)) == [("rows", since, until)]


def test_the_narrowest_family_holding_every_dimension_used() -> None:
    assert spans(Filters(), ("day",)) == [(TOTALS, None, None)]
    assert spans(Filters(), ("hour",)) == [(HOURLY_TOTALS, None, None)]
    assert spans(Filters(model="gpt-*"), ("day",)) == [(DAILY, None, None)]
    assert spans(Filters(), ("user",)) == [(USERS, None, None)]
    assert spans(Filters(user="u"), ("day",)) == [(USERS, None, None)]
    assert spans(Filters(), ("api_key_hash",)) == [(KEYS, None, None)]
    assert spans(Filters(key="k"), ("hour",)) == [(HOURLY_KEYS, None, None)]
    assert spans(Filters(outcome="ok", api="chat"), ("provider",)) == [(ROUTES, None, None)]
    assert spans(Filters(), ("hour", "model", "requested_model")) == [(HOURLY, None, None)]
    # user or key with any other dimension: only usage_hourly holds them together
    assert spans(Filters(user="u"), ("model", "requested_model")) == [(FULL, None, None)]
    assert spans(Filters(model="gpt-*"), ("user",)) == [(FULL, None, None)]
    assert spans(Filters(key="k", outcome="ok"), ("day",)) == [(FULL, None, None)]
    since = datetime(2026, 3, 3, 12, 34, 56, tzinfo=UTC)
    assert spans(Filters(since=since, key="k"), ("user",)) == [
        ("rows", since, datetime(2026, 3, 3, 13, tzinfo=UTC)),
        (FULL, datetime(2026, 3, 3, 13, tzinfo=UTC), None),
    ]
    assert spans(Filters(since=since), ("user",))[1:] == [
        (HOURLY_USERS, datetime(2026, 3, 3, 13, tzinfo=UTC), datetime(2026, 3, 4, tzinfo=UTC)),
        (USERS, datetime(2026, 3, 4, tzinfo=UTC), None),
    ]


def test_tags_status_and_stream_are_not_in_the_rollups() -> None:
    assert usage.answerable(Filters(model="m", user="u", key="k", outcome="ok", api="chat"), ("day",))
    assert not usage.answerable(Filters(tags=(("team", "a"),)), ("day",))
    assert not usage.answerable(Filters(status=200), ("day",))
    assert not usage.answerable(Filters(stream=True), ("day",))


moments = st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)).map(
    lambda moment: moment.replace(microsecond=0)
)


@given(
    since=st.none() | moments,
    until=st.none() | moments,
    fields=st.sampled_from([("model",), ("user",), ("hour",), ("day", "api_key_hash"), ("user", "model")]),
)
def test_spans_cover_the_range_once(since: datetime | None, until: datetime | None, fields: tuple[str, ...]) -> None:
    if since is not None and until is not None and since >= until:
        since, until = until - timedelta(seconds=1), since + timedelta(seconds=1)
    found = sorted(
        usage.plan(Filters(since=since, until=until), fields),
        key=lambda span: span.start or datetime.min.replace(tzinfo=UTC),
    )
    assert found
    assert found[0].start == since
    assert found[-1].end == until
    for before, after in itertools.pairwise(found):
        assert before.end is not None
        assert before.end == after.start
    for span in found:
        assert span.start is None or span.end is None or span.start < span.end
        if span.source != "rows":  # rollups only at whole hours (days for daily tables)
            unit = timedelta(hours=1) if span.source.startswith("usage_hourly") else timedelta(days=1)
            for moment in (span.start, span.end):
                assert moment is None or (moment - usage.EPOCH) % unit == timedelta(0)
        else:
            assert span.end - span.start < timedelta(hours=1)


# ---- against the database ------------------------------------------------------------------------


@pytest.fixture
async def seeded(database_url: str) -> AsyncIterator[tuple[AsyncEngine, list[dict[str, Any]]]]:
    engine = create_engine(database_url)
    await upgrade(engine)
    rows = make_rows(90, base_time())
    # '' and NULL are different users, models and keys, and stay apart in the rollups
    for i, row in enumerate(rows[:12]):
        row["user"] = "" if i % 2 else None
        row["model"] = "" if i % 3 == 0 else row["model"]
        row["api_key_hash"] = "" if i % 4 == 1 else row["api_key_hash"]
    await insert_rows(engine, rows)
    yield engine, rows
    await engine.dispose()


async def test_empty_and_null_dimensions_are_separate_groups(seeded: Any) -> None:
    engine, rows = seeded
    async with engine.connect() as conn:
        for by, column in (("user", "user"), ("key", "api_key_hash"), ("model", "model")):
            found = await fetch_stats(conn, by, Filters())
            exact = await fetch_stats(conn, by, Filters(), exact=True)
            assert found.percentiles != "exact"
            assert exact.percentiles == "exact"
            counts = {row.key: row.requests for row in found.rows}
            assert counts == {row.key: row.requests for row in exact.rows}, by
            if by != "model":  # by model, a NULL model falls back to the requested one
                assert counts[""] == sum(r[column] == "" for r in rows) > 0
                assert counts[None] == sum(r[column] is None for r in rows) > 0
        found = await fetch_stats(conn, "day", Filters(user=""))
        assert found.percentiles != "exact"
        assert found.totals.requests == sum(r["user"] == "" for r in rows)


async def test_series_from_the_rollups_equals_the_rows(seeded: Any) -> None:
    engine, _ = seeded
    now = datetime.now(UTC)
    async with engine.connect() as conn:
        for case in filter_cases(base_time(now), now):
            filters = parse_filters(case.params)
            for bucket in ("hour", "day"):
                expected = series._top_models(await series._row_groups(conn, filters, bucket), 6)
                assert await series.fetch_series(conn, filters, bucket) == expected, (case.name, bucket)


async def test_headline_percentiles_from_the_histograms(seeded: Any) -> None:
    engine, rows = seeded
    durations = [r["duration_ms"] for r in rows if r["duration_ms"] is not None]
    async with engine.connect() as conn:
        rollup = await fetch_percentiles(conn, Filters(since=datetime.now(UTC) - timedelta(days=7)))
        exact = await fetch_percentiles(conn, Filters(), exact=True)
        empty = await fetch_percentiles(conn, Filters(since=datetime.now(UTC) + timedelta(days=1)))
    for found, p in zip(rollup, (0.5, 0.95), strict=True):
        assert within_histogram_resolution(found, durations, p)
    assert exact == pytest.approx((percentile(durations, 0.5), percentile(durations, 0.95)))
    assert empty == (None, None)


async def test_costs_from_the_rollups_are_exact(seeded: Any) -> None:
    """Whole hours and days come from integer pico-dollars: the sum is exact on SQLite too, where the rows'
    own SUM adds REALs."""
    engine, rows = seeded
    async with engine.connect() as conn:
        found = await fetch_stats(conn, "day", Filters())
    assert found.totals.cost == sum((r["cost"] for r in rows if r["cost"] is not None), Decimal(0))


async def test_stats_without_percentiles_skip_the_histograms(seeded: Any) -> None:
    """The dashboard's top lists show no percentiles: the same sums, read without the histogram columns."""
    engine, _ = seeded
    since = datetime.now(UTC) - timedelta(days=7)  # a range with sub-hour ends read from the rows
    async with engine.connect() as conn:
        for by in ("model", "user", "key", "tag", "upstream"):
            full = await fetch_stats(conn, by, Filters(since=since))
            lean = await fetch_stats(conn, by, Filters(since=since), percentiles=False)
            assert lean.percentiles == "none"
            assert all(row.p50_ms is None and row.p95_ms is None for row in (*lean.rows, lean.totals))
            keep = ("key", "requests", "errors", "prompt_tokens", "cost", "unknown_cost")
            assert [[getattr(r, n) for n in keep] for r in lean.rows] == [
                [getattr(r, n) for n in keep] for r in full.rows
            ]
            assert any(row.p50_ms is not None for row in full.rows)
