"""The driver-level batch writer must store exactly what the SQLAlchemy types in db.py would, on both
databases: the ORM reads every value back unchanged, however many rows and choices a batch has."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import selectinload

from proxy.parse.record import ChoiceRecord, CompletionRecord
from proxy.store.engine import create_engine
from proxy.store.insert import COLUMNS, BatchWriter
from proxy.store.migrate import upgrade
from proxy.store.models import Completion, CompletionChoice
from proxy.store.rows import record_to_row
from proxy.store.types import UTCDateTime
from proxy.store.types import sqlite_time as _sqlite_time


def make_records(count: int) -> list[CompletionRecord]:
    start = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    records = []
    for n in range(count):
        records.append(
            CompletionRecord(
                request_id=str(uuid.uuid4()),
                # n=0: microsecond 0 exactly; every seventh in another zone (the same instant is stored)
                started_at=(start + timedelta(microseconds=n * 1001)).astimezone(
                    timezone(timedelta(hours=2)) if n % 7 == 3 else UTC
                ),
                method="POST",
                path=f"/v1/chat/completions?n={n}",
                upstream="https://api.example",
                duration_ms=n / 7,
                ttft_ms=None if n % 5 else n / 11,
                status_code=200 if n % 9 else 429,
                outcome="ok" if n % 9 else "upstream_error",
                stream=bool(n % 2),
                requested_model="gpt-4o",
                completion_id=f"chatcmpl-{n % 50}",  # ids repeat: not unique
                created=1741570283 + n,
                model="gpt-4o-2024-08-06",
                provider="OpenAI" if n % 3 == 0 else None,
                prompt_tokens=n,
                completion_tokens=2 * n,
                total_tokens=3 * n,
                cached_tokens=n // 2,
                cost=Decimal("0.000123456789") * n if n % 4 else None,
                cost_source="upstream" if n % 4 else None,
                usage={"prompt_tokens": n, "nested": {"list": [1, "two", None]}, "text": "ünï ✓"},
                api_key_hash="0123456789abcdef",
                user=f"user-{n % 3}",
                tags={"team": "search", "n": str(n)} if n % 2 else None,
                error="HTTP 429: slow down" if n % 9 == 0 else None,
                choices=[ChoiceRecord(i, "stop" if i else "length", "end_turn", "assistant") for i in range(n % 4)],
            )
        )
    return records


async def test_batch_writer_round_trips_every_value(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        records = make_records(1234)  # over the 500-row chunk of a SQLite multi-row INSERT, twice
        writer = BatchWriter(engine.dialect.name)
        async with engine.begin() as conn:
            await writer.insert(conn, [record_to_row(r) for r in records])
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        async with sessions() as session:
            stored = {
                c.request_id: c
                for c in (
                    await session.execute(select(Completion).options(selectinload(Completion.choices)))
                ).scalars()
            }
            choice_count = (await session.execute(select(func.count()).select_from(CompletionChoice))).scalar_one()
        assert len(stored) == len(records)
        assert choice_count == sum(len(r.choices) for r in records)
        for record in records:
            row = stored[record.request_id]
            for name in record_to_row(record):
                if name == "choices":
                    continue
                if name == "started_hour":
                    assert row.started_hour == int(record.started_at.timestamp()) // 3600
                    continue
                assert getattr(row, name) == getattr(record, name), name
            assert row.started_at.tzinfo is not None
            assert [(c.index, c.finish_reason, c.native_finish_reason, c.role) for c in row.choices] == [
                (c.index, c.finish_reason, c.native_finish_reason, c.role) for c in record.choices
            ]
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 11, 25, 12, 0, 0, 352086, tzinfo=UTC),
        datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC),  # no microseconds: SQLAlchemy still writes six zeros
        datetime(2026, 11, 25, 14, 0, 0, 5, tzinfo=timezone(timedelta(hours=2))),
        datetime(2026, 11, 25, 12, 0, 0, 5),  # naive: UTC by convention
    ],
    ids=["utc", "utc-whole-second", "plus-2h", "naive"],
)
def test_sqlite_time_text_is_what_sqlalchemy_stores(when: datetime) -> None:
    """Rows written here and rows written by the ORM must sort and compare alike as text in SQLite."""
    dialect = sqlite.dialect()
    bind = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)  # the ORM's own conversion
    assert _sqlite_time(when) == bind(when)


def test_batch_writer_params_give_null_for_columns_a_row_lacks() -> None:
    full = record_to_row(make_records(2)[1])  # with a cost, tags and a choice
    partial = {name: full[name] for name in ("request_id", "started_at", "cost", "usage", "choices")}
    assert full["cost"] is not None
    assert full["tags"]
    assert full["choices"]
    for dialect in ("sqlite", "postgresql"):
        writer = BatchWriter(dialect)
        (whole,), _ = writer.params([full])
        (sparse,), choices = writer.params([partial])
        assert len(sparse) == len(whole) == len(COLUMNS)
        for name, a, b in zip(COLUMNS, whole, sparse, strict=True):
            assert b == (a if name in partial else None), (dialect, name)
        assert len(choices) == len(full["choices"])
