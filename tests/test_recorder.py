"""The writer: batches, data errors vs. connection errors, the spool when the database is down, the
guard that bounds time in memory, replay (idempotent, row by row around poison rows), db status.

Every test runs on SQLite and PostgreSQL (database_url fixture).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.parse.fields import clean_text as safe_text
from proxy.parse.record import ChoiceRecord, CompletionRecord
from proxy.store.engine import create_engine
from proxy.store.migrate import upgrade_url
from proxy.store.models import completions_table
from proxy.store.rows import record_to_row
from proxy.writer.errors import describe, is_data_error
from proxy.writer.recorder import BatchRecorder as Recorder
from proxy.writer.spool import Spool

from .helpers import eventually, stored
from .test_reliability import HeldLock

PATH = "/v1/chat/completions"


def make_record(n: int = 0, **fields: Any) -> CompletionRecord:
    record = CompletionRecord(
        request_id=str(uuid.uuid4()),
        started_at=datetime(2025, 1, 1, 12, 0, n % 60, tzinfo=UTC),
        method="POST",
        path=PATH,
        upstream="http://upstream.test",
        status_code=200,
        outcome="ok",
        model="gpt-4o",
        prompt_tokens=10 + n,
        completion_tokens=n,
        cost=Decimal("0.000123"),
        choices=[ChoiceRecord(0, "stop", None, "assistant")],
    )
    for name, value in fields.items():
        setattr(record, name, value)
    return record


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade_url(database_url)
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


def spooled_ids(directory: Path, pattern: str = "spool-*.jsonl") -> list[str]:
    ids = []
    for path in sorted(directory.glob(pattern)):
        for line in path.read_bytes().splitlines():
            ids.append(orjson.loads(line)["request_id"])
    return ids


# ---- pure helpers --------------------------------------------------------------------------------


def test_safe_text_strips_nul_and_lone_surrogates() -> None:
    assert safe_text("plain") == "plain"
    assert safe_text("a\x00b") == "ab"
    assert safe_text("caf\udce9") == "caf\ufffd"  # an undecodable header byte (surrogateescape)
    assert safe_text("x\ud800y") == "x?y"
    assert safe_text("ünïcode ✓") == "ünïcode ✓"


def test_record_to_row_is_encodable_whatever_the_headers_held() -> None:
    record = make_record(user="bad\udcffuser\x00", tags={"k\udcfe": "v\x00"})
    row = record_to_row(record)
    assert row["user"] == "bad\ufffduser"
    assert row["tags"] == {"k\ufffd": "v"}
    assert orjson.loads(orjson.dumps(row, default=str))["user"] == "bad\ufffduser"


def test_record_to_row_has_every_column_and_every_choice_field() -> None:
    record = make_record()
    record.choices = [ChoiceRecord(0, "stop", "end_turn", "assistant"), ChoiceRecord(1)]
    row = record_to_row(record)
    assert set(row) == {c.name for c in completions_table.columns if c.name != "id"} | {"choices"}
    assert row["choices"] == [dataclasses.asdict(choice) for choice in record.choices]


def test_error_classification() -> None:
    from sqlalchemy import exc as sa_exc

    integrity = sa_exc.IntegrityError("INSERT ...", {}, Exception("NOT NULL constraint failed"))
    assert is_data_error(integrity)
    assert describe(integrity) == "Exception: NOT NULL constraint failed"
    operational = sa_exc.OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
    assert not is_data_error(operational)
    assert not is_data_error(TimeoutError())
    assert not is_data_error(ConnectionRefusedError(111, "refused"))

    class PgError(Exception):
        sqlstate = "22001"  # string_data_right_truncation

    wrapped = sa_exc.DBAPIError("INSERT ...", {}, PgError("value too long for type character varying(32)"))
    assert is_data_error(wrapped)

    class PgShutdown(Exception):
        sqlstate = "57P01"  # admin_shutdown

    assert not is_data_error(sa_exc.DBAPIError("INSERT ...", {}, PgShutdown("terminating connection")))


# ---- the normal path -----------------------------------------------------------------------------


async def test_batches_are_written_with_their_choices(engine: AsyncEngine, tmp_path: Path) -> None:
    recorder = Recorder(engine, tmp_path / "spool", batch_max=7)
    await recorder.start()
    records = [make_record(n) for n in range(20)]
    for record in records:
        recorder.submit(record)
    await recorder.wait_idle()
    await recorder.close()
    rows = await stored(engine)
    assert set(rows) == {r.request_id for r in records}
    assert all(row["choice_count"] == 1 for row in rows.values())
    assert rows[records[5].request_id]["prompt_tokens"] == 15
    assert rows[records[5].request_id]["cost"] == Decimal("0.000123")
    assert recorder.rows_written == 20
    assert recorder.rows_spooled == 0
    assert recorder.stats().database_ok
    assert spooled_ids(tmp_path / "spool") == []


async def test_the_next_batch_is_prepared_while_the_database_writes_one(
    sqlite_engine: AsyncEngine, tmp_path: Path
) -> None:
    """Batch 2 is parsed and priced (the on_batch hook runs) while batch 1's write waits on a lock the
    database holds; batch 2 is written only after batch 1 is confirmed, each row once, in order."""
    written_at_hook: list[int] = []
    recorder = Recorder(
        sqlite_engine,
        tmp_path / "spool",
        batch_max=5,
        write_timeout=30,
        hold_max=30,
        on_batch=lambda records: written_at_hook.append(recorder.rows_written),
    )
    await recorder.start()
    first = [make_record(n) for n in range(5)]
    second = [make_record(n) for n in range(5, 10)]
    async with HeldLock(tmp_path / "ledger.db"):
        for record in first:
            recorder.submit(record)
        await eventually(lambda: len(written_at_hook) == 1)
        await asyncio.sleep(0.05)  # batch 1's write has begun and waits for the lock
        for record in second:
            recorder.submit(record)
        await eventually(lambda: len(written_at_hook) == 2)
        await asyncio.sleep(0.2)
        assert recorder.rows_written == 0  # batch 1 still waits, and batch 2 waits behind it
    await recorder.wait_idle(10)
    await recorder.close()
    assert written_at_hook == [0, 0]  # batch 2 was prepared before batch 1 was confirmed
    assert recorder.rows_written == 10
    assert recorder.rows_spooled == 0
    rows = await stored(sqlite_engine)
    in_id_order = sorted(rows.values(), key=lambda row: row["id"])
    assert [row["request_id"] for row in in_id_order] == [r.request_id for r in first + second]


@pytest.mark.postgres
async def test_postgresql_writes_two_batches_at_once(postgres_url: str, tmp_path: Path) -> None:
    """On PostgreSQL two batches are written at once, each in its own transaction (its own backend), and a
    third is prepared meanwhile; once the lock they wait on goes, every row is written once."""
    import asyncpg

    await upgrade_url(postgres_url)
    engine = create_engine(postgres_url)
    hooked: list[int] = []
    recorder = Recorder(
        engine, tmp_path / "spool", batch_max=5, write_timeout=30, hold_max=30,
        on_batch=lambda records: hooked.append(len(records)),
    )  # fmt: skip
    dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    holder = await asyncpg.connect(dsn)
    watcher = await asyncpg.connect(dsn)
    try:
        await recorder.start()
        holder_transaction = holder.transaction()
        await holder_transaction.start()
        await holder.execute("LOCK TABLE completion_choices IN EXCLUSIVE MODE")  # the writes stop at choices

        async def writes_waiting() -> int:
            return int(
                await watcher.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO completion_choices%'"
                )
            )

        batches = [[make_record(n) for n in range(start, start + 5)] for start in (0, 5, 10)]
        for batch in batches:
            for record in batch:
                recorder.submit(record)
        async def two_waiting() -> bool:
            return await writes_waiting() >= 2

        await eventually(two_waiting, within=10)
        assert await writes_waiting() == 2
        await eventually(lambda: len(hooked) == 3)  # the third batch prepared behind them
        assert recorder.rows_written == 0
        await holder_transaction.rollback()
        await recorder.wait_idle(10)
        assert recorder.rows_written == 15
        assert recorder.rows_spooled == 0
        rows = await stored(engine)
        assert set(rows) == {record.request_id for batch in batches for record in batch}
        assert all(row["choice_count"] == 1 for row in rows.values())
    finally:
        await recorder.close()
        await holder.close()
        await watcher.close()
        await engine.dispose()


@pytest.mark.postgres
async def test_postgresql_one_write_failing_while_the_other_hangs(postgres_url: str, tmp_path: Path) -> None:
    """Write 1 loses its connection while write 2 waits on a lock, the spool cannot be written and a whole
    batch is queued: the writer waits for write 2 (the event loop stays responsive, no busy loop), keeps
    write 1's rows in memory, and in the end every row is written once, none lost."""
    import asyncpg

    await upgrade_url(postgres_url)
    engine = create_engine(postgres_url)
    blocker = tmp_path / "spool"
    blocker.write_text("a file where the spool directory should be")
    recorder = Recorder(engine, blocker, batch_max=5, write_timeout=30, hold_max=30)
    dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    holder = await asyncpg.connect(dsn)
    watcher = await asyncpg.connect(dsn)
    waiting = (
        "FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
        "AND query LIKE 'INSERT INTO completion_choices%'"
    )
    try:
        await recorder.start()
        holder_transaction = holder.transaction()
        await holder_transaction.start()
        await holder.execute("LOCK TABLE completion_choices IN EXCLUSIVE MODE")
        records = [make_record(n) for n in range(15)]
        for record in records[:10]:
            recorder.submit(record)

        async def two_waiting() -> bool:
            return int(await watcher.fetchval(f"SELECT count(*) {waiting}")) == 2

        await eventually(two_waiting, within=10)
        oldest = f"SELECT pid {waiting} ORDER BY xact_start LIMIT 1"
        await watcher.execute(f"SELECT pg_terminate_backend(pid) FROM ({oldest}) AS w")
        await eventually(lambda: not recorder.stats().database_ok, within=10)
        for record in records[10:]:
            recorder.submit(record)
        longest = 0.0
        for _ in range(30):
            started = time.monotonic()
            await asyncio.sleep(0.01)
            longest = max(longest, time.monotonic() - started)
        assert longest < 0.25, longest
        await holder_transaction.rollback()
        blocker.unlink()
        await eventually(lambda: recorder.queue_depth == 0 and recorder.spool.backlog()[0] == 0, within=30)
        await recorder.wait_idle(10)
        assert recorder.rows_lost == 0
        assert set(await stored(engine)) == {record.request_id for record in records}
    finally:
        await recorder.close()
        await holder.close()
        await watcher.close()
        await engine.dispose()


