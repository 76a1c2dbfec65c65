"""The thinnest aiohttp reverse proxy: the reference chatledger is measured against.

Reads the body, forwards method, path, headers and body through one shared ClientSession, streams the
response back read by read (iter_any). No parsing, no logging. Uses uvloop when installed, as
chatledger does. Run: `python -m bench.passthrough --port 9002 --upstream http://127.0.0.1:9001`.

`--same-relay` relays bodies as chatledger does: every buffered HTTP chunk read in one step
(proxy.relay.aiohttp_compat) instead of iter_any, and a body already received whole sent with its headers in one
write (proxy.relay.handler.relay_response). Against that reference, chatledger's overhead is its logging alone.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

DROPPED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
DROPPED_RESPONSE = frozenset({"connection", "keep-alive", "transfer-encoding"})
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
SAME_RELAY = web.AppKey("same_relay", bool)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in DROPPED)
    async with request.app[SESSION].request(
        request.method,
        URL(request.app[UPSTREAM] + request.raw_path, encoded=True),
        data=body or None,
        headers=headers,
        allow_redirects=False,
        skip_auto_headers=SKIP_AUTO_HEADERS,
    ) as upstream:
        if request.app[SAME_RELAY]:
            return await _same_relay(request, upstream)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in DROPPED_RESPONSE:
                response.headers.add(name, value)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _same_relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """forward's relay as chatledger does it (--same-relay). Imported here, not at the top: the reference
    passthrough loads nothing of chatledger (its RSS had grown 3 MiB from that import)."""
    from proxy.relay.aiohttp_compat import read_available
    from proxy.relay.handler import relay_response

    headers = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in DROPPED_RESPONSE)
    response = relay_response(upstream, headers)
    await response.prepare(request)
    while chunk := await read_available(upstream.content):
        await response.write(chunk)
    await response.write_eof()
    return response


async def _session(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=300),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    app[SESSION] = session
    yield
    await session.close()


def create_app(upstream: str, same_relay: bool = False) -> web.Application:
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app[SAME_RELAY] = same_relay
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
    parser.add_argument("--upstream", default="http://127.0.0.1:9001")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--same-relay", action="store_true", help="relay bodies as chatledger does")
    args = parser.parse_args()
    if not args.no_uvloop:
        try:
            import uvloop  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(
        create_app(args.upstream, args.same_relay),
        host=args.host,
        port=args.port,
        access_log=None,
        print=lambda *_: print(f"passthrough listening on http://{args.host}:{args.port}", flush=True),
    )


if __name__ == "__main__":
    main()
