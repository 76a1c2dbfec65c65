"""Writer microbenchmark: rows/s that proxy.writer.recorder.BatchRecorder sustains into SQLite and PostgreSQL.

Submits N realistic CompletionRecords (parsed from the benchmark's ChatCompletion, one choice each,
each with its own completion id and duration, as real traffic has) as fast as possible, waits until the
writer is idle, and checks every row arrived. Target: ≥ 20,000 rows/s each, so the writer is never the
bottleneck. With `--captured` it submits what the writer process
receives instead: calls as the request path captures them (request body, response read), so parsing is
measured too, reported in µs per call (the target is for writing rows). PostgreSQL runs on a scratch
database created (and dropped) on the server named by CHATLEDGER_TEST_POSTGRES_URL.

`--prefill 1000000` first copies a row a million times, so the rate is the one into a ledger that has
grown (indexes no longer in cache), not into an empty one. `--ledger URL` writes into an existing ledger
instead (e.g. one filled by bench.scale_data), then deletes the rows it wrote and rebuilds the rollups of
the days it touched, unless `--keep-rows`.

Run: `python -m bench.writer_bench [--rows 50000] [--repeat 3] [--only sqlite|postgresql] [--captured]
[--prefill N] [--ledger URL [--keep-rows]] [--profile]`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import functools
import io
import os
import pstats
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.config import DatabaseConfig, normalize_database_url
from proxy.parse.capture import Capture
from proxy.parse.chat_json import parse_completion_body
from proxy.parse.record import CompletionRecord
from proxy.relay.request_ids import new_request_id
from proxy.runtime import tune_garbage_collector, tune_writer_threads
from proxy.store.engine import create_engine
from proxy.store.migrate import upgrade
from proxy.store.models import choices_table, completions_table
from proxy.writer.recorder import BatchRecorder as Recorder

from .payloads import COMPLETION, COMPLETION_BODY, request_body

PG_ENV = "CHATLEDGER_TEST_POSTGRES_URL"
TARGET = 20_000
PREFILL_DAYS = 90
ID_DIGITS = 29


def template() -> CompletionRecord:
    record = CompletionRecord(
        request_id=new_request_id(),
        started_at=datetime.now(UTC),
        method="POST",
        path="/v1/chat/completions",
        upstream="https://api.openai.com",
    )
    if not parse_completion_body(record, COMPLETION_BODY):
        raise RuntimeError("the benchmark completion no longer parses")
    record.status_code = 200
    record.requested_model = "gpt-4o"
    record.duration_ms = 412.317
    record.ttft_ms = 412.317
    record.api_key_hash = "e9a731f2476fdd03"
    record.user = "user-1234"
    record.tags = {"team": "search", "env": "prod"}
    record.upstream_request_id = "req_bench_0123456789abcdef"
    assert len(record.choices) == 1
    return record


def completion_id() -> str:
    """A fresh upstream id, as real traffic has (chatcmpl- and 29 random characters). One id for every row
    would append to the completion_id index instead of landing anywhere in it, and flatter the writer.
    Hex digits, as --prefill's ids are: with another alphabet most new ids would sort into ranges the
    prefilled rows leave empty, and flatter it again."""
    return "chatcmpl-" + random.randbytes(15).hex()[:ID_DIGITS]


def duration_ms() -> float:
    """Durations spread as real calls' are, for the same reason: the stats index holds duration_ms."""
    return round(random.uniform(200.0, 9000.0), 3)


SPREAD_USERS = tuple(f"user-{n:04d}" for n in range(2000))
SPREAD_MODELS = tuple(f"vendor/model-{n:02d}" for n in range(20))
SPREAD_KEYS = tuple(f"{n:016x}" for n in range(50))


def records(count: int, spread: bool = False) -> list[CompletionRecord]:
    """`count` calls like the template; with `spread`, each from one of 2,000 users, 50 keys and 20 models
    (skewed, as real traffic is), so a batch adds to as many rollup groups as a busy ledger's does."""
    base = template()
    now = datetime.now(UTC)
    out = []
    for _ in range(count):
        record = dataclasses.replace(
            base, request_id=new_request_id(), started_at=now, completion_id=completion_id(),
            duration_ms=duration_ms(), choices=list(base.choices),
        )  # fmt: skip
        if spread:
            record.user = SPREAD_USERS[int(random.paretovariate(0.8)) % len(SPREAD_USERS)]
            record.model = record.requested_model = SPREAD_MODELS[int(random.paretovariate(1.2)) % 20]
            record.api_key_hash = SPREAD_KEYS[int(random.paretovariate(1.0)) % len(SPREAD_KEYS)]
        out.append(record)
    return out


