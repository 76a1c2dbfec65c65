"""proxy.queries: filter parsing, every filter, every stats grouping (with exact percentiles) on SQLite and
PostgreSQL, checked against an independent Python model of the same rows (tests/querydata.py)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fnmatch import fnmatchcase
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.credentials import key_fingerprint
from proxy.relay.request_ids import new_request_id
from proxy.store import filters, histogram, queries
from proxy.store import stats as stats_module
from proxy.store.engine import create_engine
from proxy.store.filters import FilterError, Filters, parse_filters, parse_time
from proxy.store.migrate import upgrade
from proxy.store.queries import fetch_completion, fetch_completions, iter_completions, short_id
from proxy.store.stats import fetch_stats

from .querydata import (
    KEY_LABELS,
    KEYS,
    base_time,
    expected_ids,
    expected_stats,
    filter_cases,
    group_keys,
    insert_rows,
    make_rows,
    within_histogram_resolution,
)

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


# ---- parsing (pure) -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - timedelta(minutes=30)),
        ("1h", NOW - timedelta(hours=1)),
        ("7d", NOW - timedelta(days=7)),
        ("2w", NOW - timedelta(weeks=2)),
        ("1h30m", NOW - timedelta(minutes=90)),
        ("45s", NOW - timedelta(seconds=45)),
        ("2026-03-01T10:00:00Z", datetime(2026, 3, 1, 10, tzinfo=UTC)),
        ("2026-03-01T12:00:00+02:00", datetime(2026, 3, 1, 10, tzinfo=UTC)),
        ("2026-03-01 10:00", datetime(2026, 3, 1, 10, tzinfo=UTC)),
        ("2026-03-01", datetime(2026, 3, 1, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    assert parse_time(text, "since", NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "1x", "h1", "", "2026-13-01", "1h foo"])
def test_parse_time_rejects_with_the_parameter_name(text: str) -> None:
    with pytest.raises(FilterError) as info:
        parse_time(text, "until", NOW)
    assert info.value.param == "until"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"modle": "x"}, "modle"),
        ({"status": "abc"}, "status"),
        ({"status": "700"}, "status"),
        ({"stream": "maybe"}, "stream"),
        ({"tag": ["team"]}, "tag"),
        ({"tag": ['bad"name=x']}, "tag"),
        ({"since": "soon"}, "since"),
        ({"since": "2026-03-02", "until": "2026-03-01"}, "until"),
        ({"user": ["a", "b"]}, "user"),
        ({"api": "graphql"}, "api"),
    ],
)
def test_parse_filters_names_the_bad_parameter(params: dict[str, Any], param: str) -> None:
    with pytest.raises(FilterError) as info:
        parse_filters(params, NOW)
    assert info.value.param == param


def test_parse_filters_values() -> None:
    filters = parse_filters(
        {
            "model": "gpt-*",
            "since": "1h",
            "tag": ["a=1", "b = two "],
            "status": "429",
            "stream": "no",
            "key": "x",
        },
        NOW,
    )
    assert filters == Filters(
        model="gpt-*",
        since=NOW - timedelta(hours=1),
        tags=(("a", "1"), ("b", "two")),
        status=429,
        stream=False,
        key="x",
    )


@pytest.mark.parametrize(
    "pattern",
    [
        "gpt-4o*",
        "*/gpt-4o",
        "gpt-4o-[!m]?2*",
        "[ab]*",
        "a.b*",
        "x+y?",
        "[!]]*",
        "[",
        "*[a-c]",
        "a\\b*",
        "(x)|y",
    ],
)
def test_glob_to_postgres_regex_agrees_with_fnmatch(pattern: str) -> None:
    import re

    names = [
        "gpt-4o",
        "gpt-4o-2024-08-06",
        "gpt-4o-mini",
        "openai/gpt-4o",
        "a.b",
        "axb",
        "x+yz",
        "xxyz",
        "]a",
        "[",
        "ab",
        "bc",
        "zc",
        "a\\bc",
        "(x)|y",
        "y",
        "b",
    ]
    regex = re.compile(filters._glob_regex(pattern))  # PostgreSQL ARE and Python agree on this subset
    for name in names:
        assert bool(regex.search(name)) == fnmatchcase(name, pattern), (pattern, name)


def test_key_hash() -> None:
    fingerprint = key_fingerprint("sk-whatever")
    assert filters.key_hash("sk-whatever") == fingerprint
    assert filters.key_hash(fingerprint) == fingerprint
    assert filters.key_hash("0123456789abcdef") == "0123456789abcdef"
    assert filters.key_hash("not-a-hash") == key_fingerprint("not-a-hash")


# ---- against the database -----------------------------------------------------------------------


class Seeded:
    def __init__(
        self, engine: AsyncEngine, rows: list[dict[str, Any]], start: datetime, now: datetime
    ) -> None:
        self.engine, self.rows, self.start, self.now = engine, rows, start, now


@pytest.fixture
async def seeded(database_url: str) -> AsyncIterator[Seeded]:
    engine = create_engine(database_url)
    await upgrade(engine)
    now = datetime.now(UTC)
    start = base_time(now)
    rows = make_rows(start=start)
    await insert_rows(engine, rows)
    yield Seeded(engine, rows, start, now)
    await engine.dispose()


async def test_every_filter(seeded: Seeded) -> None:
    async with seeded.engine.connect() as conn:
        for case in filter_cases(seeded.start, seeded.now):
            expected = expected_ids(seeded.rows, case)
            assert expected, f"{case.name}: the fixture must have matching rows"
            assert len(expected) < len(seeded.rows) or case.name == "since relative", case.name
            found = await fetch_completions(conn, parse_filters(case.params), limit=0)
            assert [row["id"] for row in found] == expected, case.name


async def test_rows_have_every_column_and_their_choices(seeded: Seeded) -> None:
    by_id = {row["id"]: row for row in seeded.rows}
    async with seeded.engine.connect() as conn:
        found = await fetch_completions(conn, Filters(), limit=5)
        assert [row["id"] for row in found] == sorted(by_id, reverse=True)[:5]
        for row in found:
            source = by_id[row["id"]]
            assert set(row) == set(queries.COLUMNS) | {"choices"}
            for name, value in source.items():
                if name == "cost" and value is not None:
                    assert row["cost"] == value
                else:
                    assert row[name] == value, name
        assert await fetch_completions(conn, Filters(), limit=3, before_id=found[1]["id"]) == found[2:5]


async def test_fetch_one_by_request_id_completion_id_or_prefix(seeded: Seeded) -> None:
    target = next(row for row in seeded.rows if len(row["choices"]) == 2)
    async with seeded.engine.connect() as conn:
        request_id = target["request_id"]
        for ident in (request_id, target["completion_id"], request_id[-8:], request_id[:8]):
            found = await fetch_completion(conn, ident)
            assert [row["id"] for row in found] == [target["id"]], ident
            assert [c["finish_reason"] for c in found[0]["choices"]] == [
                c["finish_reason"] for c in target["choices"]
            ]
        assert await fetch_completion(conn, "no-such-id") == []
        assert await fetch_completion(conn, "%%%%%%") == []  # a prefix is not a LIKE pattern


def test_short_ids_tell_apart_calls_of_the_same_minute() -> None:
    """Request ids are UUIDv7: their first characters are the time, the same for every call in a minute,
    so the short id `logs` prints (and `logs show` takes) is the random end."""
    ids = [new_request_id() for _ in range(200)]  # 32 random bits each: a repeat is a 1-in-200,000 chance
    assert len({request_id[:8] for request_id in ids}) <= 2
    assert len({short_id(request_id) for request_id in ids}) == len(ids)
    assert all(request_id.endswith(short_id(request_id)) for request_id in ids)


def _compare_stats(found: Any, rows: list[dict[str, Any]], by: str, exact_cost: bool) -> None:
    expected, totals = expected_stats(rows, by)
    durations: dict[Any, list[float]] = {}
    for row in rows:
        for key in group_keys(row, by):
            if row["duration_ms"] is not None:
                durations.setdefault(key, []).append(row["duration_ms"])
    got = [row.as_dict() for row in found.rows]
    assert [g["key"] for g in got] == [e["key"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        g.pop("label", None)
        for name in ("p50_ms", "p95_ms"):
            if e[name] is None:
                assert g[name] is None, (by, e["key"], name)
            elif found.percentiles == "exact":
                assert math.isclose(g[name], e[name], rel_tol=1e-9), (by, e["key"], name, g[name], e[name])
            else:  # from the rollups' histograms: within one bucket's width (ratio 1.3) of the exact value
                p = 0.5 if name == "p50_ms" else 0.95
                assert within_histogram_resolution(g[name], durations[e["key"]], p), (by, e["key"], name, g[name])
        if e["cost"] is not None and not exact_cost:  # SQLite sums REAL
            assert abs(g["cost"] - e["cost"]) < Decimal("1e-9"), (by, e["key"])
            g["cost"] = e["cost"]
        assert {k: v for k, v in g.items() if k not in ("p50_ms", "p95_ms")} == {
            k: v for k, v in e.items() if k not in ("p50_ms", "p95_ms")
        }, (by, e["key"])
    total = found.totals.as_dict()
    for name in ("requests", "errors", "prompt_tokens", "unknown_cost"):
        assert total[name] == totals[name], (by, name)
    assert abs(total["cost"] - totals["cost"]) < Decimal("1e-9")


@pytest.mark.parametrize(
    "by", ["model", "day", "hour", "user", "key", "tag", "tag:team", "provider", "upstream", "api"]
)
@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
async def test_stats_by_every_dimension(seeded: Seeded, by: str, exact: bool) -> None:
    async with seeded.engine.connect() as conn:
        found = await fetch_stats(conn, by, Filters(), exact=exact)
        exact_cost = conn.dialect.name == "postgresql" or not exact
    # the rollups answer every grouping, unless asked for the rows
    assert found.percentiles == ("exact" if exact else histogram.RESOLUTION)
    _compare_stats(found, seeded.rows, by, exact_cost)
    if by == "key":
        labels = {row.key: row.label for row in found.rows}
        for fingerprint, label in KEY_LABELS.items():
            assert labels[fingerprint] == label
        assert labels[key_fingerprint(KEYS[2])] is None


@pytest.mark.parametrize("by", ["model", "day", "hour", "user", "key", "tag"])
async def test_stats_with_filters(seeded: Seeded, by: str) -> None:
    """Every filter: the rollups answer those they hold (time edges under an hour from the rows), the rows
    the others (tags, status, stream); both give the rows' sums."""
    async with seeded.engine.connect() as conn:
        exact = conn.dialect.name == "postgresql"
        for case in filter_cases(seeded.start, seeded.now):
            found = await fetch_stats(conn, by, parse_filters(case.params))
            rollups = not {"tag", "status", "stream"} & set(case.params)
            if by == "tag":  # the tag tables hold no other dimension: only a time range may filter
                rollups = set(case.params) <= {"since", "until"}
            assert found.percentiles == (histogram.RESOLUTION if rollups else "exact"), case.name
            _compare_stats(found, [r for r in seeded.rows if case.matches(r)], by, exact)


