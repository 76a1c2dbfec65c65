"""The ledger at scale: query, page and command times, rollup rebuild time and size on disk over N rows.

Fills a SQLite or PostgreSQL ledger with bench.scale_data (skipped with --keep when it already holds
N calls), rebuilds the rollup tables from the rows (`chatledger db rollup --rebuild`: what an upgrade to
the rollups costs), runs ANALYZE (PostgreSQL: VACUUM ANALYZE), then measures with a fresh engine, each
figure the median of --repeat runs after one warm-up run:

- the queries alone, in this process: `stats --by day|model|key` over all time and over the last 7
  days (rollups), `--by day --since 7d --exact` (the rows), the dashboard overview's seven reads for
  its default period (stats by model, key, user, tag, upstream, the series, the percentiles), the
  list's first page and a page from the middle of the table, one call by its completion id and by its
  request id;
- the dashboard pages, served by the real app on a real port (handler time and round trip);
- the whole commands in a fresh process (`chatledger stats ...`, `logs -n 20`, `logs show <completion id>`);
- the size on disk (SQLite: the file, and each table with its indexes through dbstat where SQLite has it;
  PostgreSQL: pg_total_relation_size of each table), also per million rows.

Run: `python -m bench.scale_bench --url URL [--rows 10000000] [--days 90] [--keep] [--json FILE]`; URL is
a SQLite file path or URL, or a PostgreSQL URL (the database must exist).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from proxy.config import normalize_database_url, sqlite_path
from proxy.store.engine import create_engine
from proxy.store.filters import Filters
from proxy.store.latency import fetch_percentiles
from proxy.store.models import completions_table, usage_hourly_table
from proxy.store.queries import fetch_completion, fetch_completions
from proxy.store.rollup_rebuild import rebuild
from proxy.store.series import fetch_series
from proxy.store.stats import fetch_stats

from . import scale_data
from .dashboard_bench import page_times

c = completions_table.c
TARGET_MS = 100.0
PAGE_ROWS = 50  # the dashboard's list page; it reads one more row to know whether a next page exists
ROLLUP_TABLES = ("usage_hourly", "usage_daily", "usage_daily_users")
Query = Callable[[AsyncConnection], Awaitable[Any]]


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def count_rows(url: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            if not await conn.run_sync(lambda sync: sync.dialect.has_table(sync, "completions")):
                return 0
            return int((await conn.execute(select(func.count()).select_from(completions_table))).scalar_one())
    finally:
        await engine.dispose()


async def rolled_up_rows(url: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            total = await conn.execute(select(func.coalesce(func.sum(usage_hourly_table.c.requests), 0)))
            return int(total.scalar_one())
    finally:
        await engine.dispose()


async def rebuild_rollups(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        report = await rebuild(engine)
    finally:
        await engine.dispose()
    return {"seconds": report.seconds, "days": report.days, "rows": report.rows}


async def analyze(url: str) -> float:
    started = time.perf_counter()
    path = sqlite_path(url)
    if path is not None:
        await asyncio.to_thread(_analyze_sqlite, path)
    else:
        import asyncpg

        conn = await asyncpg.connect(_dsn(url))
        try:
            await conn.execute("VACUUM ANALYZE")
        finally:
            await conn.close()
    return time.perf_counter() - started


def _analyze_sqlite(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute("ANALYZE")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


async def middle_row(engine: AsyncEngine) -> dict[str, Any]:
    """The id, request id and completion id of the row halfway through the table, and the highest id."""
    async with engine.connect() as conn:
        top = (await conn.execute(select(func.max(c.id)))).scalar_one()
        row = (
            await conn.execute(
                select(c.id, c.request_id, c.completion_id)
                .where(c.id >= top // 2, c.completion_id.is_not(None))
                .order_by(c.id)
                .limit(1)
            )
        ).one()
    return {"max_id": top, "id": row.id, "request_id": row.request_id, "completion_id": row.completion_id}


def queries(now: datetime, middle: dict[str, Any]) -> list[tuple[str, Query]]:
    from proxy.web.dashboard.charts import bucket_for
    from proxy.web.dashboard.views import period_start

    week = Filters(since=now - timedelta(days=7))
    # the overview's default period as the page reads it: today and the six UTC days before
    period = Filters(since=period_start("7d", now))
    bucket = bucket_for(period.since, period.until, now)

    def stats(by: str, filters: Filters, exact: bool = False, percentiles: bool = True) -> Query:
        return lambda conn: fetch_stats(conn, by, filters, exact=exact, percentiles=percentiles)

    found: list[tuple[str, Query]] = []
    for by in ("day", "model", "key"):
        found.append((f"stats --by {by}", stats(by, Filters())))
        found.append((f"stats --by {by} --since 7d", stats(by, week)))
    found.append(("stats --by day --since 7d --exact (rows)", stats("day", week, exact=True)))
    for by in ("model", "key", "user", "tag", "upstream"):
        found.append((f"overview 7d: stats by {by}", stats(by, period, percentiles=False)))
    found.append((f"overview 7d: series by {bucket}", lambda conn: fetch_series(conn, period, bucket)))
    found.append(("overview 7d: percentiles", lambda conn: fetch_percentiles(conn, period)))
    found.append(("stats --by user --since 7d", stats("user", week)))
    found.append(("list: first page", lambda conn: fetch_completions(conn, Filters(), limit=PAGE_ROWS + 1)))
    found.append(
        (
            f"list: deep page (before id {middle['id']:,})",
            lambda conn: fetch_completions(conn, Filters(), limit=PAGE_ROWS + 1, before_id=middle["id"]),
        )
    )
    found.append(("logs -n 20 (query)", lambda conn: fetch_completions(conn, Filters(), limit=20)))
    found.append(("call by completion id", lambda conn: _one(conn, middle["completion_id"])))
    found.append(("call by request id", lambda conn: _one(conn, middle["request_id"])))
    return found


async def _one(conn: AsyncConnection, ident: str) -> list[dict[str, Any]]:
    rows = await fetch_completion(conn, ident)
    if not rows:
        raise RuntimeError(f"{ident!r} not found")
    return rows


async def time_queries(url: str, repeat: int, middle: dict[str, Any]) -> list[dict[str, Any]]:
    """Each query on its own connection, as the dashboard reads; a warm-up run, then the median of `repeat`."""
    engine = create_engine(url)
    results = []
    now = datetime.now(UTC)
    try:
        for name, run in queries(now, middle):
            times = []
            for attempt in range(repeat + 1):
                async with engine.connect() as conn:
                    started = time.perf_counter()
                    await run(conn)
                    if attempt:
                        times.append(time.perf_counter() - started)
            median = statistics.median(times) * 1000
            results.append({"name": name, "ms": median, "runs_ms": [t * 1000 for t in times]})
            print(f"  {name:<46} {median:10.1f} ms", flush=True)
        started = time.perf_counter()
        overview = [run for name, run in queries(now, middle) if name.startswith("overview")]
        for attempt in range(repeat + 1):
            if attempt == 1:
                started = time.perf_counter()
            await asyncio.gather(*(_read(engine, run) for run in overview))
        median = (time.perf_counter() - started) / repeat * 1000
        results.append({"name": "overview 7d: the seven side by side (mean)", "ms": median})
        print(f"  {'overview 7d: the seven side by side (mean)':<46} {median:10.1f} ms", flush=True)
    finally:
        await engine.dispose()
    return results


async def _read(engine: AsyncEngine, run: Query) -> Any:
    async with engine.connect() as conn:
        return await run(conn)


def pages(middle: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("overview, last 24 hours", "/_ledger/?since=24h"),
        ("overview, last 7 days (default)", "/_ledger/"),
        ("list, first page", "/_ledger/requests"),
        (f"list, deep page (cursor {middle['id']:,})", f"/_ledger/requests?cursor={middle['id']}"),
        ("one call", f"/_ledger/requests/{quote(middle['request_id'], safe='')}"),
    ]


async def time_pages(url: str, repeat: int, middle: dict[str, Any]) -> list[dict[str, Any]]:
    """Each page's handler time (queries and rendering) and round trip, served by the real app."""
    results = []
    for name, server, wall in await page_times(url, pages(middle), repeat):
        results.append({"name": name, "server_ms": server, "round_trip_ms": wall})
        print(f"  {name:<46} {server:10.1f} ms server {wall:10.1f} ms round trip", flush=True)
    return results


