"""How fast `chatledger logs` and `chatledger stats --by model` answer over 1,000,000 logged completions.

Standalone: builds (or reuses) a SQLite ledger with the schema and indexes the migrations create,
fills it with N synthetic rows in a few seconds (one INSERT ... SELECT over a recursive CTE, indexes
dropped during the load and recreated from their own DDL), then times the real commands in a fresh
process (what a user waits for) and the queries alone in-process.

    python bench/query_bench.py                 # 1,000,000 rows in a temporary directory
    python bench/query_bench.py --rows 200000 --db /tmp/ledger.db --keep
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REQUESTED = (
    "gpt-4o",
    "gpt-4o-mini",
    "openai/gpt-4.1",
    "anthropic/claude-sonnet-4",
    "google/gemini-2.5-pro",
    "meta-llama/llama-3.3-70b-instruct",
    "deepseek/deepseek-r1",
    "o3-mini",
    "mistralai/mistral-large",
    "qwen/qwen3-235b-a22b",
    "x-ai/grok-3",
    "gpt-4.1-nano",
)
RESPONDED = (  # what the upstream reports back (dated snapshots for some)
    "gpt-4o-2024-08-06",
    "gpt-4o-mini-2024-07-18",
    "openai/gpt-4.1",
    "anthropic/claude-sonnet-4",
    "google/gemini-2.5-pro",
    "meta-llama/llama-3.3-70b-instruct",
    "deepseek/deepseek-r1",
    "o3-mini-2025-01-31",
    "mistralai/mistral-large",
    "qwen/qwen3-235b-a22b",
    "x-ai/grok-3",
    "gpt-4.1-nano-2025-04-14",
)
FINISH = ("stop", "stop", "stop", "stop", "length", "tool_calls", "content_filter", "error")
OUTCOMES = ("ok",) * 37 + ("upstream_error", "client_disconnected", "timeout")
DAYS = 60


def _values(items: tuple[str, ...]) -> str:
    return " ".join(f"WHEN {i} THEN '{item}'" for i, item in enumerate(items))


# a, b, c: independent pseudo-random numbers derived from n (deterministic, so re-evaluating an inlined
# CTE column gives the same value; random() would not)
FILL_COMPLETIONS = f"""
WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < :rows),
h AS (SELECT n, (n * 2654435761) % 4294967296 AS x FROM seq),
r AS (SELECT n, x / 65536 AS a, (x * 1103515245 + 12345) % 2147483648 / 16 AS b,
             ((x * 1103515245 + 12345) % 2147483648 * 1103515245 + 12345) % 2147483648 / 16 AS c FROM h)
INSERT INTO completions (
    id, request_id, started_at, duration_ms, ttft_ms, method, path, upstream, status_code, outcome, stream,
    requested_model, completion_id, object, created, model, provider, prompt_tokens, completion_tokens,
    total_tokens, cached_tokens, cache_write_tokens, reasoning_tokens, cost, cost_source, usage,
    api_key_hash, user, tags, error
)
SELECT
    n,
    printf('%08x-0000-4000-8000-%012x', n, a * 65536 + b),
    strftime('%Y-%m-%d %H:%M:%f', '2026-01-01', printf('+%d seconds', n * ({DAYS} * 86400) / :rows)) || '000',
    20 + (b % 1000) * (c % 1000) / 50.0 + (a % 97) / 100.0,
    CASE WHEN n % 3 = 0 THEN 5 + (b % 2000) ELSE NULL END,
    'POST', '/v1/chat/completions', 'https://openrouter.ai',
    CASE (a / 7) % 40 WHEN 37 THEN 429 WHEN 38 THEN 200 WHEN 39 THEN 504 ELSE 200 END,
    CASE (a / 7) % 40 {_values(OUTCOMES)} END,
    n % 3 = 0,
    CASE a % {len(REQUESTED)} {_values(REQUESTED)} END,
    printf('chatcmpl-%x', n * 7919),
    'chat.completion', 1767225600 + n,
    CASE WHEN (a / 7) % 40 = 37 THEN NULL ELSE CASE a % {len(RESPONDED)} {_values(RESPONDED)} END END,
    CASE b % 4 WHEN 0 THEN 'OpenAI' WHEN 1 THEN 'Anthropic' WHEN 2 THEN 'Google' ELSE NULL END,
    100 + b % 4000, 10 + c % 800, 110 + b % 4000 + c % 800,
    (b % 4000) / 2, CASE WHEN c % 10 = 0 THEN 100 ELSE NULL END,
    CASE WHEN c % 5 = 0 THEN c % 300 ELSE NULL END,
    CASE WHEN c % 7 = 0 THEN NULL ELSE ((100 + b % 4000) * 2.5 + (10 + c % 800) * 10.0) / 1000000.0 END,
    CASE WHEN c % 7 = 0 THEN NULL WHEN c % 2 = 0 THEN 'upstream' ELSE 'pricing' END,
    printf('{{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}',
           100 + b % 4000, 10 + c % 800, 110 + b % 4000 + c % 800),
    printf('%016x', (c % 25) * 1111111111),
    CASE WHEN b % 9 = 0 THEN NULL ELSE printf('user-%d', b % 50) END,
    CASE WHEN c % 3 = 0 THEN NULL ELSE printf('{{"team":"team-%d","env":"%s"}}', c % 6,
                                              CASE WHEN c % 2 = 0 THEN 'prod' ELSE 'dev' END) END,
    CASE WHEN (a / 7) % 40 >= 37 THEN 'synthetic failure' ELSE NULL END
