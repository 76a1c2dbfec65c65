"""Retention: prune deletes exactly the calls before the day-floored cut with their choices, in batches,
records how far the ledger was pruned, and gives SQLite pages back; on SQLite and PostgreSQL. Rows go in
through the writer's own insert path (store.insert.BatchWriter)."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import aiohttp
import orjson
import pytest
from sqlalchemy import event, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.config import ConfigError, RetentionConfig, load
from proxy.parse.record import ChoiceRecord, CompletionRecord
from proxy.store.engine import create_engine
from proxy.store.insert import BatchWriter
from proxy.store.migrate import upgrade
from proxy.store.models import choices_table, completions_table
from proxy.store.queries import fetch_completion
from proxy.store.retention import PRUNED_BEFORE, day_floor, meta, prune, pruned_before, read_meta, record_pruned_before
from proxy.store.rows import record_to_row
from proxy.writer.retention import RUN_AT, Retention, claim, stamp

from .conftest import Ledger, make_config, start_ledger
from .helpers import eventually
from .querydata import run_cli
from .test_cli import run as run_process
from .upstream import FakeUpstream

NOW = datetime(2026, 12, 5, 15, 30, tzinfo=UTC)


def record(started_at: datetime, n: int, *, choices: int = 1, completion_id: str | None = None) -> CompletionRecord:
    return CompletionRecord(
        request_id=str(uuid.uuid4()),
        started_at=started_at,
        method="POST",
        path="/v1/chat/completions",
        upstream="https://api.example",
        outcome="ok",
        model="gpt-4o",
        completion_id=completion_id or f"chatcmpl-{uuid.uuid4().hex}",
        prompt_tokens=n,
        choices=[ChoiceRecord(i, "stop", None, "assistant") for i in range(choices)],
    )


async def insert_records(engine: AsyncEngine, records: list[CompletionRecord]) -> None:
    writer = BatchWriter(engine.dialect.name)
    async with engine.begin() as conn:
        await writer.insert(conn, [record_to_row(r) for r in records])


async def remaining(engine: AsyncEngine) -> tuple[set[datetime], int]:
    async with engine.connect() as conn:
        times = set((await conn.execute(select(completions_table.c.started_at))).scalars())
        choices = (await conn.execute(select(func.count()).select_from(choices_table))).scalar_one()
    return times, choices


@pytest.fixture
async def engine(database_url: str) -> Any:
    engine = create_engine(database_url)
    await upgrade(engine)
    yield engine
    await engine.dispose()


def spread(days: int = 10, per_day: int = 6) -> list[CompletionRecord]:
    """Calls every 4 hours over `days` days before NOW, one just before and one at each midnight."""
    records = []
    for day in range(days):
        midnight = (NOW - timedelta(days=day)).replace(hour=0, minute=0, second=0, microsecond=0)
        records.append(record(midnight, day, choices=2))
        records.append(record(midnight - timedelta(microseconds=1), day, choices=1))
        records += [record(midnight + timedelta(hours=4 * k, minutes=7), day, choices=k % 3) for k in range(1, per_day)]
    return records


async def test_prune_deletes_exactly_the_rows_before_the_day_floored_cut(engine: AsyncEngine) -> None:
    records = spread()
    await insert_records(engine, records)
    before = NOW - timedelta(days=4)  # 11:30 four days ago: floored to that midnight
    cut = datetime(2026, 12, 1, tzinfo=UTC)
    report = await prune(engine, before, batch_rows=7)
    doomed = [r for r in records if r.started_at < cut]
    kept = [r for r in records if r.started_at >= cut]
    assert report.cut == cut
    assert report.rows == len(doomed)
    assert report.choices == sum(len(r.choices) for r in doomed)
    times, choices = await remaining(engine)
    assert times == {r.started_at for r in kept}
    assert choices == sum(len(r.choices) for r in kept)
    assert min(times) == cut  # the call at midnight itself stays; the one a microsecond before went
    async with engine.connect() as conn:
        assert await pruned_before(conn) == cut
        assert await read_meta(conn, PRUNED_BEFORE) == "2026-12-01T00:00:00+00:00"


async def test_dry_run_counts_and_deletes_nothing(engine: AsyncEngine) -> None:
    records = spread()
    await insert_records(engine, records)
    cut = datetime(2026, 12, 3, tzinfo=UTC)
    report = await prune(engine, cut + timedelta(hours=23), dry_run=True)
    doomed = [r for r in records if r.started_at < cut]
    assert (report.rows, report.choices, report.batches) == (len(doomed), sum(len(r.choices) for r in doomed), 0)
    assert report.dry_run
    times, choices = await remaining(engine)
    assert len(times) == len(records)
    assert choices == sum(len(r.choices) for r in records)
    async with engine.connect() as conn:
        assert await pruned_before(conn) is None


async def test_batches_honour_batch_rows(engine: AsyncEngine) -> None:
    records = [record(NOW - timedelta(days=3, minutes=k), k) for k in range(95)]
    await insert_records(engine, records)
    report = await prune(engine, NOW - timedelta(days=1), batch_rows=10, vacuum=False)
    assert report.rows == 95
    assert report.batches >= 10  # at most 10 rows each
    assert len(report.batch_ms) == report.batches
    assert report.longest_batch_ms == max(report.batch_ms)
    times, _ = await remaining(engine)
    assert times == set()


async def test_pruned_before_only_moves_forward(engine: AsyncEngine) -> None:
    await insert_records(engine, spread())
    await prune(engine, NOW - timedelta(days=3))
    later = NOW - timedelta(days=5)
    report = await prune(engine, later)  # an earlier cut deletes nothing more and keeps the horizon
    assert report.rows == 0
    async with engine.connect() as conn:
        assert await pruned_before(conn) == datetime(2026, 12, 2, tzinfo=UTC)
    assert await record_pruned_before(engine, datetime(2026, 11, 1, tzinfo=UTC)) == datetime(2026, 12, 2, tzinfo=UTC)
    assert await record_pruned_before(engine, datetime(2026, 12, 4, tzinfo=UTC)) == datetime(2026, 12, 4, tzinfo=UTC)
    async with engine.connect() as conn:
        assert await pruned_before(conn) == datetime(2026, 12, 4, tzinfo=UTC)


async def test_sqlite_incremental_vacuum_returns_pages(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    try:
        await upgrade(engine)
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA auto_vacuum")).scalar_one() == 2  # incremental
        for day in range(4):
            await insert_records(engine, [record(NOW - timedelta(days=10 + day, seconds=k), k) for k in range(1500)])
        async with engine.connect() as conn:
            pages = (await conn.exec_driver_sql("PRAGMA page_count")).scalar_one()
        report = await prune(engine, NOW - timedelta(days=9), vacuum=False)
        assert report.rows == 6000
        async with engine.connect() as conn:
            free = (await conn.exec_driver_sql("PRAGMA freelist_count")).scalar_one()
        assert free > pages // 2
        report = await prune(engine, NOW - timedelta(days=9))  # nothing left to delete; vacuums
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA freelist_count")).scalar_one() == 0
            page_size = (await conn.exec_driver_sql("PRAGMA page_size")).scalar_one()
            assert (await conn.exec_driver_sql("PRAGMA page_count")).scalar_one() <= pages - free
        assert report.space_returned == free * page_size
    finally:
        await engine.dispose()


# ---- a lookup by completion id probes the (started_hour, completion_id) index hour by hour --------------


class StatementLog:
    """The statements an engine runs, as the driver got them (SQL and parameters)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.statements: list[tuple[str, Any]] = []
        event.listen(engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        self.statements.append((statement, parameters))

    def close(self) -> None:
        event.remove(self.engine.sync_engine, "before_cursor_execute", self._seen)

    async def plans(self) -> list[tuple[str, str]]:
        """(statement, its plan) for each statement that read `completions`, planned as it ran."""
        sqlite = self.engine.dialect.name == "sqlite"
        out = []
        async with self.engine.connect() as conn:
            if not sqlite:
                # a table this small is cheaper to read whole than to probe 500 hours of; what matters is
                # that the probe can use the index (at millions of rows PostgreSQL picks it: bench/README.md)
                await conn.exec_driver_sql("SET enable_seqscan = off")
            for statement, parameters in self.statements:
                if "FROM completions" not in statement:
                    continue
                explain = ("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + statement
                rows = (await conn.exec_driver_sql(explain, parameters)).all()
                out.append((statement, "\n".join(str(row[-1]) for row in rows)))
        return out


async def test_lookup_by_completion_id_uses_the_index_and_finds_rows_in_any_hour(engine: AsyncEngine) -> None:
    hours = [NOW - timedelta(hours=h) for h in (0, 3, 499, 500, 501, 1700)]  # several chunks of probed hours
    shared = "chatcmpl-shared"
    wanted = [record(at, n, completion_id=shared) for n, at in enumerate(hours)]
    filler = [record(NOW - timedelta(minutes=7 * k), k) for k in range(12_000)]  # a planner prefers the index
    await insert_records(engine, filler + wanted)
    async with engine.begin() as conn:  # a row without an hour: found through its own part of the index
        row = record_to_row(record(NOW - timedelta(days=400), 99, completion_id=shared))
        await conn.execute(insert(completions_table), [{**row, "started_hour": None, "choices": None}])
    log = StatementLog(engine)
    try:
        async with engine.connect() as conn:
            found = await fetch_completion(conn, shared)
            alone = await fetch_completion(conn, filler[5000].completion_id or "")
    finally:
        log.close()
    async with engine.connect() as conn:  # then a suffix of a request id, which reads the table
        missing = await fetch_completion(conn, "chatcmpl-nowhere")
    assert [r["started_at"] for r in found] == [NOW - timedelta(days=400), *sorted(hours)]  # newest id first
    assert [r["choices"] for r in found[1:]] == [[{"index": 0, "finish_reason": "stop",
                                                   "native_finish_reason": None, "role": "assistant"}]] * 6
    assert [r["request_id"] for r in alone] == [filler[5000].request_id]
    assert missing == []
    plans = await log.plans()
    probes = [plan for statement, plan in plans if "completion_id =" in statement.partition("WHERE")[2]]
    assert probes
    for statement, plan in plans:
        if engine.dialect.name == "sqlite":
            assert not re.search(r"\bSCAN completions\b", plan), (statement, plan)
        else:
            assert "Seq Scan on completions" not in plan, (statement, plan)
    assert all("ix_completions_started_hour_completion_id" in plan for plan in probes), probes


# ---- the command, and the notes where rows are listed ---------------------------------------------------


def days_ago(days: float, now: datetime | None = None) -> datetime:
    return (now or datetime.now(UTC)) - timedelta(days=days)


async def test_db_prune_command(database_url: str, engine: AsyncEngine, tmp_path: Path) -> None:
    async def prune_cli(*argv: str) -> tuple[int, str, str]:
        return await run_process("db", "prune", *argv, "--database", database_url, cwd=tmp_path)

    now = datetime.now(UTC)
    records = [record(days_ago(day + 0.25, now), day, choices=day % 3) for day in range(8)]
    await insert_records(engine, records)
    cut = day_floor(days_ago(5, now))
    doomed = [r for r in records if r.started_at < cut]
    code, out, err = await prune_cli("--before", "5d", "--dry-run", "--json")
    assert (code, err) == (0, "")
    report = orjson.loads(out)
    doomed_choices = sum(len(r.choices) for r in doomed)
    assert (report["rows"], report["choices"], report["dry_run"]) == (len(doomed), doomed_choices, True)
    assert report["cut"] == cut.isoformat()
    assert len((await remaining(engine))[0]) == len(records)

    code, out, err = await prune_cli("--before", cut.date().isoformat())
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"deleted {len(doomed)} row(s) and {doomed_choices} choice(s) of calls before {cut.date()} (UTC)"
    assert re.fullmatch(r"\d+ batch\(es\), longest \d+ ms; \d+\.\d s", lines[1])
    if engine.dialect.name == "sqlite":
        assert re.fullmatch(r"returned [\d.,]+ (bytes|KiB|MiB) to the file system", lines[2])
    else:
        assert "autovacuum" in lines[2]
    assert (await remaining(engine))[0] == {r.started_at for r in records if r.started_at >= cut}

    code, _, err = await prune_cli("--before", "soon")
    assert code == 2
    assert "--before: expected an ISO time or an age" in err


async def test_listings_note_pruned_days_only_when_they_reach_them(
    ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, url = ledger.engine, ledger.config.database.url
    now = datetime.now(UTC)
    await insert_records(engine, [record(days_ago(day + 0.25, now), day) for day in range(6)])

    async def notes(*argv: str) -> str:
        code, _, err = await run_cli(capsys, *argv, "--database", url)
        assert code == 0, err
        return err

    async def api_and_page(query: str = "") -> tuple[Any, str]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{ledger.url}/_ledger/api/completions{query}") as response:
                body = await response.json()
            async with session.get(f"{ledger.url}/_ledger/requests{query}") as response:
                page = await response.text()
        return body["pruned_before"], page

    assert await notes("logs", "-n", "0") == ""
    assert await api_and_page() == (None, ANY)
    assert "pruned" not in (await api_and_page())[1]

    await prune(engine, days_ago(3, now))
    horizon = day_floor(days_ago(3, now))
    note = f"chatledger: rows before {horizon.date()} were pruned; stats still cover them\n"
    assert await notes("logs") == note  # the listing ended before its 20 rows: the rest were pruned
    assert await notes("logs", "-n", "0", "--json") == note
    assert await notes("logs", "-n", "2") == ""  # the newest two: pruned days are not reached
    assert await notes("logs", "--since", "1d") == ""
    assert await notes("logs", "--until", "4d") == note
    assert await notes("export") == note
    assert await notes("export", "--since", "2d", "--format", "csv") == ""

    pruned, page = await api_and_page()
    assert pruned == horizon.isoformat().replace("+00:00", "Z")
    assert f"Rows before {horizon.date()} were pruned; stats still cover them." in page
    pruned, page = await api_and_page("?since=1d")
    assert pruned == horizon.isoformat().replace("+00:00", "Z")  # the field says it whatever the filter
    assert "were pruned" not in page
    _, page = await api_and_page("?limit=1")
    assert "were pruned" not in page  # a page with older pages after it


# ---- the writer's periodic prune ------------------------------------------------------------------------


async def test_only_one_of_two_writers_claims_an_interval(database_url: str, engine: AsyncEngine) -> None:
    other = create_engine(database_url)
    try:
        now = datetime.now(UTC)
        first = await asyncio.gather(*(claim(e, 3600, now) for e in (engine, other, engine, other)))
        assert sorted(first) == [False, False, False, True]
        assert not await claim(other, 3600, now + timedelta(minutes=59))
        later = now + timedelta(hours=1)
        assert sorted(await asyncio.gather(claim(engine, 3600, later), claim(other, 3600, later))) == [False, True]
        runners = [Retention(e, RetentionConfig(days=2, interval=3600)) for e in (engine, other)]
        await insert_records(engine, [record(days_ago(day, now), day) for day in range(6)])
        async with engine.begin() as conn:  # the last run is over an hour old
            await conn.execute(update(meta).where(meta.c.key == RUN_AT).values(value=stamp(now - timedelta(hours=2))))
        assert sorted(await asyncio.gather(*(r.run_once() for r in runners))) == [False, True]
        assert sum(r.runs for r in runners) == 1
        assert min((await remaining(engine))[0]) >= day_floor(days_ago(2, now))
        assert not any(await asyncio.gather(*(r.run_once() for r in runners)))  # this interval is taken
    finally:
        await other.dispose()


@pytest.mark.parametrize("writer", ["inline", "process"])
async def test_writer_prunes_once_per_interval(
    writer: str, upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    config = make_config(
        upstream.url, database_url, tmp_path, database={"writer": writer}, retention={"days": 3, "interval": 1.0}
    )
    setup = create_engine(database_url)
    await upgrade(setup)
    now = datetime.now(UTC)
    records = [record(days_ago(day + 0.5, now), day) for day in range(8)]
    await insert_records(setup, records)
    cut = day_floor(days_ago(3, now))
    kept = sum(1 for r in records if r.started_at >= cut)
    ledger = await start_ledger(config)
    try:
        async def pruned() -> bool:
            return all(at >= cut for at in (await remaining(setup))[0])

        await eventually(pruned, within=15)
        async with setup.connect() as conn:
            assert await pruned_before(conn) == cut
            first_run = await read_meta(conn, RUN_AT)
        await insert_records(setup, [record(days_ago(10, now), 1)])  # arrives late (a replayed spool)
        await eventually(pruned, within=15)  # the next interval's run takes it
        async with setup.connect() as conn:
            assert (await read_meta(conn, RUN_AT) or "") > (first_run or "")
        async with (  # the proxy kept serving meanwhile
            aiohttp.ClientSession() as session,
            session.post(f"{ledger.url}/v1/chat/completions", json={"model": "gpt-4o"}) as response,
        ):
            assert response.status == 200
        assert len(await ledger.rows(count=kept + 1)) == kept + 1
    finally:
        await ledger.stop()
        await setup.dispose()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("", RetentionConfig(days=0, interval=86_400.0)),
        ("days = 90\ninterval = '6h'", RetentionConfig(days=90, interval=21_600.0)),
        ("days = 30\ninterval = '1h30m'", RetentionConfig(days=30, interval=5_400.0)),
        ("interval = 600", RetentionConfig(days=0, interval=600.0)),
        ("days = -1", "retention.days: expected 0 (keep every row) or more, got -1"),
        ("interval = 0.5", "retention.interval: expected at least 1 second, got 0.5"),
        ("interval = 'daily'", "retention.interval: expected a number, got 'daily'"),
        ("keep = 3", "retention.keep: unknown key"),
    ],
)
def test_retention_config(tmp_path: Path, body: str, expected: Any) -> None:
    path = tmp_path / "chatledger.toml"
    path.write_text(f"[retention]\n{body}\n")
    if isinstance(expected, str):
        with pytest.raises(ConfigError) as caught:
            load(str(path), environ={})
        assert str(caught.value) == expected
    else:
        assert load(str(path), environ={}).retention == expected


async def test_a_failing_prune_is_logged_once_and_the_writer_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a ledger without the schema: every claim fails as a database error would
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    retention = Retention(engine, RetentionConfig(days=1, interval=1.0))
    try:
        with caplog.at_level(logging.WARNING, logger="proxy.writer.retention"):
            await retention.start()
            await asyncio.sleep(3.5)  # the first check after 1 s, then one a second
            assert retention._task is not None
            assert not retention._task.done()
        lines = [r.getMessage() for r in caplog.records if r.name == "proxy.writer.retention"]
        assert len(lines) == 1, lines  # then at most once an hour
        assert lines[0].startswith("retention: pruning failed, retried in 1 s: ")
        assert "ledger_meta" in lines[0]
    finally:
        await retention.stop()
        await engine.dispose()
    assert retention._task.done()
