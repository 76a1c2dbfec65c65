"""Logged rows for the query, CLI, API and pricing tests, inserted straight into the ledger, and an
independent Python model of what each filter and each stats grouping must return.

The expected results are computed here from the same row dicts with plain Python (fnmatch, statistics),
never by the code under test.
"""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.credentials import key_fingerprint
from proxy.store.insert import BatchWriter
from proxy.store.models import ApiKey, completions_table
from proxy.store.rows import COLUMNS, started_hour

KEYS = ("sk-alpha-0001", "sk-beta-0002", "sk-gamma-0003")
KEY_LABELS = {key_fingerprint(KEYS[0]): "team-search", key_fingerprint(KEYS[1]): "team-ads"}
PAIRS = (  # (model reported by the upstream, model the client asked for)
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("openai/gpt-4o", "openai/gpt-4o"),
    (None, "gpt-4o"),
    ("anthropic/claude-sonnet-4", "anthropic/claude-sonnet-4"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("gpt-4o-2024-08-06", "gpt-4o-2024-08-06"),
    (None, None),
)
UPSTREAMS = ("https://openrouter.ai", "https://api.openai.com")
STEP = timedelta(minutes=37)


def base_time(now: datetime | None = None) -> datetime:
    """Rows span the last ~2 days, so relative filters (24h, 30m) cut between rows, never at one."""
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    return now - timedelta(hours=48) + timedelta(minutes=10)


def make_rows(count: int = 56, start: datetime | None = None) -> list[dict[str, Any]]:
    start = start or base_time()
    rows = []
    for i in range(count):
        model, requested = PAIRS[i % len(PAIRS)]
        outcome = "upstream_error" if i % 7 == 3 else "client_disconnected" if i % 11 == 5 else "ok"
        status = 429 if outcome == "upstream_error" else 200
        tags = (
            None
            if i % 4 == 0
            else {"team": f"t{i % 3}", **({"env": "prod" if i % 2 else "dev"} if i % 5 else {})}
        )
        cost = None if i % 6 == 0 else Decimal(i * 37 + 11) / Decimal(1_000_000)
        rows.append(
            {
                "request_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"chatledger-test-row-{i}")),
                "started_at": start + i * STEP,
                "duration_ms": None if i % 17 == 5 else float((i * 7919) % 1000) + 0.25 * (i % 4),
                "ttft_ms": float(i % 50) if i % 3 == 0 else None,
                "method": "POST",
                "path": "/v1/chat/completions" if requested else "/v1/models",
                "api": ("chat", "chat", "responses", "embeddings")[i % 4] if requested else None,
                "upstream": UPSTREAMS[i % 2],
                "status_code": status,
                "outcome": outcome,
                "stream": i % 3 == 0,
                "requested_model": requested,
                "completion_id": f"chatcmpl-{i:04d}" if model else None,
                "model": model,
                "provider": ("OpenAI", "Anthropic", None)[i % 3],
                "prompt_tokens": 100 + i * 13 if model else None,
                "completion_tokens": 10 + i * 3 if model else None,
                "total_tokens": 110 + i * 16 if model else None,
                "cached_tokens": (i % 4) * 10 if model else None,
                "reasoning_tokens": i % 5 if model else None,
                "cost": cost,
                "cost_source": None if cost is None else ("upstream" if i % 2 else "pricing"),
                "usage": {"prompt_tokens": 100 + i * 13} if model else None,
                "api_key_hash": None if i % 8 == 7 else key_fingerprint(KEYS[i % 3]),
                "user": None if i % 5 == 0 else f"user-{i % 4}",
                "tags": tags,
                "error": "rate limited" if outcome == "upstream_error" else None,
                "choices": [
                    {
                        "index": n,
                        "finish_reason": ("stop", "length", "tool_calls")[(i + n) % 3],
                        "native_finish_reason": None,
                        "role": "assistant",
                    }
                    for n in range(1 + (i % 9 == 2))
                ]
                if model
                else [],
            }
        )
    return rows


async def insert_rows(engine: AsyncEngine, rows: list[dict[str, Any]], *, labels: bool = True) -> None:
    """Insert rows (ids follow list order) with their choices through the writer's insert path (which
    keeps the rollups), and label two of the three keys."""
    async with engine.begin() as conn:
        blank = dict.fromkeys(COLUMNS)
        writes = [{**blank, **row, "started_hour": started_hour(row["started_at"])} for row in rows]
        await BatchWriter(conn.dialect.name).insert(conn, writes)
        ids = dict(
            (
                await conn.execute(
                    select(completions_table.c.request_id, completions_table.c.id).where(
                        completions_table.c.request_id.in_([row["request_id"] for row in rows])
                    )
                )
            ).all()
        )
        if labels:
            existing = set((await conn.execute(select(ApiKey.api_key_hash))).scalars())
            new = [
                {"api_key_hash": h, "label": label, "created_at": datetime.now(UTC)}
                for h, label in KEY_LABELS.items()
                if h not in existing
            ]
            if new:
                await conn.execute(insert(ApiKey.__table__), new)
    for row in rows:
        row["id"] = ids[row["request_id"]]


# ---- the Python model of filters ---------------------------------------------------------------


def _model_matches(pattern: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: any(
        name is not None and fnmatchcase(name, pattern) for name in (r["model"], r["requested_model"])
    )


def _key_matches(value: str) -> Callable[[dict[str, Any]], bool]:
    hashes = {h for h, label in KEY_LABELS.items() if label == value}
    hashes.add(value if len(value) == 16 and not value.startswith("sk-") else key_fingerprint(value))
    return lambda r: r["api_key_hash"] in hashes


@dataclass(frozen=True)
class FilterCase:
    name: str
    params: dict[str, Any]  # query-string style: str or list of str
    matches: Callable[[dict[str, Any]], bool]


def filter_cases(start: datetime, now: datetime) -> list[FilterCase]:
    """One or more cases per filter; `start` is make_rows' first timestamp, `now` the seeding time."""
    mid = start + 20 * STEP + timedelta(minutes=5)
    late = start + 41 * STEP - timedelta(minutes=3)
    day_ago = now - timedelta(hours=24)
    return [
        FilterCase("model exact (requested)", {"model": "gpt-4o"}, _model_matches("gpt-4o")),
        FilterCase(
            "model exact (reported)", {"model": "gpt-4o-2024-08-06"}, _model_matches("gpt-4o-2024-08-06")
        ),
        FilterCase("model glob *", {"model": "gpt-4o*"}, _model_matches("gpt-4o*")),
        FilterCase("model glob prefix", {"model": "*/gpt-4o"}, _model_matches("*/gpt-4o")),
        FilterCase("model glob ? and [!]", {"model": "gpt-4o-[!m]?2*"}, _model_matches("gpt-4o-[!m]?2*")),
        FilterCase("since ISO", {"since": mid.isoformat()}, lambda r: r["started_at"] >= mid),
        FilterCase(
            "since naive ISO is UTC",
            {"since": mid.replace(tzinfo=None).isoformat()},
            lambda r: r["started_at"] >= mid,
        ),
        FilterCase("since relative", {"since": "24h"}, lambda r: r["started_at"] >= day_ago),
        FilterCase("until ISO", {"until": late.isoformat()}, lambda r: r["started_at"] < late),
        FilterCase(
            "since and until",
            {"since": mid.isoformat(), "until": late.isoformat()},
            lambda r: mid <= r["started_at"] < late,
        ),
        FilterCase("user", {"user": "user-2"}, lambda r: r["user"] == "user-2"),
        FilterCase("tag", {"tag": ["team=t1"]}, lambda r: (r["tags"] or {}).get("team") == "t1"),
        FilterCase(
            "two tags",
            {"tag": ["team=t2", "env=prod"]},
            lambda r: (r["tags"] or {}).get("team") == "t2" and (r["tags"] or {}).get("env") == "prod",
        ),
        FilterCase("key label", {"key": "team-search"}, _key_matches("team-search")),
        FilterCase(
            "key fingerprint", {"key": key_fingerprint(KEYS[2])}, _key_matches(key_fingerprint(KEYS[2]))
        ),
        FilterCase("key itself", {"key": KEYS[1]}, _key_matches(KEYS[1])),
        FilterCase("outcome", {"outcome": "upstream_error"}, lambda r: r["outcome"] == "upstream_error"),
        FilterCase("status", {"status": "429"}, lambda r: r["status_code"] == 429),
        FilterCase("stream", {"stream": "true"}, lambda r: r["stream"]),
        FilterCase("no stream", {"stream": "false"}, lambda r: not r["stream"]),
        FilterCase("api", {"api": "responses"}, lambda r: r["api"] == "responses"),
        FilterCase(
            "combined",
            {"model": "gpt-4o*", "since": mid.isoformat(), "stream": "false", "user": "user-1"},
            lambda r: (
                _model_matches("gpt-4o*")(r)
                and r["started_at"] >= mid
                and not r["stream"]
                and r["user"] == "user-1"
            ),
        ),
    ]


def expected_ids(rows: Iterable[dict[str, Any]], case: FilterCase) -> list[int]:
    """Matching ids, newest first (the order logs and the API use)."""
    return sorted((r["id"] for r in rows if case.matches(r)), reverse=True)


# ---- the Python model of stats -----------------------------------------------------------------


def group_keys(row: dict[str, Any], by: str) -> list[Any]:
    if by == "model":
        return [row["model"] or row["requested_model"]]
    if by == "day":
        return [row["started_at"].strftime("%Y-%m-%d")]
    if by == "hour":
        return [row["started_at"].strftime("%Y-%m-%d %H:00")]
    if by == "key":
        return [row["api_key_hash"]]
    if by in ("user", "provider", "upstream", "api"):
        return [row[by]]
    if by.startswith("tag:"):
        return [(row["tags"] or {}).get(by[4:])]
    pairs = [f"{k}={v}" for k, v in (row["tags"] or {}).items()]
    return pairs or [None]


def percentile(values: list[float], p: float) -> float | None:
    """percentile_cont, via statistics.quantiles' inclusive method (an independent implementation)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[round(p * 100) - 1]


def within_histogram_resolution(found: float, durations: list[float], p: float) -> bool:
    """A percentile read from a duration histogram (buckets growing by 1.3x from 5 ms) lies between the
    buckets of the two durations around its rank (the exact percentile interpolates between those)."""
    values = sorted(durations)
    low = int(p * (len(values) - 1))
    below, above = values[low], values[min(low + 1, len(values) - 1)]
    return below / 1.3 - 5 <= found <= above * 1.3 + 5


def expected_stats(rows: Iterable[dict[str, Any]], by: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows = list(rows)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        for key in group_keys(row, by):
            groups.setdefault(key, []).append(row)

    def summary(key: Any, members: list[dict[str, Any]], timed: bool = True) -> dict[str, Any]:
        costs = [m["cost"] for m in members if m["cost"] is not None]
        durations = [m["duration_ms"] for m in members if m["duration_ms"] is not None]
        return {
            "key": key,
            "requests": len(members),
            "errors": sum(m["outcome"] != "ok" for m in members),
            **{
                name: sum(m[name] or 0 for m in members)
                for name in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")
            },
            "cost": sum(costs, Decimal(0)) if costs else None,
            "unknown_cost": len(members) - len(costs),
            "p50_ms": percentile(durations, 0.5) if timed else None,
            "p95_ms": percentile(durations, 0.95) if timed else None,
        }

    result = [summary(key, members) for key, members in groups.items()]
    result.sort(key=lambda r: (r["cost"] is None, -(r["cost"] or 0), -r["requests"], str(r["key"])))
    return result, summary("total", rows, timed=False)


async def run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """`chatledger ARGV` in-process, in a thread (it runs its own loop): (exit code, stdout, stderr)."""
    import asyncio

    from proxy.cli import main

    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err
