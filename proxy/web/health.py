"""GET /_ledger/health: is the database reachable, is the writer keeping up, what waits in the spool."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from sqlalchemy import text

from .. import __version__
from .appkeys import ENGINE, RECORDER, STARTUP

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
    startup = request.app.get(STARTUP)
    migrated = startup is None or startup.migrated
    checks = (
        ("database.reachable=false", not database_ok),
        (f"database.migrated=false ({startup.last_error if startup else ''})", not migrated),
        ("database.writing=false", not stats.database_ok),
        ("spool.writable=false", not stats.spool_ok),
        ("rows_lost>0", stats.rows_lost > 0),
        (f"database.file: {stats.file_problem}", stats.file_problem is not None),
    )
    reasons = [reason for reason, bad in checks if bad]
    body = {
        "status": "ok" if database_ok and migrated and not stats.degraded else "degraded",
        "reasons": reasons,
        "version": __version__,
        "database": {"reachable": database_ok, "writing": stats.database_ok, "migrated": migrated},
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
