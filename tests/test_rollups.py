"""Rollups (usage_hourly and its narrower families) on SQLite and PostgreSQL: what the writer adds, what
reprice moves and what `db rollup --rebuild` and the migration compute all equal the sums of the rows as read
back, to the pico-USD and the histogram bucket. The histogram's own arithmetic is tested first."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.parse.record import ChoiceRecord, CompletionRecord
from proxy.store import histogram, rollup_write
from proxy.store.engine import create_engine
from proxy.store.insert import BatchWriter
from proxy.store.migrate import upgrade
from proxy.store.models import (
    ROLLUP_TABLES,
    TAG_TABLES,
    LedgerMeta,
    completions_table,
    usage_hourly_table,
)
from proxy.store.pricing.book import PriceBook, PriceEntry
from proxy.store.pricing.reprice import reprice
from proxy.store.rollup_rebuild import rebuild
from proxy.store.rollups import DIMENSIONS, VALUES, fold, fold_tags, pico_usd
from proxy.store.rows import record_to_row
from proxy.writer.recorder import BatchRecorder

from .helpers import eventually
from .querydata import run_cli

# ---- histogram ----------------------------------------------------------------------------------


def _slow_bucket(duration: float) -> int:
    i = 0
    while i < 55 and duration >= 5.0 * 1.3**i:
        i += 1
    return i


def test_bucket_bounds() -> None:
    assert histogram.BUCKETS == len(histogram.BUCKET_COLUMNS) == 56
    assert histogram.BUCKET_COLUMNS[0] == "h00"
    assert histogram.BUCKET_COLUMNS[-1] == "h55"
    assert histogram.bounds(0) == (0.0, 5.0)
    assert histogram.bounds(1) == (5.0, 5.0 * 1.3)
    assert histogram.bounds(55) == (5.0 * 1.3**54, None)
    for i in range(1, 55):
        lower, upper = histogram.bounds(i)
        assert upper == pytest.approx(lower * 1.3)
        assert histogram.bucket_of(lower) == i
        assert histogram.bucket_of(upper) == i + 1
        assert histogram.bucket_of((lower + upper) / 2) == i
        assert histogram.bounds(i - 1)[1] == lower
    assert histogram.bucket_of(0.0) == histogram.bucket_of(4.999) == 0
    assert histogram.bucket_of(-1.0) == 0
    assert histogram.bucket_of(1e12) == histogram.bucket_of(float("inf")) == 55
    with pytest.raises(IndexError):
        histogram.bounds(56)
    assert "±15%" in histogram.RESOLUTION
    assert "56" in histogram.RESOLUTION


def test_bucket_of_matches_the_definition() -> None:
    rng = random.Random(7)
    for duration in [rng.lognormvariate(6, 3) for _ in range(5000)] + [5.0 * 1.3**k for k in range(60)]:
        assert histogram.bucket_of(duration) == _slow_bucket(duration), duration


def _percentile_cont(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    rank = p * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def test_percentile_is_within_a_bucket_of_the_exact_one() -> None:
    rng = random.Random(3)
    for _ in range(50):
        values = [rng.lognormvariate(rng.uniform(2, 9), rng.uniform(0.1, 2)) for _ in range(rng.randint(1, 400))]
        counts = [0] * 56
        for value in values:
            counts[histogram.bucket_of(value)] += 1
        for p in (0.0, 0.5, 0.9, 0.95, 0.99, 1.0):
            exact = _percentile_cont(values, p)
            found = histogram.percentile(counts, p)
            assert found is not None
            # both lie in the span of the buckets holding the two values the exact one interpolates between
            ordered = sorted(values)
            rank = p * (len(values) - 1)
            low, _ = histogram.bounds(histogram.bucket_of(ordered[int(rank)]))
            upper = histogram.bounds(histogram.bucket_of(ordered[min(int(rank) + 1, len(values) - 1)]))[1]
            assert low <= exact <= (upper or exact)
            assert low <= found <= (upper or found), (p, exact, found)


def test_percentile_edges() -> None:
    assert histogram.percentile([0] * 56, 0.5) is None
    assert histogram.percentile([], 0.5) is None
    one = [0] * 56
    one[10] = 1
    low, high = histogram.bounds(10)
    assert histogram.percentile(one, 0.5) == pytest.approx((low + high) / 2)  # a lone value: mid-bucket
    first = [4] + [0] * 55
    assert 0 < histogram.percentile(first, 0.5) < 5.0  # type: ignore[operator]  # bucket 0 starts at 0
    last = [0] * 55 + [3]
    assert histogram.percentile(last, 0.99) == histogram.bounds(55)[0]  # the open bucket: its lower bound
    spread = [0] * 56
    spread[3], spread[20] = 50, 50
    assert histogram.percentile(spread, 0.25) < histogram.bounds(4)[0]  # type: ignore[operator]
    assert histogram.percentile(spread, 0.75) >= histogram.bounds(20)[0]  # type: ignore[operator]
    with pytest.raises(ValueError, match="outside"):
        histogram.percentile(spread, 1.5)


def test_pico_usd_is_exact() -> None:
    assert pico_usd(Decimal("0.000123456789")) == 123456789
    assert pico_usd(0.1) == 100_000_000_000
    assert pico_usd(Decimal("1.0000000000005")) == 1_000_000_000_001  # half away from zero, as NUMERIC
    assert pico_usd(Decimal("-0.0000000000005")) == -1
    assert pico_usd(3) == 3_000_000_000_000


# ---- rows and what the tables must hold -----------------------------------------------------------

T0 = datetime(2026, 11, 20, 22, 30, tzinfo=UTC)  # near midnight: a day's hours and the next day's
BOUNDARIES = [5.0 * 1.3**k for k in range(0, 56, 5)]


def make_records(count: int, seed: int = 1, start: datetime = T0) -> list[CompletionRecord]:
    """Rows over a few hours either side of midnight and a later day, with NULL and '' dimension values,
    durations at bucket bounds, costs of up to 13 decimal places, unknown costs and durations."""
    rng = random.Random(seed)
    records = []
    for n in range(count):
        offset = timedelta(minutes=rng.choice([0, 20, 50, 95, 140, 60 * 24 * 3 + 7]) + rng.random())
        record = CompletionRecord(
            request_id=str(uuid.uuid4()),
            started_at=start + offset,
            method="POST",
            path="/v1/chat/completions",
            upstream=rng.choice(["https://a.example", "https://b.example", ""]),
            outcome=rng.choice(["ok", "ok", "ok", "upstream_error", "timeout"]),
            stream=bool(n % 2),
            requested_model=rng.choice(["gpt-4o", None, ""]),
            model=rng.choice(["gpt-4o-2024-08-06", "claude", None, ""]),
            provider=rng.choice(["OpenAI", None, ""]),
            api=rng.choice(["chat", "messages", None]),
            api_key_hash=rng.choice(["0123456789abcdef", None, ""]),
            user=rng.choice(["alice", "bob", None, ""]),
            duration_ms=rng.choice(
                [None, 0.0, 4.999, rng.choice(BOUNDARIES), rng.uniform(5, 90_000), 1e9, round(rng.uniform(1, 9e3), 3)]
            ),
            prompt_tokens=rng.choice([None, 0, rng.randint(1, 100_000)]),
            completion_tokens=rng.choice([None, rng.randint(1, 5000)]),
            total_tokens=rng.choice([None, rng.randint(1, 105_000)]),
            cached_tokens=rng.choice([None, rng.randint(0, 1000)]),
            cache_write_tokens=rng.choice([None, rng.randint(0, 1000)]),
            reasoning_tokens=rng.choice([None, rng.randint(0, 1000)]),
            cost=rng.choice(
                [
                    None,
                    Decimal(rng.randint(0, 10**9)).scaleb(-12),
                    Decimal(rng.randint(0, 10**12)).scaleb(-12),
                    Decimal(rng.randint(0, 10**6) * 10 + 3).scaleb(-13),  # a 13th decimal, not a tie
                ]
            ),
            cost_source="upstream",
            tags=rng.choice([None, {}, {"team": "search"}, {"team": "ads", "env": "prod"}, {"env": ""}]),
            choices=[ChoiceRecord(0, "stop", None, "assistant")],
        )
        records.append(record)
    return records


def _bucket_column(duration: float) -> str:
    return f"h{_slow_bucket(duration):02d}"


MODEL_DIMENSIONS = ("model", "requested_model", "api", "upstream", "provider", "outcome")
TABLES = (  # (name, period, dimensions), the order of models.ROLLUP_TABLES
    ("usage_hourly", "hour", DIMENSIONS),
    ("usage_hourly_totals", "hour", ()),
    ("usage_daily_totals", "day", ()),
    ("usage_hourly_models", "hour", ("model", "requested_model")),
    ("usage_daily_models", "day", ("model", "requested_model")),
    ("usage_hourly_keys", "hour", ("api_key_hash",)),
    ("usage_daily_keys", "day", ("api_key_hash",)),
    ("usage_hourly_routes", "hour", MODEL_DIMENSIONS),
    ("usage_daily_routes", "day", MODEL_DIMENSIONS),
    ("usage_hourly_users", "hour", ("user",)),
    ("usage_daily_users", "day", ("user",)),
)


def test_the_tables_are_the_expected_ones() -> None:
    assert [(t.name, [c.name for c in t.primary_key.columns]) for t in ROLLUP_TABLES] == [
        (name, [period, *dimensions, "null_dims"]) for name, period, dimensions in TABLES
    ]


def expected(rows: Sequence[dict[str, Any]]) -> tuple[dict[Any, dict[str, int]], ...]:
    """Every table's contents, computed from the rows as read back."""
    tables: tuple[dict[Any, Counter[str]], ...] = tuple({} for _ in TABLES)
    tag_tables: tuple[dict[Any, Counter[str]], ...] = ({}, {})  # usage_hourly_tags, usage_daily_tags
    for row in rows:
        hour = int(row["started_at"].timestamp()) // 3600
        assert row["started_hour"] == hour
        null_dims = sum(1 << i for i, name in enumerate(DIMENSIONS) if row[name] is None)
        values = {name: "" if row[name] is None else row[name] for name in DIMENSIONS}
        delta: Counter[str] = Counter(requests=1, errors=int(row["outcome"] != "ok"))
        for name in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "cache_write_tokens",
                     "reasoning_tokens"):  # fmt: skip
            delta[name] += row[name] or 0
        if row["cost"] is not None:
            pico = row["cost"] * 10**12
            assert pico == pico.to_integral_value()
            delta["priced"] += 1
            delta["cost_pusd"] += int(pico)
        if row["duration_ms"] is not None:
            delta["timed"] += 1
            delta[_bucket_column(row["duration_ms"])] += 1
        keys = [
            (
                hour if period == "hour" else hour // 24,
                *(values[name] for name in dimensions),
                sum(1 << i for i, name in enumerate(DIMENSIONS) if name in dimensions and row[name] is None),
            )
            for _, period, dimensions in TABLES
        ]
        assert keys[0][-1] == null_dims
        for table, key in zip(tables, keys, strict=True):
            table.setdefault(key, Counter()).update(delta)
        for name, value in (row["tags"] or {"": ""}).items():  # each tag pair; no tags: ('', '')
            tag_tables[0].setdefault((hour, name, value), Counter()).update(delta)
            tag_tables[1].setdefault((hour // 24, name, value), Counter()).update(delta)
    return tuple(
        {key: {name: sums[name] for name in VALUES} for key, sums in table.items()} for table in (*tables, *tag_tables)
    )


async def read_rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(select(completions_table))]


async def read_rollups(engine: AsyncEngine) -> tuple[dict[Any, dict[str, int]], ...]:
    found = []
    async with engine.connect() as conn:
        for table in (*ROLLUP_TABLES, *TAG_TABLES):
            keys = [column.name for column in table.primary_key.columns]
            contents = {}
            for row in await conn.execute(select(table)):
                values = row._mapping
                contents[tuple(values[name] for name in keys)] = {name: int(values[name]) for name in VALUES}
            found.append(contents)
    return tuple(found)


async def assert_rollups_match_rows(engine: AsyncEngine) -> tuple[dict[Any, dict[str, int]], ...]:
    rows = await read_rows(engine)
    want = expected(rows)
    got = await read_rollups(engine)
    names = [name for name, _, _ in TABLES] + ["usage_hourly_tags", "usage_daily_tags"]
    for name, wanted, have in zip(names, want, got, strict=True):
        assert set(have) == set(wanted), name
        for key in wanted:
            assert have[key] == wanted[key], (name, key)
    return got


async def write(engine: AsyncEngine, records: Sequence[CompletionRecord], **options: Any) -> Sequence[Any]:
    writer = BatchWriter(engine.dialect.name)
    async with engine.begin() as conn:
        return await writer.insert(conn, [record_to_row(r) for r in records], **options)


@pytest.fixture
async def engine(database_url: str) -> Any:
    engine = create_engine(database_url)
    await upgrade(engine)
    yield engine
    await engine.dispose()


# ---- the writer ---------------------------------------------------------------------------------------


async def test_writer_rollups_equal_the_rows(engine: AsyncEngine) -> None:
    records = make_records(900)
    for start in range(0, len(records), 300):  # later batches add to the groups earlier ones created
        await write(engine, records[start : start + 300])
    found = dict(zip([name for name, _, _ in TABLES], await assert_rollups_match_rows(engine), strict=False))
    hourly, daily, users = found["usage_hourly"], found["usage_daily_routes"], found["usage_daily_users"]
    assert len(hourly) > len(daily) > 10
    assert len(users) == 3 * 4
    # NULL and '' are two groups, told apart by null_dims
    assert {(key[1], key[2]) for key in users} >= {("", 0), ("", 64)}
    assert sum(sums["requests"] for sums in daily.values()) == 900


async def test_recorder_rollups_equal_the_rows(engine: AsyncEngine, tmp_path: Path) -> None:
    recorder = BatchRecorder(engine, tmp_path / "spool", batch_max=37)
    await recorder.start()
    for record in make_records(400, seed=5):
        recorder.submit(record)
    await recorder.wait_idle()
    await recorder.close()
    daily = (await assert_rollups_match_rows(engine))[8]
    assert sum(sums["requests"] for sums in daily.values()) == 400


async def test_replayed_rows_are_not_counted_twice(engine: AsyncEngine) -> None:
    records = make_records(200, seed=2)
    await write(engine, records[:120])
    before = await assert_rollups_match_rows(engine)
    inserted = await write(engine, [*records[:120], *records[100:200]], skip_existing=True)
    assert len(inserted) == 80
    after = await assert_rollups_match_rows(engine)
    assert sum(s["requests"] for s in after[1].values()) - sum(s["requests"] for s in before[1].values()) == 80


async def test_a_failing_rollup_upsert_fails_the_batch_and_replay_counts_it_once(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """The rows and their sums commit together: with a rollup table gone the batch goes to the spool, none
    of it committed; once the table is back, replay writes every row and adds it once."""
    recorder = BatchRecorder(engine, tmp_path / "spool", batch_max=50)
    await recorder.start()
    records = make_records(300, seed=21)
    for record in records[:100]:
        recorder.submit(record)
    await recorder.wait_idle()
    async with engine.begin() as conn:
        await conn.exec_driver_sql("ALTER TABLE usage_daily_users RENAME TO usage_daily_users_away")
    for record in records[100:200]:
        recorder.submit(record)
    await eventually(lambda: recorder.spool.backlog()[0] > 0, state=recorder.stats)
    assert len(await read_rows(engine)) == 100
    async with engine.begin() as conn:
        await conn.exec_driver_sql("ALTER TABLE usage_daily_users_away RENAME TO usage_daily_users")
    for record in records[200:]:
        recorder.submit(record)
    await eventually(lambda: recorder.spool.backlog()[0] == 0 and recorder.stats().database_ok, state=recorder.stats)
    await recorder.wait_idle()
    await recorder.close()
    assert recorder.rows_rejected == 0
    daily = (await assert_rollups_match_rows(engine))[8]
    assert sum(sums["requests"] for sums in daily.values()) == 300


async def test_rows_the_database_refuses_are_not_counted(engine: AsyncEngine, tmp_path: Path) -> None:
    recorder = BatchRecorder(engine, tmp_path / "spool")
    await recorder.start()
    records = make_records(40, seed=23)
    records[7].method = None  # NOT NULL: refused by every database, and with it the first try of its batch
    for record in records:
        recorder.submit(record)
    await eventually(lambda: recorder.rows_rejected == 1 and recorder.rows_replayed == 39, state=recorder.stats)
    await recorder.close()
    daily = (await assert_rollups_match_rows(engine))[8]
    assert sum(sums["requests"] for sums in daily.values()) == 39


async def test_concurrent_writers_add_to_the_same_groups(database_url: str) -> None:
    """Two writers (two engines, as two proxy instances) adding to the same groups at once, each batch
    meeting them in the opposite order: each locks the rollup rows in key order, so neither waits for the
    other in a cycle, and every row counts once."""
    engines = [create_engine(database_url) for _ in range(2)]
    try:
        await upgrade(engines[0])
        rng = random.Random(31)
        records = make_records(2000, seed=31)
        for record in records:
            record.started_at = T0 + timedelta(minutes=rng.randint(0, 59)) - timedelta(minutes=30)
            record.model, record.user = rng.choice(["a", "b", "c"]), rng.choice(["u1", "u2", "u3", "u4", None])
            record.upstream, record.provider, record.api, record.outcome = "u", "p", "chat", "ok"

        def order(record: CompletionRecord) -> tuple[str, str]:
            return record.model or "", record.user or ""

        async def writer(engine: AsyncEngine, part: list[CompletionRecord], reverse: bool) -> None:
            for start in range(0, len(part), 50):
                await write(engine, sorted(part[start : start + 50], key=order, reverse=reverse))

        await asyncio.gather(
            writer(engines[0], records[:1000], reverse=False), writer(engines[1], records[1000:], reverse=True)
        )
        daily = (await assert_rollups_match_rows(engines[0]))[8]
        assert sum(sums["requests"] for sums in daily.values()) == 2000
    finally:
        for engine in engines:
            await engine.dispose()


def test_upserts_go_in_key_order_whatever_order_the_rows_came_in() -> None:
    """The order writers lock rollup rows in on PostgreSQL: sorted keys, the same for every writer."""
    rows = [record_to_row(r) for r in make_records(300, seed=37)]

    def folded(rows: list[dict[str, Any]]) -> tuple[Any, ...]:
        return (*fold(rows), *fold_tags(rows))

    assert list(rollup_write.sqlite_plan(folded(rows))) == list(rollup_write.sqlite_plan(folded(rows[::-1])))
    forward = list(rollup_write.postgres_plan(folded(rows)))
    backward = list(rollup_write.postgres_plan(folded(rows[::-1])))
    assert len(forward) == len(backward) == len(TABLES) + 2
    for (_, arrays), (_, reversed_arrays) in zip(forward, backward, strict=True):
        assert arrays[:-3] == reversed_arrays[:-3]  # (the last three: each group's non-zero buckets)
        keys = list(zip(*arrays[: -3 - len(rollup_write.MEASURES)], strict=True))
        assert keys == sorted(keys)
        assert len(keys) == len(set(keys)) > 1


def test_fold_of_a_row_without_every_column() -> None:
    row = record_to_row(make_records(1)[0])
    del row["provider"]  # an older spool line
    hourly, *narrower = fold([row])
    (key,) = hourly
    assert key[DIMENSIONS.index("provider") + 1] == ""
    assert key[-1] & (1 << DIMENSIONS.index("provider"))
    assert [len(sums) for sums in narrower] == [1] * (len(TABLES) - 1)


# ---- reprice ----------------------------------------------------------------------------------------


async def test_reprice_keeps_rollups_equal_to_the_rows(engine: AsyncEngine) -> None:
    records = make_records(300, seed=4)
    for n, record in enumerate(records):
        record.model = "gpt-4o" if n % 2 else record.model
        record.prompt_tokens, record.completion_tokens = 1000 + n, 10 * n
        record.cost_source = "pricing" if record.cost is not None else None
    await write(engine, records)
    await assert_rollups_match_rows(engine)
    book = PriceBook([PriceEntry("gpt-4o", T0 - timedelta(days=30), Decimal("2.5"), Decimal("10.123456"))])
    report = await reprice(engine, book, T0 - timedelta(days=1), None)
    assert report.rows_changed > 100
    await assert_rollups_match_rows(engine)
    before = await read_rollups(engine)
    dry = await reprice(engine, PriceBook([]), T0 - timedelta(days=1), None, dry_run=True)
    assert dry.rows_changed > 0
    assert await read_rollups(engine) == before
    await reprice(engine, PriceBook([]), T0 - timedelta(days=1), None)  # every priced row unpriced again
    daily = (await assert_rollups_match_rows(engine))[8]
    priced_upstream = sum(1 for r in records if r.cost is not None and r.cost_source != "pricing")
    assert sum(s["priced"] for s in daily.values()) == priced_upstream


# ---- rebuild ------------------------------------------------------------------------------------------


async def _rollup_cli(capsys: Any, url: str, *args: str) -> dict[str, Any]:
    code, out, err = await run_cli(capsys, "db", "rollup", "--rebuild", "--database", url, "--json", *args)
    assert code == 0, err
    report: dict[str, Any] = orjson.loads(out)
    return report


async def test_rebuild_gives_what_the_writer_gave(
    engine: AsyncEngine, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await write(engine, make_records(700, seed=9))
    incremental = await assert_rollups_match_rows(engine)
    async with engine.begin() as conn:  # wrong sums, to be replaced
        await conn.execute(usage_hourly_table.update().values(requests=usage_hourly_table.c.requests + 5))
        await conn.execute(ROLLUP_TABLES[8].delete())
        await conn.execute(ROLLUP_TABLES[-1].update().values(h07=99))
    report = await _rollup_cli(capsys, database_url)
    assert report["days"] == 4  # the first day through the last, the empty days between included
    assert report["rows"] == 700
    assert await read_rollups(engine) == incremental


async def test_rebuild_since_and_the_prune_horizon(
    engine: AsyncEngine, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await write(engine, make_records(500, seed=11))
    incremental = await assert_rollups_match_rows(engine)
    first_day = (int(T0.timestamp()) // 3600) // 24
    async with engine.begin() as conn:  # mark every day's rollups, to see which days a rebuild replaced
        for table in (*ROLLUP_TABLES, *TAG_TABLES):
            await conn.execute(table.update().values(h55=table.c.h55 + 1000))

    def replaced(rollups: tuple[dict[Any, dict[str, int]], ...]) -> set[int]:
        days = set()
        for n, table in enumerate(rollups):
            for key, sums in table.items():
                periods = [period for _, period, _ in TABLES] + ["hour", "day"]  # then the tag tables
                day = key[0] // 24 if periods[n] == "hour" else key[0]
                if sums == incremental[n][key]:
                    days.add(day)
                else:
                    assert sums["h55"] > incremental[n][key]["h55"]
        return days

    # --since mid-day: that whole day on (floored to its start)
    since = (T0 + timedelta(hours=3)).isoformat()  # the next day, 01:30
    report = await _rollup_cli(capsys, database_url, "--since", since)
    assert report["first_day"] == (T0 + timedelta(days=1)).date().isoformat()
    assert replaced(await read_rollups(engine)) == {first_day + 1, first_day + 3}

    # the prune horizon: days before it are never touched, whatever --since says
    async with engine.begin() as conn:
        await conn.execute(
            insert(LedgerMeta.__table__).values(
                key="pruned_before", value=f"{(T0 + timedelta(days=3)).date()}T00:00:00Z"
            )
        )
    async with engine.begin() as conn:
        for table in (*ROLLUP_TABLES, *TAG_TABLES):
            await conn.execute(table.update().values(h55=table.c.h55 + 1000))
    report = await _rollup_cli(capsys, database_url, "--since", "2000-01-01")
    assert report["pruned_before"].startswith((T0 + timedelta(days=3)).date().isoformat())
    assert report["days"] == 1
    assert replaced(await read_rollups(engine)) == {first_day + 3}

    # rows before the horizon deleted (as pruning does): their rollups stay, the only record of them
    async with engine.begin() as conn:
        await conn.execute(completions_table.delete().where(completions_table.c.started_hour < (first_day + 3) * 24))
    report = await rebuild(engine)
    assert report.days == 1
    still = await read_rollups(engine)
    assert {key[0] // 24 for key in still[0]} == {first_day, first_day + 1, first_day + 3}


async def test_rebuild_of_an_empty_ledger(engine: AsyncEngine) -> None:
    report = await rebuild(engine)
    assert (report.days, report.rows) == (0, 0)
    await write(engine, make_records(10, seed=41))
    report = await rebuild(engine, datetime(1990, 1, 1, tzinfo=UTC))  # from the first day with rows, not 1990
    assert (report.days, report.rows) == (4, 10)
    assert report.first_day == T0.date().isoformat()
    report = await rebuild(engine, T0 + timedelta(days=30))
    assert (report.days, report.rows) == (0, 0)
    await assert_rollups_match_rows(engine)


# ---- the migration --------------------------------------------------------------------------------


async def test_migration_fills_rollups_from_existing_rows(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade(engine, "0005")
        rows = []
        for record in make_records(600, seed=13):
            row = record_to_row(record)
            del row["choices"]
            rows.append(row)
        async with engine.begin() as conn:
            await conn.execute(insert(completions_table), rows)
        await upgrade(engine)
        daily = (await assert_rollups_match_rows(engine))[8]
        assert sum(sums["requests"] for sums in daily.values()) == 600
        async with engine.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(usage_hourly_table))).scalar_one() > 100
    finally:
        await engine.dispose()
