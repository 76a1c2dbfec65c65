"""Running the proxy: one process, or N supervised worker processes sharing the port with SO_REUSEPORT.

The listening sockets are bound before "listening" is printed (listen.py), and the database URL is checked
for what can never work (config.check_database_url); a database that is merely down does not stop the start:
the app migrates in the background (web/startup.py) while calls are spooled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence

from aiohttp import web

from .config import Config, ConfigError, check_database_url, redact_url
from .listen import BindError, bind, close
from .logs import configure as configure_logging
from .relay.server_compat import make_runner
from .runtime import install_uvloop, raise_file_limit, tune_garbage_collector
from .web.app import create_app
from .web.appkeys import RECORDER
from .web.auth import is_loopback
from .workers import supervise

log = logging.getLogger("chatledger")

EXIT_GRACE = 5.0


def run_worker(config: Config, sockets: Sequence[socket.socket]) -> int:
    """Serve on `sockets` until SIGTERM/SIGINT, then stop accepting, give in-flight requests shutdown_grace
    seconds, drain the queue to the database or the spool, and return the exit status: 1 when records
    were lost (counted and logged), 0 otherwise.

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
        code = loop.run_until_complete(_serve_until_signalled(config, sockets))
    finally:
        _close_loop(loop)
    stuck = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if stuck:
        log.warning("exiting with thread(s) still blocked (a call that never returned): %s", ", ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


async def _serve_until_signalled(config: Config, sockets: Sequence[socket.socket]) -> int:
    app = create_app(config)
    grace = config.server.shutdown_grace
    runner = make_runner(
        app, config, handle_signals=False, shutdown_timeout=grace, handler_cancellation=True, access_log=None
    )
    await runner.setup()
    try:
        for sock in sockets:
            await web.SockSite(runner, sock).start()
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
        await runner.cleanup()  # stops the sites, waits for handlers, then the app's cleanup drains the queue
    recorder = app.get(RECORDER)
    lost = 0 if recorder is None else recorder.stats().rows_lost
    if lost:
        log.error("shut down with %d record(s) lost (see the errors above); exit status 1", lost)
        return 1
    log.info("shut down cleanly")
    return 0


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
    """Check what can be checked before serving (exit 2, one line on stderr), bind, then serve."""
    try:
        check_database_url(config.database.url)
    except ConfigError as exc:
        print(f"chatledger: {exc}", file=sys.stderr)
        return 2
    workers = config.server.workers
    if workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        print("chatledger: server.workers > 1 needs SO_REUSEPORT, which this platform lacks", file=sys.stderr)
        return 2
    host, port = config.server.host, config.server.port
    socket_sets: list[list[socket.socket]] = []
    try:
        for _ in range(workers):
            socket_sets.append(bind(host, port, reuse_port=workers > 1))
            if port == 0:  # an ephemeral port: the other workers join the one the first was given
                port = socket_sets[0][0].getsockname()[1]
    except BindError as exc:
        for sockets in socket_sets:
            close(sockets)
        print(f"chatledger: {exc}", file=sys.stderr)
        return 2
    if not is_loopback(host) and not config.admin.token:
        log.warning(
            "listening on %s without [admin] token: the /_ledger/api endpoints will refuse every request; "
            "set admin.token (or CHATLEDGER_ADMIN_TOKEN) to use them",
            host,
        )
    log.info(
        "chatledger listening on http://%s:%d -> %s, database %s%s",
        host,
        port,
        config.upstream.url,
        redact_url(config.database.url),
        f", {workers} workers" if workers > 1 else "",
    )
    try:
        if workers == 1:
            return run_worker(config, socket_sets[0])
        if config.database.auto_migrate and _migrate_once(config.database.url):
            config = config.replace("database", auto_migrate=False)  # workers need not race to do it again
        return supervise(config, socket_sets, _worker_main)
    finally:
        for sockets in socket_sets:
            close(sockets)


def _migrate_once(url: str) -> bool:
    """The migration, once, before the workers start; on failure each worker retries in the background."""
    from .store.migrate import upgrade_url
    from .web.startup import FIRST_ATTEMPT

    async def attempt() -> None:
        async with asyncio.timeout(FIRST_ATTEMPT):
            await upgrade_url(url)

    try:
        asyncio.run(attempt())
    except Exception:
        return False
    return True


def _worker_main(config: Config, sockets: Sequence[socket.socket]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    configure_logging(config.logging)
    sys.exit(run_worker(config, sockets))
