"""GET /_ledger/health: is the database reachable, is the writer keeping up, what waits in the spool."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from sqlalchemy import text

from .. import __version__
from .appkeys import ENGINE, RECORDER

HEALTH_DB_TIMEOUT = 2.0


async def health(request: web.Request) -> web.Response:
    recorder = request.app[RECORDER]
    database_ok = True
    try:
        async with asyncio.timeout(HEALTH_DB_TIMEOUT):
            async with request.app[ENGINE].connect() as conn:
                await conn.execute(text("SELECT 1"))
    except Exception:
        database_ok = False
    stats = recorder.stats()
    files, size = recorder.spool.backlog()
    rejected_files, rejected_bytes = recorder.spool.rejected()
    body = {
        "status": "ok" if database_ok and not stats.degraded else "degraded",
        "version": __version__,
        "database": {"reachable": database_ok, "writing": stats.database_ok},
        **{name: getattr(stats, name) for name in _COUNTERS},
        "spool": {
            "files": files,
            "bytes": size,
            "writable": stats.spool_ok,
            "rejected_files": rejected_files,
            "rejected_bytes": rejected_bytes,
        },
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


_COUNTERS = ("queue_depth", "rows_written", "rows_spooled", "rows_replayed", "rows_rejected", "rows_lost")
