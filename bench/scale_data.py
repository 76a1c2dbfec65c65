"""Fill a ledger with N realistic calls spread over D days ending now, for measuring at scale.

~20 models with skewed popularity, ~50 key fingerprints, ~2,000 users (some NULL), 3 upstreams, a few
providers, mostly ok outcomes with a few percent of errors, the chat, responses, messages and embeddings
APIs, random hex completion ids, log-normal durations and token counts, costs with 12 decimals (some
unknown), 1-2 choices per call. Rows are in time order with ids rising, as a real ledger's are.

The ledger is migrated first (the project's own migrations). SQLite gets large executemany transactions
with synchronous off during the fill; PostgreSQL gets binary COPY through asyncpg. The rollup tables, where
the schema has them, are not filled here: rebuild them separately.

Run: `python -m bench.scale_data --url URL --rows 10000000 --days 90 [--seed N]`; URL is a SQLite file
path or URL, or a PostgreSQL URL. Prints the time taken and the size on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from proxy.config import normalize_database_url, sqlite_path
from proxy.store.migrate import upgrade_url
from proxy.store.models import choices_table, completions_table

CHUNK = 50_000  # rows generated and written at a time
COLUMNS = tuple(column.name for column in completions_table.columns)  # `id` included: set here
CHOICE_COLUMNS = tuple(column.name for column in choices_table.columns if column.name != "id")
TWELVE = Decimal("0.000000000001")

# (model reported, model requested, provider, USD per million prompt / completion tokens)
MODELS = [
    ("gpt-4o-2024-08-06", "gpt-4o", "OpenAI", 2.5, 10.0),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini", "OpenAI", 0.15, 0.6),
    ("anthropic/claude-sonnet-4", "anthropic/claude-sonnet-4", "Anthropic", 3.0, 15.0),
    ("gpt-4.1-2025-04-14", "gpt-4.1", "OpenAI", 2.0, 8.0),
    ("claude-3-5-haiku-20241022", "claude-3-5-haiku-latest", "Anthropic", 0.8, 4.0),
    ("google/gemini-2.5-flash", "google/gemini-2.5-flash", "Google", 0.3, 2.5),
    ("o3-mini-2025-01-31", "o3-mini", "OpenAI", 1.1, 4.4),
    ("meta-llama/llama-3.3-70b-instruct", "meta-llama/llama-3.3-70b-instruct", "DeepInfra", 0.23, 0.4),
    ("text-embedding-3-small", "text-embedding-3-small", "OpenAI", 0.02, 0.0),
    ("google/gemini-2.5-pro", "google/gemini-2.5-pro", "Google", 1.25, 10.0),
    ("deepseek/deepseek-chat", "deepseek/deepseek-chat", "DeepSeek", 0.27, 1.1),
    ("claude-opus-4-20250514", "claude-opus-4-0", "Anthropic", 15.0, 75.0),
    ("mistralai/mistral-small", "mistralai/mistral-small", "Mistral", 0.1, 0.3),
    ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini", "OpenAI", 0.4, 1.6),
    ("qwen/qwen-2.5-72b-instruct", "qwen/qwen-2.5-72b-instruct", "Together", 0.35, 0.4),
    ("text-embedding-3-large", "text-embedding-3-large", "OpenAI", 0.13, 0.0),
    ("x-ai/grok-3-mini", "x-ai/grok-3-mini", "xAI", 0.3, 0.5),
    ("o4-mini-2025-04-16", "o4-mini", "OpenAI", 1.1, 4.4),
    ("cohere/command-r-plus", "cohere/command-r-plus", "Cohere", 2.5, 10.0),
    ("microsoft/phi-4", "microsoft/phi-4", "Azure", 0.07, 0.14),
]
MODEL_WEIGHTS = [1 / (rank + 1) ** 1.2 for rank in range(len(MODELS))]
UPSTREAMS = ("https://openrouter.ai", "https://api.openai.com", "https://api.anthropic.com")
APIS = (("chat", "/v1/chat/completions"), ("responses", "/v1/responses"), ("messages", "/v1/messages"))
OUTCOMES = (("ok", 200, None), ("upstream_error", 429, "HTTP 429: rate limited"),
            ("upstream_error", 500, "HTTP 500: internal error"), ("client_disconnected", 200, None),
            ("timeout", None, "upstream read timed out"))  # fmt: skip
OUTCOME_WEIGHTS = (960, 15, 10, 10, 5)
FINISH = ("stop", "stop", "stop", "length", "tool_calls")


@dataclass
class Filled:
    rows: int
    choices: int
    seconds: float
    size_bytes: int


class Generator:
    """Rows as the driver takes them (SQLite: text times, float costs; PostgreSQL: datetimes, Decimals)."""

    def __init__(self, sqlite: bool, seed: int | None) -> None:
        self.sqlite = sqlite
        self.random = random.Random(seed)
        pick = self.random
        self.keys = [f"{pick.getrandbits(64):016x}" for _ in range(50)]
        self.key_weights = [1 / (rank + 1) for rank in range(50)]
        self.users = [f"user-{pick.getrandbits(32):08x}" for _ in range(2000)]
        self.user_weights = [1 / (rank + 1) ** 0.8 for rank in range(2000)]
        self.tags = [None, None] + [
            orjson.dumps({"team": team, "env": env}).decode()
            for team, env in (("search", "prod"), ("ads", "prod"), ("search", "dev"))
        ]

    def chunk(
        self, first_id: int, count: int, start: float, end: float
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """`count` calls with ids from first_id, started between the epoch seconds start and end, in order."""
        r = self.random
        times = sorted(r.uniform(start, end) for _ in range(count))
        models = r.choices(range(len(MODELS)), MODEL_WEIGHTS, k=count)
        keys = r.choices(self.keys, self.key_weights, k=count)
        users = r.choices(self.users, self.user_weights, k=count)
        outcomes = r.choices(OUTCOMES, OUTCOME_WEIGHTS, k=count)
        rows: list[tuple[Any, ...]] = []
        choices: list[tuple[Any, ...]] = []
        sqlite = self.sqlite
        for n in range(count):
            pk = first_id + n
            at = times[n]
            started = datetime.fromtimestamp(at, UTC)
            reported, requested, provider, prompt_price, completion_price = MODELS[models[n]]
            embedding = reported.startswith("text-embedding")
            if embedding:
                api, path = "embeddings", "/v1/embeddings"
            else:
                api, path = APIS[0] if (roll := r.random()) < 0.75 else APIS[1] if roll < 0.9 else APIS[2]
            outcome, status, error = outcomes[n]
            ok = outcome == "ok"
            stream = not embedding and r.random() < 0.4
            duration = r.lognormvariate(7.2, 0.8) if not embedding else r.lognormvariate(5.0, 0.5)
            prompt = int(r.lognormvariate(6.7, 1.1)) + 1 if ok or outcome == "client_disconnected" else None
            completion = (0 if embedding else int(r.lognormvariate(5.3, 0.9)) + 1) if prompt else None
            cached = (prompt // 2 if r.random() < 0.2 else 0) if prompt else None
            reasoning = (int(completion * r.random()) if reported.startswith("o") else 0) if prompt else None
            cost: Any = None
            if prompt is not None and r.random() > 0.05:
                value = (Decimal(prompt * prompt_price + (completion or 0) * completion_price) / 1_000_000).quantize(
                    TWELVE
                )
                cost = float(value) if sqlite else value
            ms = int(at * 1000)
            bits = f"{r.getrandbits(76):019x}"
            head = f"{ms:012x}"
            request_id = f"{head[:8]}-{head[8:]}-7{bits[:3]}-8{bits[3:6]}-{bits[6:18]}"
            if not ok and outcome != "client_disconnected":
                completion_id = None
            elif api == "chat":
                completion_id = f"chatcmpl-{r.getrandbits(116):029x}"
            elif api == "responses":
                completion_id = f"resp_{r.getrandbits(192):048x}"
            elif api == "messages":
                completion_id = f"msg_{r.getrandbits(96):024x}"
            else:
                completion_id = None
            usage = None
            if prompt is not None:
                total = prompt + (completion or 0)
                usage = orjson.dumps(
                    {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
                ).decode()
            user = users[n] if r.random() > 0.15 else None
            rows.append((
                pk, request_id, started.isoformat(" ")[:-6] if sqlite else started, round(duration, 3),
                round(duration * r.uniform(0.05, 0.5), 3) if stream else None, "POST", path,
                UPSTREAMS[0] if r.random() < 0.6 else UPSTREAMS[1] if provider == "OpenAI" else UPSTREAMS[2],
                status, outcome, int(stream) if sqlite else stream, requested, completion_id,
                "chat.completion" if api == "chat" else None, int(at) if prompt else None,
                reported if prompt else None, provider, None, None, prompt, completion,
                (prompt + (completion or 0)) if prompt is not None else None, cached, None, reasoning, cost,
                None if cost is None else ("upstream" if r.random() < 0.6 else "pricing"), usage, keys[n], user,
                self.tags[r.randrange(5)], error, None, api, int(at) // 3600,
            ))  # fmt: skip
            if not embedding:
                for index in range(1 + (r.random() < 0.1)):
                    finish = FINISH[r.randrange(5)] if ok else None
                    choices.append((pk, index, finish, None, "assistant"))
        return rows, choices


def _spans(rows: int, days: float, now: float) -> Iterator[tuple[int, float, float]]:
    """(row count, start, end) per chunk: equal numbers of rows over equal slices of the period."""
    start = now - days * 86_400
    chunks = max(1, (rows + CHUNK - 1) // CHUNK)
    step = (now - start) / chunks
    for index in range(chunks):
        count = min(CHUNK, rows - index * CHUNK)
        yield count, start + index * step, start + (index + 1) * step


_generator: Generator | None = None


def _start_generator(sqlite: bool, seed: int | None) -> None:
    global _generator
    _generator = Generator(sqlite, seed)


def _generate(first_id: int, count: int, start: float, end: float) -> tuple[list[Any], list[Any]]:
    assert _generator is not None
    return _generator.chunk(first_id, count, start, end)


def _chunks(
    sqlite: bool, seed: int | None, first_id: int, rows: int, days: float
) -> Iterator[tuple[list[Any], list[Any]]]:
    """The rows chunk by chunk, generated in another process two chunks ahead while these are written."""
    with ProcessPoolExecutor(1, initializer=_start_generator, initargs=(sqlite, seed)) as pool:
        pending: deque[Future[tuple[list[Any], list[Any]]]] = deque()
        next_id = first_id
        for count, start, end in _spans(rows, days, time.time()):
            pending.append(pool.submit(_generate, next_id, count, start, end))
            next_id += count
            if len(pending) > 2:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _check_columns() -> None:
    expected = (
        "id", "request_id", "started_at", "duration_ms", "ttft_ms", "method", "path", "upstream", "status_code",
        "outcome", "stream", "requested_model", "completion_id", "object", "created", "model", "provider",
        "system_fingerprint", "service_tier", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
        "cache_write_tokens", "reasoning_tokens", "cost", "cost_source", "usage", "api_key_hash", "user", "tags",
        "error", "upstream_request_id", "api", "started_hour",
    )  # fmt: skip
    if expected != COLUMNS:
        raise RuntimeError(f"the completions columns changed; update bench/scale_data.py: {COLUMNS}")


def _fill_sqlite(path: Path, rows: int, days: float, seed: int | None) -> tuple[int, int]:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        # a bench fill: no durability needed until the end, and no rollback journal copy of each page
        db.execute("PRAGMA journal_mode=MEMORY")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-1048576")  # 1 GiB: index pages stay cached between chunks
        first = (db.execute("SELECT coalesce(max(id), 0) FROM completions").fetchone()[0]) + 1
        marks = ", ".join("?" * len(COLUMNS))
        names = ", ".join(f'"{name}"' for name in COLUMNS)
        insert = f"INSERT INTO completions ({names}) VALUES ({marks})"
        choice_names = ", ".join(f'"{name}"' for name in CHOICE_COLUMNS)
        insert_choices = f"INSERT INTO completion_choices ({choice_names}) VALUES (?, ?, ?, ?, ?)"
        written = choices_written = 0
        for batch, choices in _chunks(True, seed, first, rows, days):
            count = len(batch)
            db.execute("BEGIN")
            db.executemany(insert, batch)
            db.executemany(insert_choices, choices)
            db.execute("COMMIT")
            written += count
            choices_written += len(choices)
            _progress(written, rows)
        db.execute("ANALYZE")
        db.execute("PRAGMA journal_mode=WAL")  # as chatledger runs it
        return written, choices_written
    finally:
        db.close()


async def _fill_postgres(dsn: str, rows: int, days: float, seed: int | None) -> tuple[int, int]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        first = (await conn.fetchval("SELECT coalesce(max(id), 0) FROM completions")) + 1
        written = choices_written = 0
        chunks = _chunks(False, seed, first, rows, days)
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            batch, choices = chunk
            count = len(batch)
            async with conn.transaction():
                await conn.copy_records_to_table("completions", records=batch, columns=COLUMNS)
                await conn.copy_records_to_table("completion_choices", records=choices, columns=CHOICE_COLUMNS)
            written += count
            choices_written += len(choices)
            _progress(written, rows)
        # ids were given explicitly: the writer's next rows must not collide with them
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('completions', 'id'), (SELECT max(id) FROM completions))"
        )
        await conn.execute("VACUUM ANALYZE completions")
        await conn.execute("VACUUM ANALYZE completion_choices")
        return written, choices_written
    finally:
        await conn.close()


def _progress(done: int, total: int) -> None:
    if done == total or done % (CHUNK * 20) == 0:
        print(f"  {done:,} / {total:,} rows", flush=True)


async def size_on_disk(url: str) -> int:
    path = sqlite_path(url)
    if path is not None:
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    import asyncpg

    conn = await asyncpg.connect(_dsn(url))
    try:
        return int(
            await conn.fetchval(
                "SELECT pg_total_relation_size('completions') + pg_total_relation_size('completion_choices')"
            )
        )
    finally:
        await conn.close()


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def fill(url: str, rows: int, days: float, seed: int | None = None) -> Filled:
    """Migrate the ledger at `url`, then add `rows` calls spread over the `days` days before now."""
    _check_columns()
    url = normalize_database_url(url)
    await upgrade_url(url)
    started = time.perf_counter()
    path = sqlite_path(url)
    if path is not None:
        written, choices = await asyncio.to_thread(_fill_sqlite, path, rows, days, seed)
    else:
        written, choices = await _fill_postgres(_dsn(url), rows, days, seed)
    return Filled(written, choices, time.perf_counter() - started, await size_on_disk(url))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True, help="SQLite file path or URL, or a PostgreSQL URL")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=90.0)
    parser.add_argument("--seed", type=int, help="for the same rows every run")
    args = parser.parse_args(argv)
    result = asyncio.run(fill(args.url, args.rows, args.days, args.seed))
    print(
        f"filled {result.rows:,} calls ({result.choices:,} choices) over {args.days:g} days in "
        f"{result.seconds:.1f} s ({result.rows / max(result.seconds, 1e-9):,.0f} rows/s); "
        f"{result.size_bytes / 2**20:,.1f} MiB on disk ({result.size_bytes / max(result.rows, 1):,.0f} bytes per call)"
    )
    print("rollup tables (where the schema has them) are not filled here: rebuild them separately")


if __name__ == "__main__":
    main()