def commands(middle: dict[str, Any]) -> list[list[str]]:
    found = [["--version"]]
    for by in ("day", "model", "key"):
        found.append(["stats", "--by", by])
        found.append(["stats", "--by", by, "--since", "7d"])
    found.append(["stats", "--by", "day", "--since", "7d", "--exact"])
    found.append(["logs", "-n", "20"])
    found.append(["logs", "show", middle["completion_id"]])
    return found


def time_commands(url: str, repeat: int, middle: dict[str, Any]) -> list[dict[str, Any]]:
    """Wall time of `chatledger <args> --database URL` in a fresh interpreter: warm-up, then median of `repeat`."""
    env = {**os.environ, "CHATLEDGER_CONFIG": ""}
    results = []
    for args in commands(middle):
        command = [sys.executable, "-m", "proxy", *args]
        if args != ["--version"]:
            command += ["--database", url]
        times = []
        for attempt in range(repeat + 1):
            started = time.perf_counter()
            subprocess.run(command, capture_output=True, env=env, check=True)
            if attempt:
                times.append(time.perf_counter() - started)
        label = "chatledger " + " ".join(args if args[:2] != ["logs", "show"] else ["logs", "show", "<completion id>"])
        results.append({"name": label, "ms": statistics.median(times) * 1000})
        print(f"  {label:<46} {results[-1]['ms']:10.1f} ms", flush=True)
    return results


