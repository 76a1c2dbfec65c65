"""Small helpers shared by test modules: reading what was stored, waiting for a condition, raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.store.engine import create_engine
from proxy.store.models import choices_table, completions_table


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


RawResponse = bytes | Callable[[asyncio.StreamWriter], Awaitable[None] | None]


@contextlib.asynccontextmanager
async def raw_upstream(response: RawResponse) -> AsyncIterator[tuple[str, list[bytes]]]:
    """An upstream that answers every request with raw bytes, as they are: fixed bytes, or whatever
    `response(writer)` writes (several writes, pauses). Yields (url, raw requests received)."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        received.append(head + await reader.readexactly(length))
        if isinstance(response, bytes):
            writer.write(response)
        else:
            written = response(writer)
            if written is not None:
                await written
        try:
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.close()
        await server.wait_closed()
