"""Application factory: routes in one place, one cleanup_ctx per resource."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
from aiohttp import web
from sqlalchemy import text

from . import __version__
from .api import add_routes as add_api_routes
from .completions import CompletionRecord
from .config import Config
from .db import create_engine
from .forward import Forwarder, json_error, refusal
from .keys import CONFIG, ENGINE, FORWARDER, METRICS, PRICER, RECORDER
from .metrics import LedgerMetrics
from .migrate import upgrade
from .pricing import Pricer
from .recorder import Recorder
from .router import LEDGER_PREFIX, ProxyRouter, new_app
from .writer_process import RecorderLink

log = logging.getLogger(__name__)

HEALTH_DB_TIMEOUT = 2.0


async def _database(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    engine = create_engine(config.database.url)
    if config.database.auto_migrate and app.get(_MIGRATE, True):
        await upgrade(engine)
    app[ENGINE] = engine
    yield
    await engine.dispose()


async def _accounting(app: web.Application) -> AsyncIterator[None]:
    """The price book (config prices recorded, reloaded every minute) and the metrics registry."""
    pricer = Pricer(app[ENGINE], app[CONFIG].pricing.models)
    await pricer.start()
    app[PRICER] = pricer
    app[METRICS] = LedgerMetrics()
    yield
    await pricer.stop()


def _on_batch(app: web.Application) -> Callable[[list[CompletionRecord]], None]:
    """The writer's hook, once per batch before inserting: cost from the price book, then metrics."""
    pricer, metrics = app[PRICER], app[METRICS]

    def on_batch(records: list[CompletionRecord]) -> None:
        try:
            pricer.apply(records)
        finally:
            metrics.observe(records)

    return on_batch


async def _recorder(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG].database
    recorder: Recorder | RecorderLink
    if config.writer == "process":
        recorder = RecorderLink(app[CONFIG], app[METRICS])
        await recorder.start()
    else:
        recorder = Recorder.from_config(app[ENGINE], config, _on_batch(app))
        recorder.start()
    app[METRICS].watch(recorder)
    app[RECORDER] = recorder
    app[FORWARDER].submit = recorder.submit
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


async def health(request: web.Request) -> web.Response:
    recorder = request.app[RECORDER]
    database_ok = True
    try:
        async with asyncio.timeout(HEALTH_DB_TIMEOUT):
            async with request.app[ENGINE].connect() as conn:
                await conn.execute(text("SELECT 1"))
    except Exception:
        database_ok = False
    files, size = recorder.spool.backlog()
    rejected_files, rejected_bytes = recorder.spool.rejected()
    status = "ok" if database_ok and not recorder.degraded else "degraded"
    body = {
        "status": status,
        "version": __version__,
        "database": {"reachable": database_ok, "writing": recorder.database_ok},
        "queue_depth": recorder.queue_depth,
        "rows_written": recorder.rows_written,
        "rows_spooled": recorder.rows_spooled,
        "rows_replayed": recorder.rows_replayed,
        "rows_rejected": recorder.rows_rejected,
        "rows_lost": recorder.rows_lost,
        "spool": {
            "files": files,
            "bytes": size,
            "writable": recorder.spool_ok,
            "rejected_files": rejected_files,
            "rejected_bytes": rejected_bytes,
        },
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def refuse_target(request: web.Request) -> web.Response:
    """CONNECT and targets not in origin form (ProxyRouter sends them here)."""
    reason = refusal(request) or "request target not accepted"
    return json_error(400, reason, "invalid_request_error", "proxy_refused")


async def ledger_not_found(request: web.Request) -> web.Response:
    return json_error(404, f"no such chatledger endpoint: {request.path}", "invalid_request_error", "not_found")


_MIGRATE = web.AppKey("migrate", bool)


def create_app(config: Config, *, migrate: bool = True) -> web.Application:
    """Build the proxy. With migrate=False the caller has already applied migrations (serve does)."""
    router = ProxyRouter(refuse_target)
    app = new_app(router, client_max_size=config.server.max_body_size)
    app[CONFIG] = config
    app[_MIGRATE] = migrate
    app[FORWARDER] = forwarder = Forwarder(config)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_accounting)
    app.cleanup_ctx.append(_recorder)
    app.cleanup_ctx.append(_client_session)
    app.router.add_get(LEDGER_PREFIX + "health", health)
    add_api_routes(app)
    app.router.add_route("*", LEDGER_PREFIX + "{tail:.*}", ledger_not_found)
    router.add_forwarding(forwarder.handle)
    return app
