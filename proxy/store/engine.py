"""The engine factory: SQLite gets WAL, incremental auto_vacuum (new files), a busy timeout (several
writers coexist) and foreign keys."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

WAL_AUTOCHECKPOINT_PAGES = 10_000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # first: the pragmas below wait for a writer of another connection instead of failing at once
    cursor.execute("PRAGMA busy_timeout=5000")
    # takes effect only in a file without tables yet, and only before WAL is set: a new ledger can give
    # pruned pages back to the file system (retention.incremental_vacuum); an older one needs one VACUUM
    cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA cache_size=-32768")  # 32 MiB, 8x SQLite's default (docs/performance.md)
    cursor.execute("PRAGMA foreign_keys=ON")
    # Checkpoint every 10,000 WAL pages (~40 MiB), not 1,000: completion ids are random, so each row dirties
    # a page of their index, and a page dirtied by several commits is then copied to the database file once.
    cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    cursor.close()


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for a normalised URL (config.normalize_database_url)."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **kwargs)


async def passive_checkpoint(engine: AsyncEngine) -> None:
    """SQLite: copy the WAL into the database file now, without waiting for (or blocking) anyone: otherwise
    the commit that crosses wal_autocheckpoint pays for it, and that may be the writer's."""
    async with engine.connect() as conn:
        (await conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")).all()
        await conn.rollback()
