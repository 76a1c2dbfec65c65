"""Server time of each dashboard page over a 1,000,000-row ledger, on SQLite and PostgreSQL.

The ledger is filled by query_bench.fill (60 days of varied synthetic rows, one INSERT ... SELECT); the
PostgreSQL ledger gets the same rows copied over (COPY), then VACUUM ANALYZE; each one's rollups are then
rebuilt from its rows. The proxy runs in this
process on a real port, built by the real app factory; a middleware added for the bench times each
page's handler (server time: queries and template rendering), and the client also records the round
trip. Each page is fetched `--repeat` times after one warm-up; medians are reported.

    python -m bench.dashboard_bench                       # 1,000,000 rows, SQLite (+ PostgreSQL if set)
    python -m bench.dashboard_bench --rows 200000 --only sqlite
    CHATLEDGER_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test python -m bench.dashboard_bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from proxy.config import load
from proxy.relay.server_compat import make_runner
from proxy.store.models import choices_table, completions_table
from proxy.store.rollup_rebuild import rebuild
from proxy.web.app import create_app

from .query_bench import DAYS, fill
from .writer_bench import PG_ENV, scratch_postgres

END = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=DAYS)


def pages(rows: int, deep_id: int, request_id: str) -> list[tuple[str, str]]:
    def iso(moment: datetime) -> str:
        return quote(moment.isoformat(), safe="")

    week, month = iso(END - timedelta(days=7)), iso(END - timedelta(days=30))
    return [
        ("overview, 7 days", f"/_ledger/?since={week}&until={iso(END)}"),
        ("overview, 30 days", f"/_ledger/?since={month}&until={iso(END)}"),
        ("list, first page (50)", "/_ledger/requests"),
        ("list, model glob gpt-4o*", "/_ledger/requests?model=gpt-4o*"),
        (f"list, deep page (cursor {deep_id:,})", f"/_ledger/requests?cursor={deep_id}"),
        ("list, glob + deep cursor", f"/_ledger/requests?model=gpt-4o*&cursor={deep_id}"),
        ("detail", f"/_ledger/requests/{request_id}"),
    ]


async def copy_to_postgres(source: Path, url: str) -> float:
    """The SQLite ledger's rows into a migrated PostgreSQL database, with COPY."""
    import asyncpg

    from proxy.store.engine import create_engine
    from proxy.store.migrate import upgrade

    started = time.perf_counter()
    engine = create_engine(url)
    await upgrade(engine)
    await engine.dispose()
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    db = sqlite3.connect(source)
    try:
        for table in (completions_table, choices_table):
            columns = [column.name for column in table.columns]
            convert = [_converter(table.name, name) for name in columns]
            quoted = ", ".join(f'"{name}"' for name in columns)
            cursor = db.execute(f"SELECT {quoted} FROM {table.name} ORDER BY id")
            while batch := cursor.fetchmany(50_000):
                records = [tuple(f(v) for f, v in zip(convert, row, strict=True)) for row in batch]
                await conn.copy_records_to_table(table.name, records=records, columns=columns)
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('completions', 'id'), (SELECT max(id) FROM completions))"
        )
        await conn.execute("VACUUM ANALYZE")
    finally:
        db.close()
        await conn.close()
    return time.perf_counter() - started


def _converter(table: str, column: str) -> Any:
    def same(value: Any) -> Any:
        return value

    if table != "completions":
        return same
    if column == "started_at":
        return lambda v: None if v is None else datetime.fromisoformat(v).replace(tzinfo=UTC)
    if column == "stream":
        return lambda v: None if v is None else bool(v)
    if column == "cost":
        return lambda v: None if v is None else Decimal(str(round(v, 12)))
    if column in ("usage", "tags"):
        return lambda v: None if v is None else json.dumps(json.loads(v))
    return same


async def page_times(url: str, paths: list[tuple[str, str]], repeat: int) -> list[tuple[str, float, float]]:
    """(name, server ms, round-trip ms) of each page, the median of `repeat` fetches after a warm-up, served
    by the real app factory on a real port; server time is the handler's (queries and rendering), taken by
    a middleware added for the bench."""
    config = load(None, {("database", "url"): url, ("upstream", "url"): "http://127.0.0.1:9"}, environ={})
    config = config.replace("database", writer="inline", auto_migrate=False)
    app = create_app(config, migrate=False)
    handler_times: list[float] = []

    @web.middleware
    async def timing(request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            return await handler(request)
        finally:
            handler_times.append(time.perf_counter() - started)

    app.middlewares.append(timing)
    runner = make_runner(app, config, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    results = []
    try:
        async with aiohttp.ClientSession() as session:
            for name, path in paths:
                server, wall = [], []
                for attempt in range(repeat + 1):
                    handler_times.clear()
                    started = time.perf_counter()
                    async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                        await response.read()
                        if response.status != 200:
                            raise RuntimeError(f"{path}: HTTP {response.status}")
                    if attempt:  # the first fetch warms caches and the template
                        wall.append(time.perf_counter() - started)
                        server.append(handler_times[-1])
                results.append((name, statistics.median(server) * 1000, statistics.median(wall) * 1000))
    finally:
        await runner.cleanup()
    return results


async def time_pages(url: str, repeat: int) -> list[tuple[str, float, float]]:
    from sqlalchemy import func, select

    from proxy.store.engine import create_engine

    engine = create_engine(url)
    await rebuild(engine)  # the fill writes rows only; the overview reads the rollups
    async with engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(completions_table))).scalar_one()
        deep_id = max(1, total // 20)
        request_id = (
            await conn.execute(select(completions_table.c.request_id).where(completions_table.c.id == total // 2))
        ).scalar_one()
    await engine.dispose()
    results = await page_times(url, pages(total, deep_id, request_id), repeat)
    for name, server, wall in results:
        print(f"  {name:<36} {server:9.1f} ms server  {wall:9.1f} ms round trip", flush=True)
    return results


async def measure(args: argparse.Namespace, sqlite_path: Path) -> None:
    if args.only in (None, "sqlite"):
        print(f"sqlite ({args.rows:,} rows), median of {args.repeat}:")
        await time_pages(f"sqlite+aiosqlite:///{sqlite_path}", args.repeat)
    if args.only in (None, "postgresql"):
        admin = os.environ.get(PG_ENV)
        if not admin:
            print(f"postgresql: skipped, set {PG_ENV}")
            return
        async with scratch_postgres(admin) as url:
            seconds = await copy_to_postgres(sqlite_path, url)
            print(f"postgresql ({args.rows:,} rows, copied in {seconds:.0f} s), median of {args.repeat}:")
            await time_pages(url, args.repeat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    parser.add_argument("--db", type=Path, help="SQLite ledger to fill (or reuse with --keep)")
    parser.add_argument("--keep", action="store_true", help="reuse --db if it holds --rows rows")
    args = parser.parse_args()
    workdir = tempfile.TemporaryDirectory(prefix="chatledger-dash-bench-")
    path = args.db or Path(workdir.name) / "ledger.db"
    reuse = False
    if args.keep and path.exists():
        with sqlite3.connect(path) as db:
            reuse = db.execute("SELECT count(*) FROM completions").fetchone()[0] == args.rows
    if not reuse:
        path.unlink(missing_ok=True)
        print(f"filled {args.rows:,} rows in {fill(path, args.rows):.0f} s", flush=True)
    try:
        asyncio.run(measure(args, path))
    finally:
        workdir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
