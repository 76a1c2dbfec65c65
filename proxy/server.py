"""Running the proxy: one process, or N worker processes sharing the port with SO_REUSEPORT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from types import FrameType

from aiohttp import web

from .config import Config, redact_url
from .logs import configure as configure_logging
from .relay.server_compat import make_runner
from .runtime import install_uvloop, raise_file_limit, tune_garbage_collector
from .store.migrate import upgrade_url
from .web.app import create_app
from .web.auth import is_loopback

log = logging.getLogger("chatledger")

EXIT_GRACE = 5.0


def run_worker(config: Config, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, give in-flight requests shutdown_grace
    seconds, drain the queue to the database or the spool, and return.

    Not web.run_app: its teardown waits without bound for every task left after cleanup, and the
    interpreter then waits for every non-daemon thread (aiosqlite runs one per connection). A
    database that hangs at the wrong moment would keep the process from ever exiting; here the
    leftovers get EXIT_GRACE seconds, and a thread still stuck after that does not block the exit.
    """
    install_uvloop()
    raise_file_limit()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve_until_signalled(config, reuse_port))
    finally:
        _close_loop(loop)
    stuck = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if stuck:
        log.warning("exiting with thread(s) still blocked (a call that never returned): %s", ", ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


async def _serve_until_signalled(config: Config, reuse_port: bool) -> None:
    app = create_app(config, migrate=False)
    grace = config.server.shutdown_grace
    runner = make_runner(
        app, config, handle_signals=False, shutdown_timeout=grace, handler_cancellation=True, access_log=None
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port, reuse_port=reuse_port or None)
        await site.start()
        tune_garbage_collector()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("already shutting down (in-flight requests get up to %gs)", grace)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await stop.wait()
        log.info("shutting down: no new connections; in-flight requests get up to %gs", grace)
    finally:
        await runner.cleanup()  # stops the site, waits for handlers, then the app's cleanup drains the queue
    log.info("shut down cleanly")


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            _, pending = loop.run_until_complete(asyncio.wait(leftovers, timeout=EXIT_GRACE))
            if pending:
                log.warning("%d task(s) did not finish after shutdown; exiting anyway", len(pending))
        loop.run_until_complete(loop.shutdown_asyncgens())
        with contextlib.suppress(TimeoutError):
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), EXIT_GRACE))
    finally:
        asyncio.set_event_loop(None)
        loop.close()


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
        context.Process(target=_worker_main, args=(config,), name=f"chatledger-worker-{n}")
        for n in range(workers)
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
    configure_logging(config.logging)
    run_worker(config, reuse_port=True)