def captured_calls(count: int) -> list[Capture]:
    """Non-streamed calls as the relay captures them: the writer parses the request and response bodies."""
    body = request_body(stream=False, include_usage=True)
    now, wall = time.perf_counter(), time.time()
    template_id = COMPLETION["id"].encode()
    calls = []
    for _ in range(count):
        response = COMPLETION_BODY.replace(template_id, completion_id().encode(), 1)
        took = duration_ms() / 1000
        capture = Capture(
            request_id=new_request_id(), started_wall=wall, started=now, method="POST",
            path="/v1/chat/completions", upstream="https://api.openai.com", api="chat", api_key_hash="e9a731f2476fdd03",
            secrets=(("e9a731f2476fdd03", 51),), tag_headers=["team=search,env=prod"], user_header=None,
            request_body=body,
            status=200, upstream_request_id="req_bench_0123456789abcdef", encoding=None,
            event_stream=False, headers_at=now + took - 0.01, chunks=[response], times=None,
            finished=now + took, overflow=False, failure=None,
        )  # fmt: skip
        calls.append(capture)
    return calls


def prefill_sql(dialect: str, quote: Any) -> tuple[str, str]:
    """Copy the first row `:rows` times with fresh ids and durations (the writer's own row, so every column
    is as the writer fills it), then give each copy its choice. The copies are an older ledger's: their
    request ids sort before any UUIDv7 of today, and they started over the PREFILL_DAYS before the last
    hour, in id order (`:step` seconds apart); their completion ids are random hex digits, as
    completion_id() makes them. Both INSERT ... SELECT: ~30 s per million rows."""
    columns = [column.name for column in completions_table.columns if column.name != "id"]
    back = "(3600 + (:rows - s.n) * CAST(:step AS DOUBLE PRECISION))"  # seconds before the first row's start
    if dialect == "sqlite":
        series = (
            "(WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < :rows) SELECT n FROM seq)"
        )
        fresh = {
            "request_id": "printf('00000000-0000-7000-8000-%012x', s.n)",
            "completion_id": f"'chatcmpl-' || substr(lower(hex(randomblob(15))), 1, {ID_DIGITS})",
            "duration_ms": "200 + abs(random() % 8800000) / 1000.0",
            "started_at": f"strftime('%Y-%m-%d %H:%M:%f', t.started_at, printf('-%f seconds', {back})) || '000'",
            "started_hour": f"CAST(strftime('%s', t.started_at, printf('-%f seconds', {back})) AS INTEGER) / 3600",
        }
    else:
        series = "(SELECT generate_series(1, :rows) AS n)"
        fresh = {
            "request_id": "'00000000-0000-7000-8000-' || lpad(to_hex(s.n), 12, '0')",
            "completion_id": f"'chatcmpl-' || substr(md5(random()::text), 1, {ID_DIGITS})",
            "duration_ms": "200 + random() * 8800",
            "started_at": f"t.started_at - make_interval(secs => {back})",
            "started_hour": f"floor(extract(epoch FROM t.started_at - make_interval(secs => {back})) / 3600)",
        }
    names = ", ".join(quote(name) for name in columns)
    values = ", ".join(fresh.get(name, f"t.{quote(name)}") for name in columns)
    copies = (
        f"INSERT INTO completions ({names}) SELECT {values} FROM {series} AS s, "
        "(SELECT * FROM completions ORDER BY id LIMIT 1) AS t"
    )
    choice = 'completion_pk, "index", finish_reason, native_finish_reason, role'
    choices = (  # each copy gets the first row's choice, as the writer wrote it
        f"INSERT INTO completion_choices ({choice}) SELECT c.id, f.\"index\", f.finish_reason, "
        "f.native_finish_reason, f.role FROM completions AS c, (SELECT * FROM completion_choices "
        "WHERE completion_pk = (SELECT min(id) FROM completions)) AS f WHERE c.id > :after"
    )
    return copies, choices


