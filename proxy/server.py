"""Running the proxy: one process, or N worker processes sharing the port with SO_REUSEPORT."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import sys
from types import FrameType

from aiohttp import web

from .app import create_app
from .config import Config, redact_url
from .migrate import upgrade_url

log = logging.getLogger("chatledger")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def install_uvloop() -> bool:
    """Use uvloop when it is installed (the `fast` extra); it cuts per-request overhead."""
    if os.environ.get("CHATLEDGER_NO_UVLOOP"):
        return False
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run_worker(config: Config, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT; in-flight requests get shutdown_grace seconds, then the queue drains."""
    install_uvloop()
    app = create_app(config, migrate=False)
    web.run_app(
        app,
        host=config.server.host,
        port=config.server.port,
        reuse_port=reuse_port or None,
        shutdown_timeout=config.server.shutdown_grace,
        handler_cancellation=True,
        access_log=None,
        print=None,
    )


def serve(config: Config) -> int:
    if config.database.auto_migrate:
        asyncio.run(upgrade_url(config.database.url))
    if not is_loopback(config.server.host) and not config.admin.token:
        log.warning(
            "listening on %s without [admin] token: the /_ledger/api endpoints will refuse every request; "
            "set admin.token (or CHATLEDGER_ADMIN_TOKEN) to use them",
            config.server.host,
        )
    workers = config.server.workers
    log.info(
        "chatledger listening on http://%s:%d -> %s, database %s%s",
        config.server.host,
        config.server.port,
        config.upstream.url,
        redact_url(config.database.url),
        f", {workers} workers" if workers > 1 else "",
    )
    if workers == 1:
        run_worker(config)
        return 0
    return _run_workers(config, workers)


def _run_workers(config: Config, workers: int) -> int:
    if not hasattr(socket, "SO_REUSEPORT"):
        log.error("server.workers > 1 needs SO_REUSEPORT, which this platform lacks")
        return 2
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker_main, args=(config,), name=f"chatledger-worker-{n}") for n in range(workers)
    ]
    for process in processes:
        process.start()

    def forward_signal(signum: int, _frame: FrameType | None) -> None:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward_signal)
    signal.signal(signal.SIGINT, forward_signal)
    code = 0
    for process in processes:
        process.join()
        if process.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT):
            code = 1
    return code


def _worker_main(config: Config) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    logging.basicConfig(level=config.logging.level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_worker(config, reuse_port=True)
