"""Application factory: routes in one place, one cleanup_ctx per resource."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
import orjson
from aiohttp import web
from sqlalchemy import text

from . import __version__
from .config import Config, default_spool_dir
from .db import create_engine
from .forward import Forwarder, json_error
from .keys import CONFIG, ENGINE, FORWARDER, RECORDER
from .migrate import upgrade
from .recorder import Recorder

log = logging.getLogger(__name__)

LEDGER_PREFIX = "/_ledger/"


async def _database(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    engine = create_engine(config.database.url)
    if config.database.auto_migrate and app.get(_MIGRATE, True):
        await upgrade(engine)
    app[ENGINE] = engine
    yield
    await engine.dispose()


async def _recorder(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG].database
    recorder = Recorder(
        app[ENGINE],
        default_spool_dir(config),
        queue_max=config.queue_max,
        batch_max=config.batch_max,
        write_timeout=config.write_timeout,
    )
    recorder.start()
    app[RECORDER] = recorder
    app[FORWARDER] = Forwarder(app[CONFIG], recorder.submit)
    yield
    await recorder.close()


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    upstream = app[CONFIG].upstream
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=upstream.connect_timeout,
        sock_connect=upstream.connect_timeout,
        sock_read=upstream.read_timeout,
    )
    connector = aiohttp.TCPConnector(limit=upstream.max_connections, ttl_dns_cache=300)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
    app[FORWARDER].session = session
    yield
    await session.close()


async def forward(request: web.Request) -> web.StreamResponse:
    return await request.app[FORWARDER].handle(request)


async def health(request: web.Request) -> web.Response:
    recorder = request.app[RECORDER]
    database_ok = True
    try:
        async with request.app[ENGINE].connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception:
        database_ok = False
    files, size = recorder.spool.backlog()
    status = "ok" if database_ok and not recorder.degraded else "degraded"
    body = {
        "status": status,
        "version": __version__,
        "database": {"reachable": database_ok, "writing": recorder.database_ok},
        "queue_depth": recorder.queue_depth,
        "rows_written": recorder.rows_written,
        "rows_spooled": recorder.rows_spooled,
        "rows_lost": recorder.rows_lost,
        "spool": {"files": files, "bytes": size},
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def ledger_not_found(request: web.Request) -> web.Response:
    return json_error(404, f"no such chatledger endpoint: {request.path}", "invalid_request_error", "not_found")


_MIGRATE = web.AppKey("migrate", bool)


def create_app(config: Config, *, migrate: bool = True) -> web.Application:
    """Build the proxy. With migrate=False the caller has already applied migrations (serve does)."""
    app = web.Application(client_max_size=config.server.max_body_size)
    app[CONFIG] = config
    app[_MIGRATE] = migrate
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_recorder)
    app.cleanup_ctx.append(_client_session)
    app.router.add_get(LEDGER_PREFIX + "health", health)
    app.router.add_route("*", LEDGER_PREFIX + "{tail:.*}", ledger_not_found)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app