FROM r
"""

FILL_CHOICES = f"""
INSERT INTO completion_choices (completion_pk, "index", finish_reason, native_finish_reason, role)
SELECT id, 0, CASE (id * 7919) % {len(FINISH)} {_values(FINISH)} END, NULL, 'assistant' FROM completions
"""


async def _rebuild(path: Path) -> Any:
    from proxy.store.engine import create_engine
    from proxy.store.rollup_rebuild import rebuild

    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        return await rebuild(engine)
    finally:
        await engine.dispose()


def fill(path: Path, rows: int) -> float:
    """Create the schema with the real migrations, then load `rows` completions (one choice each)."""
    from proxy.store.migrate import upgrade_url

    started = time.perf_counter()
    asyncio.run(upgrade_url(f"sqlite+aiosqlite:///{path}"))
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-400000")
    indexes = db.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
        "AND tbl_name IN ('completions', 'completion_choices')"
    ).fetchall()
    db.execute("BEGIN")
    for name, _sql in indexes:
        db.execute(f'DROP INDEX "{name}"')
    db.execute("DELETE FROM completion_choices")
    db.execute("DELETE FROM completions")
    db.execute(FILL_COMPLETIONS, {"rows": rows})
    # what the writer derives for each row: the hour the rollups and the completion-id index are keyed by
    db.execute("UPDATE completions SET started_hour = CAST(strftime('%s', started_at) AS INTEGER) / 3600, api = 'chat'")
    db.execute(FILL_CHOICES)
    for _name, sql in indexes:
        db.execute(sql)
    db.execute("COMMIT")  # no ANALYZE: a real ledger never gets one, so the planner works without statistics
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.perf_counter() - started


def time_command(args: list[str], database: Path, repeat: int) -> tuple[float, float, str]:
    """Best and median wall time of `chatledger <args>` in a fresh interpreter, and its output."""
    command = [sys.executable, "-m", "proxy", *args, "--database", str(database)]
    env = {**os.environ, "CHATLEDGER_CONFIG": ""}
    times = []
    output = ""
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        times.append(time.perf_counter() - started)
        output = done.stdout
    return min(times), statistics.median(times), output


async def time_queries(database: Path, repeat: int) -> dict[str, float]:
    """The queries alone (engine already open), best of `repeat`."""
    from proxy.store.engine import create_engine
    from proxy.store.filters import Filters
    from proxy.store.queries import fetch_completions
    from proxy.store.stats import fetch_stats

    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    results: dict[str, float] = {}
    try:
        for name, run in (
            ("logs (20 newest)", lambda conn: fetch_completions(conn, Filters(), limit=20)),
            ("stats --by model", lambda conn: fetch_stats(conn, "model", Filters())),
            (
                "stats --by model --since 7d",
                lambda conn: fetch_stats(conn, "model", Filters(since=_days_before_end(7))),
            ),
            (
                "logs --model 'gpt-4o*'",
                lambda conn: fetch_completions(conn, Filters(model="gpt-4o*"), limit=20),
            ),
        ):
            best = float("inf")
            for _ in range(repeat):
                async with engine.connect() as conn:
                    started = time.perf_counter()
                    await run(conn)
                    best = min(best, time.perf_counter() - started)
            results[name] = best
    finally:
        await engine.dispose()
    return results


def _days_before_end(days: int) -> datetime:
    from datetime import UTC, timedelta

    return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=DAYS - days)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, help="SQLite file to use (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="reuse --db if it already has --rows rows")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    workdir = None
    if args.db is None:
        workdir = tempfile.TemporaryDirectory(prefix="chatledger-bench-")
        args.db = Path(workdir.name) / "ledger.db"
    reuse = False
    if args.keep and args.db.exists():
        with sqlite3.connect(args.db) as db:
            reuse = db.execute("SELECT count(*) FROM completions").fetchone()[0] == args.rows
    if not reuse:
        args.db.unlink(missing_ok=True)
        seconds = fill(args.db, args.rows)
        size = args.db.stat().st_size / 1e6
        print(f"filled {args.rows:,} rows in {seconds:.1f} s ({size:,.0f} MB) at {args.db}")
        report = asyncio.run(_rebuild(args.db))
        print(f"rollups rebuilt in {report.seconds:.1f} s (stats reads them)")
    else:
        print(f"reusing {args.db} ({args.rows:,} rows)")

    print(f"\nqueries alone (engine open, best of {args.repeat}):")
    for name, seconds in asyncio.run(time_queries(args.db, args.repeat)).items():
        print(f"  {name:<32} {seconds * 1000:8.1f} ms")

    print(f"\nwhole command in a fresh process (best / median of {args.repeat}):")
    baseline = time_command(["--version"], args.db, args.repeat)
    print(
        f"  {'chatledger --version':<32} {baseline[0] * 1000:8.1f} / {baseline[1] * 1000:.1f} ms  (startup)"
    )
    for command in (["logs"], ["stats", "--by", "model"], ["logs", "--json", "-n", "100"]):
        best, median, _output = time_command(command, args.db, args.repeat)
        label = "chatledger " + " ".join(command)
        print(f"  {label:<32} {best * 1000:8.1f} / {median * 1000:.1f} ms")
    print("\n$ chatledger stats --by model")
    print(time_command(["stats", "--by", "model"], args.db, 1)[2])
    if workdir is not None:
        workdir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
