"""The aiohttp server internals chatledger relies on for its connection limits (tests/test_connections.py
pins them), and the runner that installs them.

aiohttp's server closes idle keep-alive connections (`keepalive_timeout`) but has no bound on how long a
client may take to send its request headers, nor on how many connections it holds. Here:

- `GuardedRequestHandler`: a connection must complete its request headers within `header_timeout` of
  opening, or of the first byte of its next request (slow headers, a half-sent request line, a socket
  that never sends anything); past it the connection is closed (408 when part of a request came).
- `GuardedServer`: at `max_connections`, a new connection closes the oldest one that has no request in
  progress; when every connection is busy, the new one is refused.
- `_ServerLogger`: a malformed request (a control character in a header, invalid bytes in the target)
  makes aiohttp log a traceback that quotes the offending bytes, a key among them; it becomes one short
  line, rate-limited, that quotes nothing the client sent.

The body is bounded in the forwarder (`server.body_timeout`), idle keep-alive by aiohttp itself.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from ..config import Config
from ..logs import RateLimited
from ..runtime import connection_cap

log = logging.getLogger("chatledger.connections")
_refused = RateLimited(log, burst=10, period=60.0)
_crowded = RateLimited(log, burst=1, period=60.0)
TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

# RequestHandler's and Server's internals used below; tests/test_connections.py fails when a release
# renames one, so the guard is never silently off.
HANDLER_ATTRIBUTES = ("_request_count", "_messages", "_waiter", "_manager", "_loop", "transport", "force_close")
SERVER_ATTRIBUTES = ("_connections", "_kwargs", "_loop")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float
    max_connections: int


class GuardedRequestHandler(RequestHandler):
    __slots__ = ("_header_handle", "_last_payload", "_partial")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._header_handle: asyncio.TimerHandle | None = None
        self._last_payload: Any = None
        self._partial = False  # bytes of a request whose headers are not complete yet
        super().connection_made(transport)
        if self.transport is not None:
            self._arm()

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        super().data_received(data)
        if not data:  # aiohttp re-parsing what it buffered after taking a request: no new bytes came
            return
        if self._request_count != count:  # headers complete: the request is the handler's now
            self._disarm()
            self._partial = False
            if self._messages:
                self._last_payload = self._messages[-1][1]
        elif self._last_payload is None or self._last_payload.is_eof():  # the start of a next request
            self._partial = True
            self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_handle is None:
            limits: ConnectionLimits = self._manager.limits  # type: ignore[union-attr]
            self._header_handle = self._loop.call_later(limits.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_handle is not None:
            self._header_handle.cancel()
            self._header_handle = None

    def _headers_late(self) -> None:
        self._header_handle = None
        transport = self.transport
        if transport is None:
            return
        if self._partial:
            transport.write(TIMEOUT_408)
        self.force_close()


class GuardedServer(web.Server):
    """aiohttp's Server, whose connections are GuardedRequestHandlers, at most limits.max_connections."""

    limits: ConnectionLimits

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) <= self.limits.max_connections:
            return
        for other in self._connections:
            waiter = other._waiter
            if other is not handler and waiter is not None and not waiter.done() and not other._messages:
                other.force_close()  # the oldest connection waiting for a request makes room
                _crowded.log(
                    logging.WARNING,
                    "%d connections open (server.max_connections): closing the oldest idle ones",
                    len(self._connections),
                )
                return
        _crowded.log(
            logging.WARNING,
            "%d connections open, all busy (server.max_connections): refusing new ones",
            len(self._connections),
        )
        transport.close()


class _ServerLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp.server's logger, but a malformed request is one short line without its bytes."""

    def log(self, level: int, msg: object, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            remote = args[0] if args else "?"
            _refused.log(
                logging.INFO,
                "refused a malformed request from %s: %s (400)",
                remote,
                type(exc_info).__name__,
            )
            return
        super().log(level, msg, *args, exc_info=exc_info, **kwargs)


SERVER_LOGGER = _ServerLogger(logging.getLogger("aiohttp.server"), {})


class LedgerRunner(web.AppRunner):
    """web.AppRunner whose server guards its connections (see the module docstring)."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, logger=SERVER_LOGGER, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = GuardedServer  # same object, one method more: no layout of its own
        server.limits = self._limits  # type: ignore[attr-defined]
        return server


def make_runner(app: web.Application, config: Config, **kwargs: Any) -> LedgerRunner:
    """The runner for the proxy's app with [server]'s connection limits (max_connections lowered to what
    the process's file limit can hold)."""
    server = config.server
    limits = ConnectionLimits(server.header_timeout, connection_cap(server.max_connections))
    return LedgerRunner(app, limits, keepalive_timeout=server.keepalive_timeout, **kwargs)