async def test_sqlite_wal_is_checkpointed_in_the_background(sqlite_engine: AsyncEngine, tmp_path: Path) -> None:
    """A few hundred rows stay far below wal_autocheckpoint, so no commit copies them into the database
    file: the writer's background checkpoint does, within a second or so. A copy of the file alone,
    without its WAL, then holds them."""
    recorder = Recorder(sqlite_engine, tmp_path / "spool")
    await recorder.start()
    records = [make_record(n) for n in range(300)]
    for record in records:
        recorder.submit(record)
    await recorder.wait_idle()

    def rows_in_the_file_alone() -> int:
        copy = tmp_path / "copy.db"
        copy.write_bytes((tmp_path / "ledger.db").read_bytes())  # the main file only, not ledger.db-wal
        connection = sqlite3.connect(copy)
        try:
            return int(connection.execute("SELECT count(*) FROM completions").fetchone()[0])
        finally:
            connection.close()
            copy.unlink()

    await eventually(lambda: rows_in_the_file_alone() == 300, within=5)
    await recorder.close()


async def test_on_batch_hook_sees_every_record_once_on_every_path(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    seen: list[str] = []

    def hook(records: list[CompletionRecord]) -> None:
        seen.extend(r.request_id for r in records)
        for record in records:
            record.cost_source = "hook"

    recorder = Recorder(engine, tmp_path / "spool", queue_max=3, on_batch=hook)
    # no start(): everything past queue_max overflows, the rest is written at close()
    records = [make_record(n) for n in range(5)]
    for record in records:
        recorder.submit(record)
    await recorder.start()
    await recorder.wait_idle()
    await recorder.close()
    assert sorted(seen) == sorted(r.request_id for r in records)
    assert recorder.rows_spooled == 2  # the overflow went through the spool
    assert recorder.rows_written == 3
    await eventually(lambda: recorder.rows_replayed == 2)
    rows = await stored(engine)
    assert set(rows) == {r.request_id for r in records}
    assert {row["cost_source"] for row in rows.values()} == {"hook"}


# ---- data errors: the database is up, some rows are refused ---------------------------------------


async def test_poison_row_is_set_aside_and_the_rest_committed(
    engine: AsyncEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "proxy.writer")
    recorder = Recorder(engine, tmp_path / "spool")
    await recorder.start()
    good = [make_record(n) for n in range(10)]
    poison = make_record(99, method=None)  # NOT NULL column: refused by every database
    overflow = make_record(98, started_at=None)  # NOT NULL too
    batch = [*good[:5], poison, overflow, *good[5:]]
    for record in batch:
        recorder.submit(record)
    await recorder.wait_idle()
    await eventually(lambda: recorder.rows_rejected == 2 and recorder.rows_replayed == 10)
    # the database was never marked down, and keeps taking batches directly
    assert recorder.stats().database_ok
    later = make_record(50)
    recorder.submit(later)
    await recorder.wait_idle()
    await recorder.close()
    rows = await stored(engine)
    assert set(rows) == {r.request_id for r in [*good, later]}
    assert recorder.rows_written == 1  # the first batch failed as a whole, then the later one
    rejected = list((tmp_path / "spool").glob("rejected-*.jsonl"))
    assert len(rejected) == 1
    lines = [orjson.loads(line) for line in rejected[0].read_bytes().splitlines()]
    assert {line["request_id"] for line in lines} == {poison.request_id, overflow.request_id}
    assert all(line["_error"] for line in lines)
    assert spooled_ids(tmp_path / "spool") == []  # the segment itself is gone once replayed
    assert recorder.spool.rejected()[0] == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("refused a batch of 12 record(s)" in m for m in errors), errors
    assert any("refused 2 record(s)" in m and "2 rejected so far" in m for m in errors), errors


async def test_postgresql_refuses_what_sqlite_stores(engine: AsyncEngine, tmp_path: Path) -> None:
    recorder = Recorder(engine, tmp_path / "spool")
    await recorder.start()
    long_outcome = make_record(1, outcome="x" * 40)  # outcome is VARCHAR(32)
    fine = make_record(2)
    recorder.submit(long_outcome)
    recorder.submit(fine)
    await recorder.wait_idle()
    await eventually(
        lambda: recorder.rows_replayed + recorder.rows_written >= 1 and not recorder.spool.backlog()[0]
    )
    await recorder.close()
    rows = await stored(engine)
    if engine.dialect.name == "postgresql":
        assert set(rows) == {fine.request_id}
        assert recorder.rows_rejected == 1
        assert recorder.stats().database_ok
    else:
        assert set(rows) == {fine.request_id, long_outcome.request_id}
        assert recorder.rows_rejected == 0


# ---- connection-level failures: the spool takes over ----------------------------------------------


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """SQLite only: file locks and file permissions."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    await upgrade_url(url)
    engine = create_engine(url)
    yield engine
    await engine.dispose()


async def test_sqlite_locked_spools_then_replays(sqlite_engine: AsyncEngine, tmp_path: Path) -> None:
    engine = sqlite_engine
    db_file = tmp_path / "ledger.db"
    recorder = Recorder(engine, tmp_path / "spool", write_timeout=0.5, hold_max=0.2)
    await recorder.start()
    before = [make_record(n) for n in range(3)]
    for record in before:
        recorder.submit(record)
    await recorder.wait_idle()
    during = [make_record(n) for n in range(3, 40)]
    async with HeldLock(db_file):
        for record in during:
            recorder.submit(record)
            await asyncio.sleep(0.01)
        await eventually(lambda: not recorder.stats().database_ok)
        await recorder.wait_idle()
        assert {r.request_id for r in during} <= set(spooled_ids(tmp_path / "spool"))
    await eventually(lambda: recorder.stats().database_ok and recorder.spool.backlog()[0] == 0, within=20)
    await recorder.close()
    rows = await stored(engine)
    assert set(rows) == {r.request_id for r in before + during}
    assert all(row["choice_count"] == 1 for row in rows.values())


def _immutable(paths: list[Path], on: bool) -> None:
    import os
    import subprocess

    for path in paths:
        if not path.exists():
            continue
        if os.geteuid() == 0:  # root ignores permission bits: use the immutable attribute
            subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
        else:
            path.chmod(0o444 if on else 0o644)


async def test_sqlite_read_only_file_spools_then_replays(sqlite_engine: AsyncEngine, tmp_path: Path) -> None:
    engine = sqlite_engine
    db_file = tmp_path / "ledger.db"
    recorder = Recorder(engine, tmp_path / "spool", write_timeout=2)
    await recorder.start()
    recorder.submit(make_record(0))
    await recorder.wait_idle()
    files = [db_file, db_file.with_name(db_file.name + "-wal"), db_file.with_name(db_file.name + "-shm")]
    await engine.dispose()  # connections opened from now on see the read-only file
    _immutable(files, True)
    try:
        during = [make_record(n) for n in range(1, 25)]
        for record in during:
            recorder.submit(record)
        await recorder.wait_idle()
        assert not recorder.stats().database_ok
        assert "readonly" in (recorder.last_error or "") or "unable to open" in (recorder.last_error or "")
        assert sorted(spooled_ids(tmp_path / "spool")) == sorted(r.request_id for r in during)
    finally:
        _immutable(files, False)
    await engine.dispose()
    await eventually(lambda: recorder.stats().database_ok and recorder.spool.backlog()[0] == 0, within=20)
    await recorder.close()
    assert len(await stored(engine)) == 25


async def test_database_down_and_spool_unwritable_keeps_records_in_memory(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await upgrade_url(database_url)
    if database_url.startswith("sqlite"):
        dead = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'ledger.db'}")
    else:
        dead = create_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none")  # nothing listens on port 1
    blocker = tmp_path / "spool"
    blocker.write_text("a file where the spool directory should be")
    recorder = Recorder(dead, blocker, queue_max=5)
    await recorder.start()
    records = [make_record(n) for n in range(8)]
    for record in records:
        recorder.submit(record)
    await eventually(lambda: recorder.rows_lost == 3)
    assert recorder.degraded
    assert not recorder.stats().spool_ok
    assert recorder.queue_depth == 5
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("could not write 3 record(s)" in m and "3 lost so far" in m for m in errors), errors
    # the disk comes back: the 5 kept in memory reach the spool, nothing more is lost
    blocker.unlink()
    await eventually(lambda: recorder.stats().spool_ok and recorder.queue_depth == 0, within=15)
    await recorder.close()
    await dead.dispose()
    assert sorted(spooled_ids(blocker)) == sorted(r.request_id for r in records[:5])
    assert recorder.rows_lost == 3
    assert recorder.degraded  # stays degraded once something was lost
    # and the spool is replayed by the next process that can reach the database
    engine = create_engine(database_url)
    try:
        second = Recorder(engine, blocker)
        await second.start()
        await eventually(lambda: second.rows_replayed == 5)
        await second.close()
        assert set(await stored(engine)) == {r.request_id for r in records[:5]}
    finally:
        await engine.dispose()


# ---- the guard: time in memory is bounded even when the database stalls ---------------------------


async def test_guard_spools_when_the_database_stalls(sqlite_engine: AsyncEngine, tmp_path: Path) -> None:
    engine = sqlite_engine
    db_file = tmp_path / "ledger.db"
    # write_timeout far beyond hold_max: without the guard the records would wait 30 s in memory
    recorder = Recorder(engine, tmp_path / "spool", write_timeout=30, hold_max=0.3)
    await recorder.start()
    async with HeldLock(db_file):
        first = make_record(1)
        recorder.submit(first)  # in flight, stuck behind the lock
        await asyncio.sleep(0.05)
        queued = [make_record(n) for n in range(2, 6)]
        for record in queued:
            recorder.submit(record)
        submitted = time.monotonic()
        await eventually(
            lambda: set(spooled_ids(tmp_path / "spool")) >= {r.request_id for r in [first, *queued]}, within=5
        )
        waited = time.monotonic() - submitted
        assert waited < 0.3 + 1.5, waited  # hold_max + a tick + slack, far below write_timeout (30 s)
    await eventually(lambda: recorder.spool.backlog()[0] == 0, within=40)
    await recorder.close()
    rows = await stored(engine)
    assert set(rows) == {r.request_id for r in [first, *queued]}  # the in-flight batch: once, not twice


# ---- replay -------------------------------------------------------------------------------------


def _append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


async def test_replay_is_idempotent_and_starts_with_leftovers(engine: AsyncEngine, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    records = [make_record(n) for n in range(30)]
    # an earlier run: 10 already committed, and all 30 spooled (as if it crashed mid-replay)
    first = Recorder(engine, spool_dir)
    await first.start()
    for record in records[:10]:
        first.submit(record)
    await first.wait_idle()
    await first.close()
    leftover = Spool(spool_dir)
    leftover.append(record_to_row(r) for r in records)
    leftover.append([{"request_id": "torn"}])
    path = leftover.segments() or [p for p in spool_dir.glob("spool-*.jsonl")]
    leftover.close()
    _append_bytes(path[0], b'{"request_id": "half a line')  # crash mid-write
    second = Recorder(engine, spool_dir, batch_max=7)
    await second.start()
    await eventually(lambda: second.spool.backlog()[0] == 0)
    await second.close()
    rows = await stored(engine)
    assert set(rows) == {r.request_id for r in records}
    assert all(row["choice_count"] == 1 for row in rows.values())
    assert second.rows_rejected == 1  # {"request_id": "torn"} lacks the NOT NULL columns


async def test_a_row_spooled_twice_is_written_once_with_its_choices(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    records = [make_record(n) for n in range(3)]
    spool.append([record_to_row(r) for r in records])
    spool.append([record_to_row(r) for r in records[:2]])  # the guard's copy, then the writer's
    spool.close()
    recorder = Recorder(engine, tmp_path / "spool")
    await recorder.start()
    await eventually(lambda: recorder.spool.backlog()[0] == 0)
    await recorder.close()
    rows = await stored(engine)
    assert set(rows) == {r.request_id for r in records}
    assert [row["choice_count"] for row in rows.values()] == [1, 1, 1]


async def test_segment_held_by_a_live_writer_is_not_replayed(engine: AsyncEngine, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    other = Spool(spool_dir)  # another worker, still writing its segment
    record = make_record(1)
    other.append([record_to_row(record)])
    recorder = Recorder(engine, spool_dir)
    await recorder.start()
    await asyncio.sleep(0.3)
    assert await stored(engine) == {}
    other.close()  # that worker rotates (or dies): the segment becomes replayable
    recorder._backlog = True
    recorder.submit(make_record(2))
    await eventually(lambda: recorder.spool.backlog()[0] == 0)
    await recorder.close()
    assert record.request_id in await stored(engine)


# ---- db status --------------------------------------------------------------------------------------


async def test_db_status_shows_revision_counts_and_spool(
    engine: AsyncEngine, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli import main
    from proxy.store.migrate import head_revision

    recorder = Recorder(engine, tmp_path / "spool")
    await recorder.start()
    for n in range(4):
        recorder.submit(make_record(n))
    await recorder.wait_idle()
    await recorder.close()
    spool = Spool(tmp_path / "spool")
    spool.append([record_to_row(make_record(n)) for n in range(3)])
    spool.close()
    spool.reject([{**record_to_row(make_record(9)), "_error": "test"}])

    config = tmp_path / "chatledger.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\nspool_dir = "{tmp_path / "spool"}"\n')
    assert await asyncio.to_thread(main, ["db", "status", "--config", str(config), "--json"]) == 0
    status = orjson.loads(capsys.readouterr().out)
    assert status["revision"] == head_revision()
    assert status["up_to_date"] is True
    assert status["rows"]["completions"] == 4
    assert status["rows"]["completion_choices"] == 4
    assert status["spool"]["files"] == 1
    assert status["spool"]["records"] == 3
    assert status["spool"]["rejected"]["records"] == 1
    assert await asyncio.to_thread(main, ["db", "status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert f"revision:  {head_revision()} (up to date)" in text
    assert "3 record(s) in 1 file(s)" in text
    assert "1 record(s) the database refused" in text
