"""Alembic migrations on SQLite and PostgreSQL: upgrade an empty database to head, no drift against the
models, downgrade to base and upgrade again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.store.engine import WAL_AUTOCHECKPOINT_PAGES, create_engine
from proxy.store.migrate import alembic_config, current_revision, head_revision, upgrade
from proxy.store.models import Base

TABLES = {
    "completions",
    "completion_choices",
    "prices",
    "api_keys",
    "ledger_meta",
    "usage_hourly",
    *(
        f"usage_{period}_{family}"
        for family in ("totals", "models", "keys", "routes", "users", "tags")
        for period in ("hourly", "daily")
    ),
}


def _drift(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={"compare_type": True, "render_as_batch": connection.dialect.name == "sqlite"},
    )
    return list(compare_metadata(context, Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def _downgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


async def drift(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return await conn.run_sync(_drift)


async def tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return await conn.run_sync(_tables)


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_downgrade, revision)


async def test_upgrade_downgrade_upgrade_without_drift(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        assert await tables(engine) == set()
        assert await current_revision(engine) is None

        await upgrade(engine)
        assert await current_revision(engine) == head_revision()
        assert await tables(engine) >= TABLES
        assert await tables(engine) >= set(Base.metadata.tables)
        assert await drift(engine) == []

        await upgrade(engine)  # already at head: nothing to do, nothing breaks
        assert await current_revision(engine) == head_revision()

        await downgrade(engine, "base")
        assert await current_revision(engine) is None
        assert await tables(engine) <= {"alembic_version"}

        await upgrade(engine)
        assert await current_revision(engine) == head_revision()
        assert await drift(engine) == []
    finally:
        await engine.dispose()


async def test_drift_detection_is_not_vacuous(database_url: str) -> None:
    """compare_metadata does notice a schema that differs from the models."""
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            await conn.exec_driver_sql("CREATE TABLE stray (id INTEGER PRIMARY KEY)")
            await conn.exec_driver_sql("DROP INDEX ix_completions_outcome")
        differences = [str(d) for d in await drift(engine)]
        assert any("stray" in d for d in differences), differences
        assert any("ix_completions_outcome" in d for d in differences), differences
    finally:
        await engine.dispose()


async def test_sqlite_uses_wal(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'wal.db'}")
    try:
        await upgrade(engine)
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar_one() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar_one() == 1
            checkpoint = (await conn.exec_driver_sql("PRAGMA wal_autocheckpoint")).scalar_one()
            assert checkpoint == WAL_AUTOCHECKPOINT_PAGES != 1000  # not SQLite's default
    finally:
        await engine.dispose()


async def test_0004_marks_existing_chat_rows_and_leaves_other_paths_null(database_url: str) -> None:
    """Rows logged before `completions.api` existed: chat completions become `chat`, calls on other paths
    (logged with all_paths) stay NULL."""
    engine = create_engine(database_url)
    started = "2026-11-01 10:00:00"
    try:
        await upgrade(engine, "0003")
        async with engine.begin() as conn:
            for request_id, method, path in (
                ("a", "POST", "/v1/chat/completions"),
                ("b", "POST", "/api/v1/chat/completions?x=1"),
                ("c", "GET", "/v1/models"),
                ("d", "GET", "/v1/chat/completions"),
            ):
                await conn.exec_driver_sql(
                    "INSERT INTO completions (request_id, started_at, method, path, upstream, outcome, stream) "
                    f"VALUES ('{request_id}', '{started}', '{method}', '{path}', 'u', 'ok', false)"
                )
        await upgrade(engine)
        async with engine.connect() as conn:
            found = dict((await conn.exec_driver_sql("SELECT request_id, api FROM completions")).all())
        assert found == {"a": "chat", "b": "chat", "c": None, "d": None}
    finally:
        await engine.dispose()