async def sizes(url: str, rows: int) -> dict[str, Any]:
    per_million = 1_000_000 / max(rows, 1)
    path = sqlite_path(url)
    tables: dict[str, int] = {}
    if path is not None:
        total = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
        tables = await asyncio.to_thread(_sqlite_objects, path)
    else:
        import asyncpg

        conn = await asyncpg.connect(_dsn(url))
        try:
            for record in await conn.fetch(
                "SELECT c.relname AS name, pg_total_relation_size(c.oid) AS size FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r' "
                "ORDER BY size DESC"
            ):
                tables[record["name"]] = int(record["size"])
            total = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
        finally:
            await conn.close()
    rollups = sum(size for name, size in tables.items() if name in ROLLUP_TABLES)
    return {
        "total_bytes": total,
        "bytes_per_million": total * per_million,
        "rollup_bytes": rollups,
        "rows_bytes_per_million": (total - rollups) * per_million,
        "tables": tables,
    }


def _sqlite_objects(path: Path) -> dict[str, int]:
    """Bytes of each table with its indexes, or {} where SQLite was built without the dbstat table."""
    db = sqlite3.connect(path)
    try:
        query = (
            "SELECT m.tbl_name, sum(d.pgsize) FROM dbstat AS d JOIN sqlite_master AS m ON m.name = d.name "
            "GROUP BY m.tbl_name"
        )
        return dict(db.execute(query).fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    url = normalize_database_url(args.url)
    database = "sqlite" if sqlite_path(url) is not None else "postgresql"
    result: dict[str, Any] = {
        "database": database,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}",
        "python": platform.python_version(),
    }
    held = await count_rows(url) if args.keep else 0
    if args.keep and held == args.rows:
        print(f"{database}: reusing the ledger ({held:,} calls)", flush=True)
        result["fill"] = None
    else:
        if held:
            raise SystemExit(f"the ledger holds {held:,} calls, not {args.rows:,}: give an empty one")
        print(f"{database}: filling {args.rows:,} calls over {args.days:g} days", flush=True)
        filled = await scale_data.fill(url, args.rows, args.days, args.seed)
        result["fill"] = {"seconds": filled.seconds, "choices": filled.choices}
        print(f"  filled in {filled.seconds:.0f} s", flush=True)
    rows = await count_rows(url)
    result["rows"] = rows
    if args.no_rebuild:
        if await rolled_up_rows(url) != rows:
            raise SystemExit("--no-rebuild: the rollups do not hold every row; rebuild them")
        result["rebuild"] = None
    else:
        result["rebuild"] = await rebuild_rollups(url)
        print(f"  rollups rebuilt in {result['rebuild']['seconds']:.0f} s ({result['rebuild']['days']} days)")
    result["analyze_seconds"] = await analyze(url)
    print(f"  analyzed in {result['analyze_seconds']:.0f} s", flush=True)
    engine = create_engine(url)
    try:
        middle = await middle_row(engine)
    finally:
        await engine.dispose()
    result["middle"] = middle
    print(f"queries alone (median of {args.repeat} after a warm-up, target {TARGET_MS:.0f} ms):", flush=True)
    result["queries"] = await time_queries(url, args.repeat, middle)
    print(f"dashboard pages (median of {args.repeat}):", flush=True)
    result["pages"] = await time_pages(url, args.repeat, middle)
    print(f"whole commands in a fresh process (median of {args.repeat}):", flush=True)
    result["commands"] = await asyncio.to_thread(time_commands, url, args.repeat, middle)
    result["size"] = await sizes(url, rows)
    report_size(result["size"], rows)
    return result


def report_size(size: dict[str, Any], rows: int) -> None:
    print(
        f"size on disk: {size['total_bytes'] / 2**20:,.0f} MiB for {rows:,} calls = "
        f"{size['bytes_per_million'] / 2**20:,.0f} MiB per million ({size['rollup_bytes'] / 2**20:,.1f} MiB rollups)"
    )
    for name, bytes_ in sorted(size["tables"].items(), key=lambda item: -item[1]):
        if bytes_ >= 2**20:
            print(f"  {name:<46} {bytes_ / 2**20:10,.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True, help="SQLite file path or URL, or a PostgreSQL URL")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=21, help="scale_data's seed (the same rows every run)")
    parser.add_argument("--keep", action="store_true", help="skip the fill when the ledger holds --rows calls")
    parser.add_argument(
        "--no-rebuild", action="store_true", help="skip the rollup rebuild (the rollups must hold every row)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