async def test_stats_tag_totals_count_each_row_once(seeded: Seeded) -> None:
    async with seeded.engine.connect() as conn:
        found = await fetch_stats(conn, "tag", Filters())
    assert sum(row.requests for row in found.rows) > len(seeded.rows)  # rows with two tags count twice ...
    assert found.totals.requests == len(seeded.rows)  # ... but once in the totals


async def test_sqlite_percentile_fallbacks_agree(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path for very many groups gives the same numbers as the usual one."""
    async with seeded.engine.connect() as conn:
        usual = {by: await fetch_stats(conn, by, Filters(), exact=True) for by in ("model", "hour")}
        monkeypatch.setattr(stats_module, "MAX_WANTED_RANKS", 2)
        for by, stats in usual.items():
            again = await fetch_stats(conn, by, Filters(), exact=True)
            assert [r.as_dict() for r in again.rows] == [r.as_dict() for r in stats.rows]


async def test_stats_of_nothing(seeded: Seeded) -> None:
    async with seeded.engine.connect() as conn:
        found = await fetch_stats(conn, "model", Filters(user="nobody"))
    assert found.rows == []
    assert found.totals.requests == 0
    assert found.totals.cost is None


async def test_iter_completions_streams_oldest_first_with_choices(seeded: Seeded) -> None:
    rows = [row async for row in iter_completions(seeded.engine, Filters(stream=True), chunk=4)]
    expected = sorted(r["id"] for r in seeded.rows if r["stream"])
    assert [row["id"] for row in rows] == expected
    by_id = {row["id"]: row for row in seeded.rows}
    assert all(len(row["choices"]) == len(by_id[row["id"]]["choices"]) for row in rows)
    limited = [row async for row in iter_completions(seeded.engine, Filters(), limit=7, chunk=3)]
    assert [row["id"] for row in limited] == sorted(by_id)[:7]


async def test_filter_values_are_bound_not_spliced(seeded: Seeded) -> None:
    hostile = "x' OR '1'='1"
    async with seeded.engine.connect() as conn:
        for params in (
            {"user": hostile},
            {"model": hostile + "*"},
            {"tag": [f"team={hostile}"]},
            {"key": hostile},
        ):
            assert await fetch_completions(conn, parse_filters(params), limit=0) == [], params
        # parse_filters refuses an unknown outcome; the clause still binds whatever it is given
        assert await fetch_completions(conn, Filters(outcome=hostile), limit=0) == []