async def prefill(engine: AsyncEngine, rows: int) -> None:
    started = time.perf_counter()
    async with engine.begin() as conn:
        copies, choices = prefill_sql(conn.dialect.name, conn.dialect.identifier_preparer.quote)
        after = (await conn.execute(select(func.max(completions_table.c.id)))).scalar_one()
        await conn.execute(text(copies), {"rows": rows, "step": PREFILL_DAYS * 86400 / rows})
        await conn.execute(text(choices), {"after": after})
    # start measuring from a settled database: no WAL to copy back, no autovacuum pass due on PostgreSQL
    async with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        else:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("VACUUM ANALYZE")
            await conn.exec_driver_sql("CHECKPOINT")
    print(f"  {engine.dialect.name}: prefilled {rows:,} rows in {time.perf_counter() - started:.0f}s", flush=True)


async def remove_written(engine: AsyncEngine, last_id: int, since: datetime) -> None:
    """Delete the rows after `last_id` (their choices go with them) and rebuild the rollups from `since`'s
    day, so the ledger is as it was (on PostgreSQL vacuumed too)."""
    from proxy.store.rollup_rebuild import rebuild

    started = time.perf_counter()
    async with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        await conn.execute(choices_table.delete().where(choices_table.c.completion_pk > last_id))
        await conn.execute(completions_table.delete().where(completions_table.c.id > last_id))
    await rebuild(engine, since)
    if engine.dialect.name == "postgresql":  # the next run starts without the dead rows, as autovacuum keeps a ledger
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("VACUUM ANALYZE completions, completion_choices")
    print(f"  removed the rows written and rebuilt today's rollups in {time.perf_counter() - started:.0f}s")


@asynccontextmanager
async def scratch_postgres(admin_url: str) -> AsyncIterator[str]:
    import asyncpg

    dsn = admin_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    name = f"chatledger_bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield normalize_database_url(dsn.rsplit("/", 1)[0] + f"/{name}")
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def bench_url(
    url: str,
    rows: int,
    repeat: int,
    batch_max: int,
    profile: bool,
    captured: bool = False,
    prefill_rows: int = 0,
    existing: bool = False,
    keep_rows: bool = True,
    spread: bool = False,
) -> dict[str, Any]:
    """`existing`: the ledger at `url` already holds rows; unless `keep_rows`, the rows written here are
    deleted afterwards and the rollups of the days they touched rebuilt."""
    make = captured_calls if captured else functools.partial(records, spread=spread)
    engine = create_engine(url)
    batches: list[int] = []
    try:
        await upgrade(engine)
        async with engine.connect() as conn:
            held = (await conn.execute(select(func.count()).select_from(completions_table))).scalar_one()
            last_id = (await conn.execute(select(func.coalesce(func.max(completions_table.c.id), 0)))).scalar_one()
        if held and not existing:
            raise RuntimeError(f"{url} already holds {held:,} rows")
        started_at = datetime.now(UTC)
        with tempfile.TemporaryDirectory(prefix="writer-bench-") as spool:
            recorder = Recorder(
                engine,
                Path(spool),
                queue_max=rows * 2,
                batch_max=batch_max,
                # the whole run is submitted at once: with the default 1 s hold guard, what waits longer
                # than that (by construction, most of it) would be measured going through the spool
                hold_max=3600.0,
                on_batch=lambda batch: batches.append(len(batch)),
            )
            await recorder.start()
            try:
                for record in make(min(2000, rows)):  # warm-up: connections, statement cache
                    recorder.submit(record)
                await recorder.wait_idle(120)
                expected = held + recorder.rows_written
                if prefill_rows:
                    await prefill(engine, prefill_rows)
                    expected += prefill_rows
                rates = []
                profiler = cProfile.Profile() if profile else None
                for _ in range(repeat):
                    batch = make(rows)
                    batches.clear()
                    if profiler is not None:
                        profiler.enable()
                    started = time.perf_counter()
                    for record in batch:
                        recorder.submit(record)
                    await recorder.wait_idle(600)
                    elapsed = time.perf_counter() - started
                    if profiler is not None:
                        profiler.disable()
                    expected += rows
                    rates.append(rows / elapsed)
                    print(
                        f"  {engine.dialect.name}: {rows:,} rows in {elapsed:.2f}s = "
                        f"{rows / elapsed:,.0f} rows/s ({len(batches)} batches, "
                        f"mean {statistics.fmean(batches) if batches else 0:.0f} rows)",
                        flush=True,
                    )
                written, spooled = recorder.rows_written, recorder.rows_spooled
            finally:
                await recorder.close()
        async with engine.connect() as conn:
            in_db = (await conn.execute(select(func.count()).select_from(completions_table))).scalar_one()
            if existing:  # the choices written here: one per row
                new = select(func.count()).where(choices_table.c.completion_pk > last_id)
                choices = held + (await conn.execute(new)).scalar_one()
            else:
                choices = (await conn.execute(select(func.count()).select_from(choices_table))).scalar_one()
        if existing and not keep_rows:
            await remove_written(engine, last_id, started_at)
    finally:
        await engine.dispose()
    result = {
        "dialect": engine.dialect.name,
        "rows_per_s": rates,
        "best": max(rates),
        "median": statistics.median(rates),
        "rows_in_db": in_db,
        "choice_rows": choices,
        "expected": expected,
        "written": written,
        "spooled": spooled,
    }
    result["captured"] = captured
    if profile and profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        result["profile"] = out.getvalue()
    return result


