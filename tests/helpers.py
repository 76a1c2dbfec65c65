"""Small helpers shared by test modules: reading what was stored, waiting for a condition, raw HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.db import choices_table, completions_table, create_engine


async def stored(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
    """request_id -> row, plus the choice count per row; asserts no request_id appears twice."""
    async with engine.connect() as conn:
        rows = [dict(r._mapping) for r in await conn.execute(select(completions_table))]
        counts = dict(
            (
                await conn.execute(
                    select(choices_table.c.completion_pk, func.count()).group_by(choices_table.c.completion_pk)
                )
            ).all()
        )
    by_id = {row["request_id"]: row for row in rows}
    assert len(by_id) == len(rows), "a request_id was written twice"
    for row in rows:
        row["choice_count"] = counts.get(row["id"], 0)
    return by_id


async def rows_by_request_id(database_url: str) -> dict[str, dict[str, Any]]:
    """stored(), through an engine of its own (for a ledger that has stopped or runs elsewhere)."""
    engine = create_engine(database_url)
    try:
        return await stored(engine)
    finally:
        await engine.dispose()


async def eventually(
    predicate: Callable[[], Any], within: float = 20.0, interval: float = 0.05, state: Callable[[], Any] | None = None
) -> None:
    """Wait until predicate() (sync or async) is true; fail after `within` seconds, showing state()."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"condition not reached in time: {state() if state else ''}"
        await asyncio.sleep(interval)


async def raw_request(port: int, data: bytes) -> bytes:
    """Send bytes as they are (no client library to fix them up) and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
