"""Shared fixtures: a fake upstream, a database per test (SQLite file and PostgreSQL), and the proxy
itself serving on a real port, built by the real app factory.

PostgreSQL tests use the server named by CHATLEDGER_TEST_POSTGRES_URL (for example
postgresql://postgres@127.0.0.1:5432/test); each test gets its own freshly created database, dropped
afterwards. Without that variable they are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.config import Config, load, normalize_database_url
from proxy.relay.server_compat import make_runner
from proxy.store.engine import create_engine
from proxy.store.models import choices_table, completions_table
from proxy.web.app import create_app
from proxy.web.appkeys import RECORDER
from proxy.writer.recorder import BatchRecorder as Recorder

from .payloads import OPENAI_BASIC
from .upstream import FakeUpstream, json_reply

PG_ENV = "CHATLEDGER_TEST_POSTGRES_URL"
PG_SKIP_REASON = f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test); .ci/run sets it"


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    admin = os.environ.get(PG_ENV)
    if not admin:
        pytest.skip(PG_SKIP_REASON)
    name = f"chatledger_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_asyncpg_dsn(admin))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = admin.rsplit("/", 1)[0]
    yield normalize_database_url(f"{base}/{name}")
    conn = await asyncpg.connect(_asyncpg_dsn(admin))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every database behaviour runs twice: on a SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.add("basic", json_reply(OPENAI_BASIC))
    await fake.start()
    yield fake
    await fake.stop()


@dataclass
class Ledger:
    """The proxy under test, serving on a real port, plus access to what it logged."""

    app: web.Application
    runner: web.AppRunner
    port: int
    config: Config
    engine: AsyncEngine

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def recorder(self) -> Recorder:
        return self.app[RECORDER]

    async def rows(self, count: int = 0, patience: float = 10.0) -> list[dict[str, Any]]:
        """Every logged completion (oldest first), each with its `choices`, after the writer caught up.

        A handler hands its record over only after the client has its last byte, so a test that just
        finished reading may be ahead of it: with `count`, wait until at least that many rows exist.
        """
        deadline = asyncio.get_running_loop().time() + patience
        while True:
            await self.recorder.wait_idle(patience)
            completions = await self._select()
            if len(completions) >= count or asyncio.get_running_loop().time() > deadline:
                return completions
            await asyncio.sleep(0.02)

    async def _select(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            completions = [dict(r._mapping) for r in await conn.execute(
                select(completions_table).order_by(completions_table.c.id))]
            choices = [dict(r._mapping) for r in await conn.execute(
                select(choices_table).order_by(choices_table.c.completion_pk, choices_table.c.index))]
        for row in completions:
            row["choices"] = [c for c in choices if c["completion_pk"] == row["id"]]
        return completions

    async def row(self) -> dict[str, Any]:
        rows = await self.rows(count=1)
        assert len(rows) == 1, rows
        return rows[0]

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.engine.dispose()


async def start_ledger(config: Config) -> Ledger:
    app = create_app(config)
    runner = make_runner(app, config, handler_cancellation=True, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Ledger(app, runner, port, config, create_engine(config.database.url))


def make_config(upstream_url: str, database_url: str, tmp_path: Path, **sections: dict[str, Any]) -> Config:
    config = load(
        None,
        {("upstream", "url"): upstream_url, ("database", "url"): database_url},
        environ={},
    )
    # inline writer: one process per test keeps the suite fast; test_writer_process runs the default
    # and rows sooner than the default flush_interval: the suite waits for rows hundreds of times
    config = config.replace("database", spool_dir=str(tmp_path / "spool"), writer="inline", flush_interval=0.05)
    for section, changes in sections.items():
        config = config.replace(section, **changes)
    return config


@pytest.fixture
def ledger_config(upstream: FakeUpstream, database_url: str, tmp_path: Path) -> Config:
    return make_config(upstream.url, database_url, tmp_path)


@pytest.fixture
async def ledger(ledger_config: Config) -> AsyncIterator[Ledger]:
    proxy = await start_ledger(ledger_config)
    yield proxy
    await proxy.stop()