def report(result: dict[str, Any]) -> None:
    ok = result["rows_in_db"] == result["expected"] == result["choice_rows"] and result["spooled"] == 0
    if result["captured"]:  # the target is for inserting rows; this adds parsing: report the cost per call
        verdict = f"{1e6 / result['median']:.0f} µs per call"
    else:
        verdict = f"{'PASS' if result['median'] >= TARGET else 'FAIL'}, target ≥ {TARGET:,}"
    source = " (captured calls)" if result["captured"] else ""
    print(
        f"{result['dialect']}{source}: median {result['median']:,.0f} rows/s, best {result['best']:,.0f} "
        f"({verdict}); rows in db {result['rows_in_db']:,} "
        f"/ expected {result['expected']:,}, "
        f"choices {result['choice_rows']:,}, spooled {result['spooled']} ({'ok' if ok else 'MISMATCH'})"
    )
    if "profile" in result:
        print(result["profile"])


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each database's result, printed as it comes (PostgreSQL only with CHATLEDGER_TEST_POSTGRES_URL)."""
    results = []
    settings = (args.rows, args.repeat, args.batch_max, args.profile, args.captured, args.prefill)
    if args.ledger:
        url = normalize_database_url(args.ledger)
        results.append(
            await bench_url(url, *settings, existing=True, keep_rows=args.keep_rows, spread=args.spread)
        )
        report(results[-1])
        return results
    if args.only in (None, "sqlite"):
        with tempfile.TemporaryDirectory(prefix="writer-bench-db-") as directory:
            results.append(
                await bench_url(f"sqlite+aiosqlite:///{directory}/ledger.db", *settings, spread=args.spread)
            )
            report(results[-1])
    if args.only in (None, "postgresql"):
        admin = os.environ.get(PG_ENV)
        if not admin:
            print(f"postgresql: skipped, set {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)")
        else:
            async with scratch_postgres(admin) as url:
                results.append(await bench_url(url, *settings, spread=args.spread))
                report(results[-1])
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=50_000, help="rows per measurement (default 50,000)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--batch-max",
        type=int,
        default=DatabaseConfig().batch_max,
        help=f"Recorder batch_max (default: the config's, {DatabaseConfig().batch_max})",
    )
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    parser.add_argument(
        "--captured",
        action="store_true",
        help="submit captured calls (what the writer process receives), so parsing them is measured too",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the writer and print the top 30")
    parser.add_argument(
        "--prefill",
        type=int,
        default=0,
        help="rows in the ledger before measuring (e.g. 1000000: the sustained rate into a ledger that has "
        "grown; an empty one keeps every index in cache)",
    )
    parser.add_argument(
        "--ledger",
        metavar="URL",
        help="write into this existing ledger (SQLite path or URL, or PostgreSQL URL) instead of fresh ones",
    )
    parser.add_argument(
        "--spread",
        action="store_true",
        help="rows from 2,000 users, 50 keys and 20 models instead of one of each (the rollups' many-groups case)",
    )
    parser.add_argument(
        "--keep-rows", action="store_true", help="with --ledger: leave the rows written (default: delete them)"
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """measure() on uvloop when installed, with the collector and thread switching tuned, as the writer
    process runs."""
    tune_garbage_collector()
    tune_writer_threads()
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.run(measure(args))
    return uvloop.run(measure(args))


def main() -> int:
    run(parse_args())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
