"""The application factory: routes in one place, one cleanup_ctx per resource (database, prices and
metrics, the recorder, the upstream client session)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from ..config import Config
from ..relay.handler import Forwarder, json_error
from ..relay.policy import refusal
from ..relay.routing import client_timeout
from ..store.engine import create_engine
from ..store.pricing.pricer import Pricer
from ..writer.link import RecorderLink
from ..writer.protocol import Recorder
from ..writer.recorder import BatchRecorder, batch_hook
from ..writer.retention import Retention
from .api import add_routes as add_api_routes
from .appkeys import CONFIG, ENGINE, FORWARDER, METRICS, PRICER, RECORDER, STARTUP
from .dashboard import add_routes as add_dashboard_routes
from .health import health
from .metrics import LedgerMetrics
from .router import LEDGER_PREFIX, ProxyRouter, new_app
from .startup import DatabaseStartup


async def _database(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    engine = create_engine(config.database.url)
    startup = DatabaseStartup(engine, migrate=config.database.auto_migrate and app.get(_MIGRATE, True))
    await startup.start()  # a database that does not answer is retried in the background
    app[ENGINE] = engine
    app[STARTUP] = startup
    yield
    await startup.stop()
    await engine.dispose()


async def _accounting(app: web.Application) -> AsyncIterator[None]:
    """The price book (config prices recorded, reloaded every minute) and the metrics registry."""
    pricing = app[CONFIG].pricing
    pricer = Pricer(app[ENGINE], pricing.models, pricing.reload_interval)
    await pricer.start()
    app[PRICER] = pricer
    app[METRICS] = LedgerMetrics()
    yield
    await pricer.stop()


async def _recorder(app: web.Application) -> AsyncIterator[None]:
    config, metrics = app[CONFIG], app[METRICS]
    recorder: Recorder
    retention = None
    if config.database.writer == "process":  # the writer process runs retention
        recorder = RecorderLink(config, metrics.apply, app[PRICER].apply)
    else:
        hook = batch_hook(app[PRICER], metrics.observe, config.logging.access_log)
        recorder = BatchRecorder.from_config(app[ENGINE], config.database, hook)
        retention = Retention(app[ENGINE], config.retention)
    await recorder.start()
    if retention is not None:
        await retention.start()
    metrics.watch(recorder)
    app[RECORDER] = recorder
    app[FORWARDER].submit = recorder.submit
    yield
    if retention is not None:
        await retention.stop()
    # as long as in-flight requests got: past it, what the writer has not written goes to the spool
    await recorder.close(timeout=max(1.0, config.server.shutdown_grace))


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    upstream = app[CONFIG].upstream
    timeout = client_timeout(upstream.connect_timeout, upstream.read_timeout)
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
    add_dashboard_routes(app)
    app.router.add_route("*", LEDGER_PREFIX + "{tail:.*}", ledger_not_found)
    router.add_forwarding(forwarder.handle)
    return app
