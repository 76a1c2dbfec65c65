"""Pruning under load: how long `chatledger db prune` takes on a filled ledger, and how long the writer's
batches wait meanwhile.

A writer inserts at a steady rate through the writer's own insert path (store.insert.BatchWriter, one
transaction per batch every --flush seconds, as the recorder does), first alone for --baseline seconds,
then while `chatledger db prune` (the real command, in its own process, as a user would run it) deletes
the oldest ~--prune rows: the cut is the first UTC midnight before which at least that many calls
started. Reported: the prune's rows, batches, longest batch and seconds; the writer's batch times (p50,
p99, worst) alone and during the prune; the space the prune gave back (SQLite file size before and
after, and what the prune reports).

Run: `python -m bench.prune_bench --url URL [--fill 2000000 --days 90] [--prune 1000000] [--rate 400]`;
`--fill` first adds that many calls with bench.scale_data (a fresh SQLite path or empty PostgreSQL
database). The ledger loses the pruned rows: use a copy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.config import normalize_database_url, sqlite_path
from proxy.store.engine import create_engine
from proxy.store.insert import BatchWriter
from proxy.store.models import completions_table
from proxy.store.rows import record_to_row
from proxy.writer.wal import WalCheckpoints

from .scale_data import fill, size_on_disk
from .writer_bench import records

c = completions_table.c


async def choose_cut(engine: AsyncEngine, rows: int) -> tuple[datetime, int]:
    """The first UTC midnight with at least `rows` calls before it, and how many there are."""
    day = (c.started_hour // 24).label("day")
    query = select(day, func.count()).group_by(day).order_by(day)
    total = 0
    async with engine.connect() as conn:
        for number, count in (await conn.execute(query)).all():
            total += count
            if total >= rows:
                return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=int(number) + 1), total
    raise SystemExit(f"the ledger holds only {total:,} calls; fill more or prune fewer")


class SteadyWriter:
    """Inserts `rate` calls a second in batches every `flush` seconds; times each batch (begin to commit).
    As the writer does, it checkpoints SQLite's WAL in the background (writer.wal)."""

    def __init__(self, engine: AsyncEngine, rate: int, flush: float) -> None:
        self.engine, self.rate, self.flush = engine, rate, flush
        self.writer = BatchWriter(engine.dialect.name)
        self.times: list[float] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        per_batch = max(1, round(self.rate * self.flush))
        tick = time.perf_counter()
        checkpoints = WalCheckpoints(self.engine)
        checkpoints.start()
        try:
            while not self._stop.is_set():
                rows = [record_to_row(record) for record in records(per_batch)]
                began = time.perf_counter()
                async with self.engine.begin() as conn:
                    await self.writer.insert(conn, rows)
                self.times.append(time.perf_counter() - began)
                tick += self.flush
                await asyncio.sleep(max(0.0, tick - time.perf_counter()))
        finally:
            await checkpoints.stop()

    def stop(self) -> None:
        self._stop.set()


def summary(times: list[float]) -> str:
    if not times:
        return "no batches"
    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    slow = sum(1 for t in ms if t > 100)
    return (
        f"{len(ms)} batches, p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, worst {ms[-1]:.1f} ms, "
        f"{slow} over 100 ms"
    )


async def writing(engine: AsyncEngine, rate: int, flush: float, during: Any) -> tuple[list[float], Any]:
    """Run the steady writer while `during` (a coroutine) runs; its batch times and `during`'s result."""
    writer = SteadyWriter(engine, rate, flush)
    task = asyncio.create_task(writer.run())
    try:
        result = await during
    finally:
        writer.stop()
        await task
    return writer.times, result


async def prune_command(url: str, cut: datetime) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "db", "prune", "--before", cut.date().isoformat(), "--json",
        "--database", url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    if process.returncode:
        raise SystemExit(f"chatledger db prune failed: {err.decode()}")
    report: dict[str, Any] = json.loads(out)
    return report


async def bench(args: argparse.Namespace) -> None:
    url = normalize_database_url(args.url)
    if args.fill:
        filled = await fill(url, args.fill, args.days)
        print(f"filled {filled.rows:,} calls in {filled.seconds:.0f} s, {filled.size_bytes / 2**20:,.0f} MiB")
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            total = (await conn.execute(select(func.count()).select_from(completions_table))).scalar_one()
        cut, doomed = await choose_cut(engine, args.prune)
        print(f"{engine.dialect.name}: {total:,} calls; pruning the {doomed:,} before {cut.date()}", flush=True)
        alone, _ = await writing(engine, args.rate, args.flush, asyncio.sleep(args.baseline))
        print(f"writer alone ({args.rate}/s):  {summary(alone)}", flush=True)
        size_before = await size_on_disk(url)
        started = time.perf_counter()
        during, report = await writing(engine, args.rate, args.flush, prune_command(url, cut))
        wall = time.perf_counter() - started
        size_after = await size_on_disk(url)
    finally:
        await engine.dispose()
    print(f"writer during the prune: {summary(during)}")
    returned = report["space_returned"]
    print(
        f"prune: {report['rows']:,} calls and {report['choices']:,} choices in {report['seconds']:.1f} s "
        f"({report['rows'] / max(report['seconds'], 1e-9):,.0f} calls/s, {wall:.1f} s with the process start); "
        f"{report['batches']:,} batches; p99 {report['p99_batch_ms']:.0f} ms, "
        f"longest {report['longest_batch_ms']:.0f} ms (vacuum steps included)"
    )
    path = sqlite_path(url)
    print(
        f"size on disk: {size_before / 2**20:,.0f} MiB before, {size_after / 2**20:,.0f} MiB after"
        + (f"; the prune returned {returned / 2**20:,.0f} MiB" if returned is not None else "")
        + ("" if path is not None else " (PostgreSQL reuses the space; the files do not shrink)")
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True, help="SQLite file path or URL, or a PostgreSQL URL")
    parser.add_argument("--fill", type=int, default=0, help="first add this many calls (bench.scale_data)")
    parser.add_argument("--days", type=float, default=90.0, help="with --fill: over this many days")
    parser.add_argument("--prune", type=int, default=1_000_000, help="prune about this many calls")
    parser.add_argument("--rate", type=int, default=400, help="calls per second the writer inserts")
    parser.add_argument("--flush", type=float, default=0.25, help="seconds between the writer's batches")
    parser.add_argument("--baseline", type=float, default=20.0, help="seconds the writer runs alone first")
    args = parser.parse_args(argv)
    if sqlite_path(normalize_database_url(args.url)) is None and not args.url.startswith("postgres"):
        raise SystemExit("--url: a SQLite path or a PostgreSQL URL")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
