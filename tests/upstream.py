"""A fake OpenAI-compatible upstream: a real aiohttp server on a real port, scripted per test.

Each request is answered by the scenario named in its `X-Fake-Scenario` header (default: the
upstream's `default` scenario). Scenarios are coroutines `(request, body) -> StreamResponse`; helpers
below build the common ones. Every request received is kept in `requests` for assertions.
"""

from __future__ import annotations

import asyncio
import gzip
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

Scenario = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass
class ReceivedRequest:
    method: str
    path_qs: str
    headers: dict[str, str]
    header_items: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class FakeUpstream:
    scenarios: dict[str, Scenario] = field(default_factory=dict)
    default: str = "basic"
    requests: list[ReceivedRequest] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None
    finished: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, name: str, scenario: Scenario) -> None:
        self.scenarios[name] = scenario

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            ReceivedRequest(
                request.method,
                request.raw_path,
                {k.lower(): v for k, v in request.headers.items()},
                list(request.headers.items()),
                body,
            )
        )
        name = request.headers.get("X-Fake-Scenario", self.default)
        try:
            return await self.scenarios[name](request, body)
        finally:
            self.finished.append(name)

    async def start(self) -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def json_reply(
    payload: Any,
    status: int = 200,
    headers: dict[str, str] | None = None,
    *,
    gzip_body: bool = False,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> Scenario:
    """Answer with a fixed body (JSON-encoded `payload`, or `raw` bytes), optionally gzip-encoded."""
    body = raw if raw is not None else orjson.dumps(payload)

    async def scenario(request: web.Request, _body: bytes) -> web.StreamResponse:
        data = gzip.compress(body) if gzip_body else body
        extra = dict(headers or {})
        if gzip_body:
            extra["Content-Encoding"] = "gzip"
        response = web.Response(status=status, body=data, headers=extra)
        response.content_type = content_type
        return response

    scenario.body = body  # type: ignore[attr-defined]
    return scenario


def pieces(data: bytes, sizes: Sequence[int] | None = None, seed: int = 7) -> list[bytes]:
    """Cut bytes into small irregular pieces (1-40 bytes by default, reproducible)."""
    rng = random.Random(seed)
    out: list[bytes] = []
    position = 0
    index = 0
    while position < len(data):
        size = sizes[index % len(sizes)] if sizes else rng.randint(1, 40)
        out.append(data[position : position + size])
        position += size
        index += 1
    return out


def sse_reply(
    data: bytes,
    *,
    sizes: Sequence[int] | None = None,
    delay: float = 0.0,
    status: int = 200,
    headers: dict[str, str] | None = None,
    cut_after: int | None = None,
    hang_after: int | None = None,
) -> Scenario:
    """Stream `data` as text/event-stream in irregular pieces with a delay between writes.

    cut_after: drop the connection after that many bytes (a cut-off stream).
    hang_after: stop sending (but keep the connection open) after that many bytes.
    """

    async def scenario(request: web.Request, _body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers=headers)
        response.content_type = "text/event-stream"
        response.headers["Cache-Control"] = "no-cache"
        await response.prepare(request)
        sent = 0
        for piece in pieces(data, sizes):
            if cut_after is not None and sent + len(piece) > cut_after:
                await response.write(piece[: cut_after - sent])
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.abort()
                return response
            if hang_after is not None and sent + len(piece) > hang_after:
                await response.write(piece[: hang_after - sent])
                await asyncio.sleep(3600)
            await response.write(piece)
            sent += len(piece)
            if delay:
                await asyncio.sleep(delay)
        await response.write_eof()
        return response

    scenario.body = data  # type: ignore[attr-defined]
    return scenario
